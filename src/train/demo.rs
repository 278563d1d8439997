//! The bundled demo (`lcc run-train` with no arguments): extends
//! `models/tiny` (a byte-level LLaMA pretrained by lcc at context 256) to
//! 1024 tokens with the LongLoRA recipe — position interpolation ×4,
//! S²-Attn in training, LoRA on q/k/v/o plus trainable embedding and norms —
//! on a novel the base model never saw, then compares perplexities with
//! full attention at 256, 512 and 1024 tokens: the base model, the base
//! model with PI only, and the fine-tuned model.

use super::config::TrainConfig;
use super::eval::perplexity;
use super::trainer::Trainer;
use crate::ir::Graph;
use crate::passes::{Pipeline, RunOptions};
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Where the demo's files are, relative to the model dir.
pub const DEMO_TRAIN: &str = "demo/northanger_abbey_train.txt";
pub const DEMO_EVAL: &str = "demo/northanger_abbey_eval.txt";
/// The context the base model was pretrained at, and the demo's target.
pub const BASE_CTX: usize = 256;
pub const TARGET_CTX: usize = 1024;
/// Windows scored per (model, context) in the perplexity table.
const EVAL_WINDOWS: usize = 24;

/// `models/tiny` from the working directory, else from the source tree
/// this binary was built from.
pub fn find_tiny_model() -> Result<PathBuf> {
    let here = Path::new("models/tiny");
    if here.join("config.json").is_file() {
        return Ok(here.to_path_buf());
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    if built.join("config.json").is_file() {
        return Ok(built);
    }
    Err(Error::invalid(
        "the demo needs models/tiny: run `lcc run-train` from the lcc checkout (or pass --model, --data, --out … for your own run)",
    ))
}

/// The demo's training configuration (also written to OUT/run.yaml).
pub fn demo_config(model: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(model.to_path_buf()),
        pipeline: Some("longlora-train".into()),
        set: vec![format!("pi.target_len={TARGET_CTX}")],
        data: vec![model.join(DEMO_TRAIN)],
        valid_fraction: 0.02,
        seq_len: TARGET_CTX,
        steps: 120,
        batch_size: 1,
        grad_accum: 2,
        lr: 2e-3,
        warmup: 10,
        max_grad_norm: 1.0,
        keep_checkpoints: 1,
        eval_batches: 4,
        log_every: 10,
        out: Some(PathBuf::from("runs/demo")),
        // The demo is rerun as it is: each run replaces the last.
        overwrite: true,
        ..TrainConfig::default()
    }
}

fn with_passes(mut graph: Graph, names: &str, set: &[String]) -> Result<Graph> {
    let mut p = Pipeline::from_names(names)?;
    for s in set {
        p.set(s)?;
    }
    p.run(&mut graph, &RunOptions::default(), |_, _| {})?;
    Ok(graph)
}

/// Runs the demo, printing to `out`.
pub fn run_demo(out: &mut impl Write) -> Result<()> {
    let model = find_tiny_model()?;
    let cfg = demo_config(&model);
    let io = |e: std::io::Error| Error::invalid(format!("cannot write to stdout: {e}"));
    writeln!(
        out,
        "lcc demo: extend {} from {BASE_CTX} to {TARGET_CTX} tokens with LongLoRA (PI ×{}, S²-Attn, LoRA r=8 on q/k/v/o, trainable embedding and norms)\n\
         training on {}; outputs in {}\n\
         (your own run: lcc run-train --model DIR --pipeline longlora-train --data PATH --seq-len N --steps N --out DIR; see --help)\n",
        model.display(),
        TARGET_CTX / BASE_CTX,
        model.join(DEMO_TRAIN).display(),
        cfg.out.as_ref().expect("set above").display()
    )
    .map_err(io)?;
    let out_dir = cfg.out.clone().expect("set above");
    let stop = AtomicBool::new(false);
    let mut trainer = Trainer::new(cfg)?;
    super::progress::train_with_progress(&mut trainer, &stop)?;

    let text = std::fs::read_to_string(model.join(DEMO_EVAL)).map_err(|e| {
        Error::invalid(format!(
            "cannot read {}: {e}",
            model.join(DEMO_EVAL).display()
        ))
    })?;
    let tokens = trainer.tokenizer.encode(&text)?;
    let pi = vec![format!("pi.target_len={TARGET_CTX}")];
    let base = crate::model::load(&model)?;
    let base_pi = with_passes(base.clone(), "pi", &pi)?;
    // The fine-tuned model as a user would load it: base + PI, the saved
    // PEFT adapter and trainable params, full attention.
    let mut tuned = base_pi.clone();
    let adapter = crate::hf::peft::load_adapter(&out_dir.join("adapter"))?;
    crate::passes::lora::apply_adapter(&mut tuned, &adapter.lora())?;
    crate::hf::peft::load_trainable(&mut tuned, &out_dir.join("trainable_params.safetensors"))?;

    writeln!(
        out,
        "\nperplexity on {} (held out; {} tokens; full attention; up to {EVAL_WINDOWS} windows per context)",
        model.join(DEMO_EVAL).display(),
        tokens.len()
    )
    .map_err(io)?;
    let ctxs = [BASE_CTX, 512, TARGET_CTX];
    write!(out, "{:<28}", "model").map_err(io)?;
    for c in ctxs {
        write!(out, "{:>10}", c).map_err(io)?;
    }
    writeln!(out).map_err(io)?;
    for (name, graph) in [
        ("base (trained at 256)", &base),
        ("base + PI ×4", &base_pi),
        ("LongLoRA fine-tuned", &tuned),
    ] {
        write!(out, "{name:<28}").map_err(io)?;
        for c in ctxs {
            let r = perplexity(
                graph,
                &tokens,
                c,
                c,
                Some(EVAL_WINDOWS),
                crate::runtime::ComputeDType::F32,
            )?;
            write!(out, "{:>10.3}", r.ppl).map_err(io)?;
            out.flush().map_err(io)?;
        }
        writeln!(out).map_err(io)?;
    }
    Ok(())
}
