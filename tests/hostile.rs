//! Hostile input and run directories: every case ends in exit 2 with a
//! message naming the file or option, never a panic, a hang or a silent
//! success, and a run directory never loses a run.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Exit code 2 (no panic: 101; no abort: a signal) with every needle in the
/// output, within `secs` seconds.
fn refused_within(args: &[&str], needles: &[&str], secs: u64) {
    let start = Instant::now();
    let o = lcc(args);
    let t = text(&o);
    assert!(
        start.elapsed() < Duration::from_secs(secs),
        "lcc {} took {:?}",
        args.join(" "),
        start.elapsed()
    );
    assert_eq!(o.status.code(), Some(2), "lcc {}: {t}", args.join(" "));
    for n in needles {
        assert!(
            t.contains(n),
            "lcc {}: expected {n:?} in {t}",
            args.join(" ")
        );
    }
}

fn refused(args: &[&str], needles: &[&str]) {
    refused_within(args, needles, 60)
}

fn train<'a>(data: &'a str, out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let model = Box::leak(
        tiny()
            .join("hf")
            .to_string_lossy()
            .into_owned()
            .into_boxed_str(),
    );
    let mut args = vec![
        "run-train",
        "--model",
        model,
        "--pipeline",
        "longlora-train",
        "--set",
        "pi.target_len=1024",
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
        "1",
        "--threads",
        "2",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "0",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    args
}

fn metrics_steps(out: &Path) -> Vec<u64> {
    metrics_lines(out)
        .iter()
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

#[test]
fn special_files_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let hf = tiny().join("hf");
    let out = dir.path().join("o.safetensors");
    if made {
        let f = s(&fifo);
        refused_within(
            &["exec", s(&hf), "--inputs", f, "-o", s(&out)],
            &["fifo", "not a regular file"],
            10,
        );
        refused_within(&["run-train", "--config", f], &["not a regular file"], 10);
        let data = generated_text(dir.path());
        refused_within(
            &train(
                s(&data),
                s(&dir.path().join("run")),
                "1",
                &["--init-trainable", f],
            ),
            &["not a regular file"],
            10,
        );
    } else {
        eprintln!("skipping the FIFO cases: mkfifo is not available");
    }
    // A device has no end: /dev/zero as a YAML config.
    refused_within(
        &["run-train", "--config", "/dev/zero"],
        &["/dev/zero", "not a regular file"],
        10,
    );
    // A config far larger than any real one.
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; 17 << 20]).unwrap();
    refused_within(
        &["run-train", "--config", s(&big)],
        &["big.yaml", "at most"],
        10,
    );
}

#[test]
fn out_of_range_options_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_text(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (s(&data), s(&out));
    let mut many = train(d, o, "1", &[]);
    let i = many.iter().position(|a| *a == "--threads").unwrap();
    many[i + 1] = "100000";
    refused_within(&many, &["--threads 100000"], 10);
    refused_within(
        &[
            "exec",
            s(&tiny().join("hf")),
            "--inputs",
            s(&tiny().join("inputs_s7.safetensors")),
            "-o",
            s(&dir.path().join("x.safetensors")),
            "--threads",
            "10000",
        ],
        &["--threads 10000", "cores"],
        10,
    );
    refused(&train(d, o, "1", &["--eps=-1"]), &["--eps"]);
    refused(&train(d, o, "1", &["--eps", "0"]), &["--eps"]);
    refused(
        &train(d, o, "1", &["--weight-decay=-0.1"]),
        &["--weight-decay"],
    );
    refused(
        &[
            "generate",
            s(&tiny().join("hf")),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--temperature=-1",
        ],
        &["--temperature"],
    );
    assert!(!out.exists(), "a refused run writes nothing");
}

#[test]
fn an_eos_outside_the_vocabulary_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    let src = tiny().join("hf");
    std::fs::copy(
        src.join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["eos_token_id"] = serde_json::json!(5000);
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    refused(
        &[
            "generate",
            s(&model),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ],
        &["eos_token_id 5000", "vocabulary"],
    );
}

