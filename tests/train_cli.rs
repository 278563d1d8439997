//! `lcc run-train` and `lcc init` as users run them: the files a run writes,
//! resume that continues bit for bit, determinism, configs, bad input.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A few KB of public-domain text (the shared corpus when present, else a
/// generated text), written into `dir`.
fn write_text(dir: &Path) -> PathBuf {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus/valid/shakespeare_gut__tempest_gut.txt");
    let body = match std::fs::read_to_string(&corpus) {
        Ok(t) => t.chars().take(12_000).collect::<String>(),
        Err(_) => (0..400)
            .map(|i| format!("Line {i}: the quick brown fox jumps over the lazy dog.\n"))
            .collect(),
    };
    let path = dir.join("text.txt");
    std::fs::write(&path, body).unwrap();
    path
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "run-train",
        "--model",
        model,
        "--pipeline",
        "longlora-train",
        "--set",
        "pi.target_len=512",
        "--data",
        data,
        "--seq-len",
        "32",
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--threads",
        "2",
        "--out",
        out,
    ]
}

/// (step, loss, lr, grad_norm) of every metrics line, as their exact bits.
fn metrics(out: &Path) -> Vec<(u64, u64, u64, u64)> {
    metrics_lines(out)
        .into_iter()
        .map(|v| {
            for key in [
                "step",
                "loss",
                "lr",
                "grad_norm",
                "step_time_s",
                "tokens_per_s",
                "elapsed_s",
            ] {
                assert!(v.get(key).is_some(), "metrics line lacks {key}: {v}");
            }
            let f = |k: &str| v[k].as_f64().unwrap().to_bits();
            (
                v["step"].as_u64().unwrap(),
                f("loss"),
                f("lr"),
                f("grad_norm"),
            )
        })
        .collect()
}

#[test]
fn run_train_writes_adapter_trainable_params_metrics_plot_checkpoint_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny().join("hf");
    let args = train_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "4",
    );
    let o = lcc(&args);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "trainable_params.safetensors",
        "metrics.jsonl",
        "loss.svg",
        "run.yaml",
        "checkpoints/step-4",
    ] {
        assert!(out.join(f).exists(), "{f} missing; {}", text(&o));
    }
    let m = metrics(&out);
    assert_eq!(m.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("<svg"), "{svg}");
    // The adapter loads back and applies to the base model.
    let adapter = lcc::hf::peft::load_adapter(&out.join("adapter")).unwrap();
    let mut g = lcc::hf::load(&model).unwrap();
    lcc::passes::lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    // run.yaml repeats the run.
    let yaml = std::fs::read_to_string(out.join("run.yaml")).unwrap();
    assert!(yaml.contains("seq_len: 32"), "{yaml}");
    assert!(yaml.contains("beta2: 0.95"), "{yaml}");
}

