//! What a training run shows while it runs: a progress bar (step, loss,
//! tokens/s, ETA) on a terminal, plain log lines otherwise, and a summary.

use super::metrics::StepMetrics;
use super::trainer::{Finish, Summary, Trainer};
use crate::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::atomic::AtomicBool;

/// Runs the trainer to the end, showing progress on stdout (plain lines
/// when stdout is not a terminal), then prints the summary.
pub fn train_with_progress(trainer: &mut Trainer, stop: &AtomicBool) -> Result<Summary> {
    let cfg = trainer.config().clone();
    let (train_rows, valid_rows) = trainer.data_rows();
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "training {} trainable parameters on {} rows of {} tokens ({} held out); {} steps × {} rows × {} accumulation{}",
        crate::util::group_digits(trainer.trainable_params()),
        train_rows,
        cfg.seq_len,
        valid_rows,
        cfg.steps,
        cfg.batch_size,
        cfg.grad_accum,
        if trainer.step() > 0 {
            format!("; resuming after step {}", trainer.step())
        } else {
            String::new()
        }
    );
    let terminal = out.is_terminal();
    let bar = if terminal {
        let bar = ProgressBar::new(cfg.steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(trainer.step());
        Some(bar)
    } else {
        None
    };
    let every = cfg.log_every.max(1);
    let total = cfg.steps;
    let summary = trainer.run(stop, |m: &StepMetrics, _| match &bar {
        Some(bar) => {
            bar.set_position(m.step);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                m.loss, m.lr, m.tokens_per_s
            ));
        }
        None => {
            if m.step % every == 0 || m.step == 1 || m.step == total {
                println!(
                    "step {:>6}/{total}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  {:.0} tok/s  {:.1} s",
                    m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.elapsed_s
                );
            }
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    match summary.finish {
        Finish::Completed => println!(
            "done: {} steps in {:.1} s; last loss {}{}",
            summary.steps_run,
            summary.elapsed_s,
            summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            summary.valid_loss.map_or(String::new(), |l| format!(
                "; validation loss {l:.4} (ppl {:.2})",
                l.exp()
            ))
        ),
        Finish::Interrupted { step } => {
            println!("interrupted after step {step}: checkpoint written; continue with --resume")
        }
    }
    for p in &summary.outputs {
        println!("wrote {}", p.display());
    }
    Ok(summary)
}