#[test]
fn a_second_run_into_a_run_directory_is_refused_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_text(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (s(&data), s(&out));
    let first = lcc(&train(d, o, "4", &[]));
    assert!(first.status.success(), "{}", text(&first));
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    // A second, shorter run: refused, and the first run is intact.
    refused(
        &train(d, o, "2", &[]),
        &["holds another run", "--resume", "--overwrite"],
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    assert!(out.join("checkpoints/step-4").is_dir());
    // --overwrite replaces it: its own metrics, its own checkpoints only,
    // and a file of the user's stays.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o2 = lcc(&train(d, o, "2", &["--overwrite"]));
    assert!(o2.status.success(), "{}", text(&o2));
    assert!(text(&o2).contains("--overwrite: removed"), "{}", text(&o2));
    assert_eq!(metrics_steps(&out), vec![1, 2]);
    assert!(!out.join("checkpoints/step-4").exists());
    assert!(out.join("checkpoints/step-2").is_dir());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    refused(
        &train(d, o, "2", &["--overwrite", "--resume"]),
        &["--resume"],
    );
}

#[test]
fn resume_refuses_other_options_and_falls_back_past_a_damaged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_text(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (s(&data), s(&out));
    let first = lcc(&train(d, o, "3", &[]));
    assert!(first.status.success(), "{}", text(&first));
    // Options that shape the run must be the run's own; each is named.
    refused(
        &train(d, o, "5", &["--resume", "--optimizer", "sgd"]),
        &["optimizer: was \"adamw\", now \"sgd\""],
    );
    let mut other = train(d, o, "5", &["--resume"]);
    let i = other.iter().position(|a| *a == "32").unwrap();
    other[i] = "16";
    refused(&other, &["seq_len: was 32, now 16"]);
    let other_data = dir.path().join("other.txt");
    std::fs::write(&other_data, "different text\n".repeat(200)).unwrap();
    refused(
        &train(s(&other_data), o, "5", &["--resume"]),
        &["data: was"],
    );
    // A checkpoint past --steps, or one whose state lies about its step.
    refused(&train(d, o, "2", &["--resume"]), &["past --steps 2"]);
    let state = out.join("checkpoints/step-3/state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    st["step"] = serde_json::json!(u64::MAX);
    std::fs::write(&state, st.to_string()).unwrap();
    // The newest checkpoint is now damaged: resume says so and continues
    // from step 2, the newest intact one, setting the damaged one aside.
    let r = lcc(&train(d, o, "4", &["--resume"]));
    let t = text(&r);
    assert!(r.status.success(), "{t}");
    assert!(t.contains("step-3") && t.contains("damaged"), "{t}");
    assert!(t.contains("newest intact checkpoint"), "{t}");
    assert_eq!(metrics_steps(&out), vec![1, 2, 3, 4]);
    assert!(out.join("checkpoints/.superseded-step-3").is_dir(), "kept");
    // --resume-from picks one; an unknown one lists what there is.
    refused(
        &train(d, o, "4", &["--resume", "--resume-from", "step-9"]),
        &["step-9", "there are: step-1, step-2, step-3, step-4"],
    );
    let r = lcc(&train(d, o, "4", &["--resume", "--resume-from", "step-1"]));
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(metrics_steps(&out), vec![1, 2, 3, 4]);
}

#[test]
fn cost_counts_past_u64_are_exact() {
    let o = lcc(&[
        "inspect",
        s(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama-2-7b")),
        "--cost",
        "--seq-len",
        "10000000",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = &v["flops_forward"];
    // 32 layers · 2 matmuls · 2 · 32 heads · L² · 128.
    let want = 32.0 * 2.0 * 2.0 * 32.0 * 1e14 * 128.0;
    let got = f["attention"].as_f64().unwrap();
    assert!((got - want).abs() / want < 1e-12, "{got} vs {want}");
    assert!(f["lm_head"].as_f64().unwrap() < f["total"].as_f64().unwrap());
}

#[test]
fn sizes_from_input_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_text(dir.path());
    let out = dir.path().join("run");
    let (d, o) = (s(&data), s(&out));
    let mut big_batch = train(d, o, "1", &[]);
    let i = big_batch.iter().position(|a| *a == "--batch-size").unwrap();
    big_batch[i + 1] = "1000000000";
    refused_within(&big_batch, &["--batch-size 1000000000", "rows"], 30);
    refused_within(
        &train(d, o, "1", &["--set", "lora.rank=1000000000"]),
        &["rank 1000000000", "lora.rank"],
        30,
    );
    // A config whose weights cannot fit this machine (a 1T-parameter shape).
    let cfg = dir.path().join("huge.json");
    std::fs::write(
        &cfg,
        r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 65536,
            "intermediate_size": 262144, "num_hidden_layers": 80,
            "num_attention_heads": 512, "max_position_embeddings": 4096}"#,
    )
    .unwrap();
    refused_within(
        &["init", "--config", s(&cfg), "-o", s(&dir.path().join("m"))],
        &["huge.json", "memory"],
        30,
    );
}

#[test]
fn what_the_model_does_not_say_is_not_passed_over_in_silence() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny().join("hf");
    // A config with one layer fewer than the weights: loads (as transformers
    // does) and names the unused tensors on stderr.
    let short = dir.path().join("short");
    std::fs::create_dir(&short).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        short.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(short.join("config.json"), cfg.to_string()).unwrap();
    let o = lcc(&[
        "exec",
        s(&short),
        "--inputs",
        s(&tiny().join("inputs_s7.safetensors")),
        "-o",
        s(&dir.path().join("o.safetensors")),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("warning:") && t.contains("9 tensors") && t.contains("model.layers.1."),
        "{t}"
    );
    // A diverged (NaN) adapter is not merged into a NaN model.
    let adapter = dir.path().join("nan-adapter");
    std::fs::create_dir(&adapter).unwrap();
    let peft = fixtures().join("peft/adapter");
    std::fs::copy(
        peft.join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors = lcc::hf::read_tensors(&peft.join("adapter_model.safetensors")).unwrap();
    if let lcc::ir::TensorData::F32(v) = &mut tensors[0].1.data {
        v[3] = f32::NAN;
    }
    lcc::hf::write_tensors(&adapter.join("adapter_model.safetensors"), &tensors).unwrap();
    refused(
        &[
            "merge",
            s(&src),
            "--adapter",
            s(&adapter),
            "-o",
            s(&dir.path().join("merged")),
        ],
        &["non-finite", &tensors[0].0],
    );
    assert!(!dir.path().join("merged").exists());
    // An opset that ONNX does not define.
    let model = lcc::onnx::load(&tiny().join(EXPORTS[0])).unwrap();
    let mut g = model.clone();
    g.meta.opsets = vec![(String::new(), 99)];
    let bad = dir.path().join("opset99.onnx");
    lcc::onnx::save(&g, &bad, &Default::default()).unwrap();
    refused(&["inspect", s(&bad)], &["opset 99"]);
}

#[test]
fn data_walks_follow_no_loop_and_read_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), "x".repeat(600)).unwrap();
    std::os::unix::fs::symlink(&data, data.join("loop")).unwrap();
    std::os::unix::fs::symlink(data.join("a.txt"), data.join("again.txt")).unwrap();
    let ds = lcc::train::data::load(
        &[data.clone(), data.join("a.txt")],
        &[],
        &lcc::train::tokenizer::Tokenizer::bytes(),
        &lcc::train::data::DataOptions {
            seq_len: 32,
            valid_fraction: 0.0,
            seed: 1,
            token_width: lcc::train::data::TokenWidth::U16,
            vocab_size: 256,
        },
    )
    .unwrap();
    // One document of 600 bytes, not the same file over and over.
    assert_eq!((ds.stats.docs, ds.stats.tokens), (1, 600), "{:?}", ds.stats);
    // A FIFO named like a text file is refused, not waited on.
    let made = std::process::Command::new("mkfifo")
        .arg(data.join("pipe.txt"))
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let out = dir.path().join("run");
        refused_within(
            &train(s(&data), s(&out), "1", &[]),
            &["pipe.txt", "not a regular file"],
            30,
        );
    }
}