#[test]
fn resume_continues_bit_for_bit_and_same_seed_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let model = tiny().join("hf");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    let full = tmp.path().join("full");
    let o = lcc(&train_args(m, d, full.to_str().unwrap(), "6"));
    assert!(o.status.success(), "{}", text(&o));

    let again = tmp.path().join("again");
    let o = lcc(&train_args(m, d, again.to_str().unwrap(), "6"));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(metrics(&full), metrics(&again), "same seed, different runs");

    // Stop after 3 steps (a checkpoint at the end), then resume to 6.
    let split = tmp.path().join("split");
    let o = lcc(&train_args(m, d, split.to_str().unwrap(), "3"));
    assert!(o.status.success(), "{}", text(&o));
    let mut args = train_args(m, d, split.to_str().unwrap(), "6");
    args.push("--resume");
    let o = lcc(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(metrics(&full), metrics(&split), "resumed run differs");
    let a = std::fs::read(full.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(split.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs");
}

#[test]
fn yaml_config_supplies_options_and_the_command_line_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("train.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {}\npipeline: longlora-train\nset: ['pi.target_len=512']\ndata: [{}]\nseq_len: 32\nsteps: 5\nbatch_size: 1\nlr: 0.001\nthreads: 2\nout: {}\n",
            tiny().join("hf").display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    let o = lcc(&[
        "run-train",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(metrics(&out).len(), 2);

    std::fs::write(&cfg, "seq_len: 32\nstepz: 3\n").unwrap();
    let o = lcc(&["run-train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("stepz"), "{}", text(&o));
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny().join("hf");
    let mut args = train_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "20",
    );
    // Replace the learning rate and warmup of the common arguments.
    for flag in ["--lr", "--warmup"] {
        let i = args.iter().position(|a| *a == flag).unwrap();
        args.drain(i..i + 2);
    }
    args.extend([
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--max-grad-norm",
        "0",
        "--save-every",
        "1",
        "--optimizer",
        "sgd",
    ]);
    let o = lcc(&args);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("step ") && t.contains(" is "), "{t}");
    assert!(out.join("checkpoints").is_dir(), "{t}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let model = tiny().join("hf");
    let missing = tmp.path().join("nope.txt");
    let o = lcc(&train_args(
        model.to_str().unwrap(),
        missing.to_str().unwrap(),
        out.to_str().unwrap(),
        "2",
    ));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("nope.txt"), "{}", text(&o));

    let o = lcc(&["run-train", "--model", model.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--data"), "{}", text(&o));
}

#[test]
fn init_writes_a_model_that_loads_and_trains_fully() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    let cfg = tiny().join("hf/config.json");
    let o = lcc(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--seed",
        "3",
        "-o",
        init.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let data = write_text(tmp.path());
    let out = tmp.path().join("run");
    let o = lcc(&[
        "run-train",
        "--model",
        init.to_str().unwrap(),
        "--passes",
        "trainable",
        "--set",
        "trainable.patterns=['*']",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--warmup",
        "0",
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let m = metrics(&out);
    assert_eq!(m.len(), 3);
    let first = f64::from_bits(m[0].1);
    let last = f64::from_bits(m[2].1);
    assert!(
        last < first,
        "full training should lower the loss: {first} → {last}"
    );
    let trained = lcc::hf::load(&out.join("model")).unwrap();
    assert_eq!(
        trained.weights.len(),
        lcc::hf::load(&init).unwrap().weights.len()
    );
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_finishes_the_run_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let model = tiny().join("hf");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    let full = tmp.path().join("full");
    let o = lcc(&train_args(m, d, full.to_str().unwrap(), "400"));
    assert!(o.status.success(), "{}", text(&o));

    let cut = tmp.path().join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lcc"))
        .args(train_args(m, d, cut.to_str().unwrap(), "400"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once a few steps are logged.
    let metrics_file = cut.join("metrics.jsonl");
    let start = std::time::Instant::now();
    loop {
        let lines = std::fs::read_to_string(&metrics_file)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 3 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before it could be interrupted: {status}");
        }
        assert!(start.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let stopped = metrics(&cut).len();
    assert!(stopped < 400, "the run ended before the signal arrived");
    {
        assert_eq!(
            out.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            cut.join(format!("checkpoints/step-{stopped}")).is_dir(),
            "no checkpoint for step {stopped}"
        );
        assert!(cut.join("adapter/adapter_model.safetensors").is_file());
        let mut args = train_args(m, d, cut.to_str().unwrap(), "400");
        args.push("--resume");
        let o = lcc(&args);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(
        metrics(&full),
        metrics(&cut),
        "interrupted + resumed run differs"
    );
}

#[test]
fn eval_with_run_applies_the_runs_pi_adapter_and_trainable_params() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let out = tmp.path().join("run");
    let model = tiny().join("hf");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let o = lcc(&train_args(m, d, out.to_str().unwrap(), "3"));
    assert!(o.status.success(), "{}", text(&o));
    let ppl = |extra: &[&str], base: &str| -> f64 {
        let mut args = vec!["eval", "ppl", base, "--data", d, "--ctx", "32", "--json"];
        args.extend_from_slice(extra);
        let o = lcc(&args);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v[0]["ppl"].as_f64().unwrap()
    };
    let with_run = ppl(&["--run", out.to_str().unwrap()], m);
    // The same by hand: the PI'd base, then the adapter and trainable params.
    let base_pi = tmp.path().join("base-pi");
    let o = lcc(&[
        "rewrite",
        m,
        "--passes",
        "pi",
        "--set",
        "pi.target_len=512",
        "-o",
        base_pi.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let adapter = out.join("adapter");
    let trainable = out.join("trainable_params.safetensors");
    let by_hand = ppl(
        &[
            "--adapter",
            adapter.to_str().unwrap(),
            "--trainable",
            trainable.to_str().unwrap(),
        ],
        base_pi.to_str().unwrap(),
    );
    assert_eq!(with_run, by_hand);
    // Without PI the adapter sees other positions: a different result.
    let no_pi = ppl(
        &[
            "--adapter",
            adapter.to_str().unwrap(),
            "--trainable",
            trainable.to_str().unwrap(),
        ],
        m,
    );
    assert_ne!(with_run, no_pi);

    // A directory that is not a run says so.
    let not_a_run = tmp.path().to_str().unwrap();
    let o = lcc(&[
        "eval", "ppl", m, "--data", d, "--ctx", "32", "--run", not_a_run,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no run.yaml"), "{}", text(&o));
}