#[test]
fn a_failed_write_leaves_nothing_behind_and_names_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny().join("hf");
    let no_tmp = |d: &Path| {
        let left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("lcc-tmp"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    // An HF dir onto an existing regular file.
    let file = dir.path().join("taken");
    std::fs::write(&file, "keep me").unwrap();
    refused(
        &["convert", s(&hf), "-o", s(&file)],
        &["taken", "not a directory"],
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    no_tmp(dir.path());
    // An existing model dir whose weights file is in the way (a directory):
    // the move fails, the staging dir goes, the error names the output.
    let target = dir.path().join("model");
    std::fs::create_dir_all(target.join("model.safetensors")).unwrap();
    let o = lcc(&["convert", s(&hf), "-o", s(&target)]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains(s(&target.join("model.safetensors"))), "{t}");
    assert!(!t.contains("lcc-tmp"), "{t}");
    no_tmp(dir.path());
    // Under a path that is a file: the OS error is printed once, with the
    // output's name.
    let o = lcc(&["convert", s(&hf), "-o", s(&file.join("x.onnx"))]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("taken/x.onnx") && !t.contains("lcc-tmp"), "{t}");
    assert_eq!(t.matches("Not a directory").count(), 1, "{t}");
    no_tmp(dir.path());
}

#[test]
fn graph_sizes_are_refused_before_allocating() {
    use lcc::ir::{DType, Graph, Op, TensorType};
    let dir = tempfile::tempdir().unwrap();
    // A MatMul whose output would take 160 GB.
    let mut g = Graph::new();
    let a = g.add_input("a", TensorType::fixed(DType::F32, &[200_000, 1]));
    let b = g.add_input("b", TensorType::fixed(DType::F32, &[1, 200_000]));
    let y = g.add("mm", Op::MatMul, &[a, b], None).unwrap();
    g.outputs.push(("y".into(), y));
    let model = dir.path().join("mm.onnx");
    lcc::onnx::save(&g, &model, &Default::default()).unwrap();
    let inputs = dir.path().join("ab.safetensors");
    let ones = lcc::ir::Tensor::f32(vec![200_000, 1], vec![1.0; 200_000]);
    let row = lcc::ir::Tensor::f32(vec![1, 200_000], vec![1.0; 200_000]);
    lcc::hf::write_tensors(&inputs, &[("a".into(), ones), ("b".into(), row)]).unwrap();
    let out = dir.path().join("y.safetensors");
    refused_within(
        &["exec", s(&model), "--inputs", s(&inputs), "-o", s(&out)],
        &["'mm'", "MatMul output [200000, 200000]", "memory"],
        30,
    );
    // Tokens past what --max-memory allows: the embedding output is refused.
    let n = 1_000_000usize;
    let ids = lcc::ir::Tensor::i64(vec![1, n], vec![1; n]);
    let ids_file = dir.path().join("ids.safetensors");
    lcc::hf::write_tensors(&ids_file, &[("input_ids".into(), ids)]).unwrap();
    refused_within(
        &[
            "exec",
            s(&tiny().join("hf")),
            "--inputs",
            s(&ids_file),
            "-o",
            s(&out),
            "--max-memory",
            "200M",
        ],
        &["Embedding output [1, 1000000, ", "--max-memory 200.0 MiB"],
        30,
    );
    // Lengths and counts whose KV cache cannot fit.
    let hf = tiny().join("hf");
    refused_within(
        &["eval", "passkey", s(&hf), "--lengths", "1000000000"],
        &["--lengths 1000000000", "memory"],
        30,
    );
    for n in ["1000000000000", "18446744073709551615"] {
        refused_within(
            &["generate", s(&hf), "--prompt", "Hi", "--max-new-tokens", n],
            &[&format!("--max-new-tokens {n}"), "memory"],
            30,
        );
    }
    assert!(!out.exists());
}

#[test]
fn a_ten_thousand_layer_model_builds_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 256, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 10000,
            "num_attention_heads": 2, "max_position_embeddings": 256}"#,
    )
    .unwrap();
    // A shape-only model (config.json alone). 10,000 layers took 127 s when
    // building was quadratic; linear, it is well under a second, so a bound
    // of 20 s catches a regression without timing the machine.
    let start = Instant::now();
    let o = lcc(&["inspect", s(dir.path())]);
    let took = start.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains("90003 weights"), "{}", stdout(&o));
    eprintln!("inspect of 10,000 layers: {took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
}
