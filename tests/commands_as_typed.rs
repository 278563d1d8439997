//! The documented commands, typed as a user types them on the files users
//! have: torch's own ONNX exports (raised on demand), models that do not
//! record their context (no guess), exports that cannot hold a rewrite (an
//! error, never a silent drop), bf16 checkpoints (computed in f32), and the
//! release step `merge --run`.

mod common;

use common::*;
use lcc::ir::{DType, Graph, Tensor, Weight};
use lcc::runtime::{Backend, ComputeDType, CpuBackend};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

fn ok(args: &[&str]) -> Output {
    let o = lcc(args);
    assert!(o.status.success(), "lcc {}: {}", args.join(" "), text(&o));
    o
}

/// Exit code 2 and stderr containing every one of `needles`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let o = lcc(args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "lcc {}: {t}", args.join(" "));
    for n in needles {
        assert!(
            t.contains(n),
            "lcc {}: expected {n:?} in {t}",
            args.join(" ")
        );
    }
}

/// `lcc rewrite MODEL --passes PASSES --set S… -o OUT` as an argument list.
fn rewrite_args(model: &str, passes: &str, sets: &[&str], out: &str) -> Vec<String> {
    let mut args: Vec<String> = ["rewrite", model, "--passes", passes]
        .map(String::from)
        .to_vec();
    for set in sets {
        args.extend(["--set".into(), set.to_string()]);
    }
    args.extend(["-o".into(), out.into()]);
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn export(name: &str) -> String {
    tiny().join(name).to_string_lossy().into_owned()
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.to_f64_vec().iter().fold(0.0f64, |m, x| m.max(x.abs()));
    max_abs_diff(a, b) / scale.max(1e-30)
}

fn logits_of(graph: &Graph, inputs: &Path) -> Tensor {
    let out = CpuBackend::new().run(graph, &read(inputs)).unwrap();
    out["logits"].clone()
}

fn logits_of_file(model: &Path, inputs: &Path) -> Tensor {
    logits_of(&lcc::model::load(model).unwrap(), inputs)
}

fn rope(file: &str) -> PathBuf {
    fixtures().join("rope").join(file)
}

#[test]
fn the_headline_command_works_on_every_torch_export() {
    let dir = tempfile::tempdir().unwrap();
    let hf_out = dir.path().join("hf_train.onnx");
    ok(&[
        "rewrite",
        s(&tiny().join("hf")),
        "--passes",
        "pi,s2attn,lora",
        "--set",
        "pi.factor=4",
        "-o",
        s(&hf_out),
    ]);
    let want = logits_of_file(&hf_out, &rope("inputs_s16.safetensors"));
    for name in EXPORTS {
        let out = dir.path().join(format!("{name}.train.onnx"));
        let o = ok(&[
            "rewrite",
            &export(name),
            "--passes",
            "pi,s2attn,lora",
            "--set",
            "pi.factor=4",
            "-o",
            s(&out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("ran 'raise' first") && err.contains("--no-raise"),
            "{name}: the raise is announced in one line: {err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.starts_with("note:")).count(),
            1,
            "{err}"
        );
        // The S²-Attn + LoRA model of the raised export computes what the
        // same rewrite of the Hugging Face checkpoint computes.
        let got = logits_of_file(&out, &rope("inputs_s16.safetensors"));
        let d = rel_diff(&got, &want);
        eprintln!("{name}: pi,s2attn,lora vs the same rewrite of the HF dir: {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

#[test]
fn scaled_torch_exports_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], &[usize]); 3] = [
        ("linear", &["pi.factor=4"], &[16]),
        (
            "yarn",
            &[
                "pi.scaling=yarn",
                "pi.target_len=1024",
                "pi.original_max_position_embeddings=256",
            ],
            &[16, 300],
        ),
        (
            "dynamic",
            &[
                "pi.scaling=dynamic",
                "pi.factor=4",
                "pi.original_max_position_embeddings=256",
            ],
            &[16, 300],
        ),
    ];
    for name in EXPORTS {
        for (case, sets, seqs) in cases {
            let out = dir.path().join(format!("{name}.{case}.onnx"));
            ok(&strs(&rewrite_args(&export(name), "pi", sets, s(&out))));
            let g = lcc::model::load(&out).unwrap();
            for &seq in seqs {
                let want = read(&rope(&format!("logits_{case}_s{seq}.safetensors")));
                let got = logits_of(&g, &rope(&format!("inputs_s{seq}.safetensors")));
                let d = rel_diff(&got, &want["logits"]);
                eprintln!("{name} {case} seq {seq}: vs transformers {d:.2e}");
                assert!(d < 1e-4, "{name} {case} seq {seq}: {d}");
            }
        }
    }
}

#[test]
fn no_raise_keeps_the_old_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &[
            "rewrite",
            &export(EXPORTS[0]),
            "--passes",
            "s2attn",
            "--no-raise",
            "-o",
            s(&dir.path().join("x.onnx")),
        ],
        &["pass 's2attn'", "primitive ONNX", "'raise'"],
    );
    fails_with(
        &[
            "merge",
            &export(EXPORTS[0]),
            "--adapter",
            s(&fixtures().join("peft/adapter")),
            "--no-raise",
            "-o",
            s(&dir.path().join("m.onnx")),
        ],
        &["primitive ONNX", "--no-raise"],
    );
}

#[test]
fn merge_works_on_every_torch_export() {
    let dir = tempfile::tempdir().unwrap();
    let want = read(&fixtures().join("peft/merged_logits_s7.safetensors"));
    for name in EXPORTS {
        let out = dir.path().join(format!("{name}.merged.onnx"));
        ok(&[
            "merge",
            &export(name),
            "--adapter",
            s(&fixtures().join("peft/adapter")),
            "-o",
            s(&out),
        ]);
        let got = logits_of_file(&out, &tiny().join("inputs_s7.safetensors"));
        let d = rel_diff(&got, &want["logits"]);
        eprintln!("{name}: merged vs PEFT merge_and_unload: {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// The loss of each step of a short run-train, from metrics.jsonl.
fn run_losses(model: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<f64> {
    let mut args = vec![
        "run-train",
        "--model",
        model,
        "--pipeline",
        "longlora-train",
        "--set",
        "pi.target_len=1024",
        "--data",
        s(data),
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--threads",
        "2",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    metrics_lines(out)
        .iter()
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[test]
fn run_train_on_torch_exports_trains_like_the_hf_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_text(dir.path());
    let want = run_losses(s(&tiny().join("hf")), &data, &dir.path().join("hf"), &[]);
    assert_eq!(want.len(), 2);
    for name in EXPORTS {
        // The export records no context: target_len needs it spelt out.
        let o = lcc(&[
            "run-train",
            "--model",
            &export(name),
            "--pipeline",
            "longlora-train",
            "--set",
            "pi.target_len=1024",
            "--data",
            s(&data),
            "--seq-len",
            "32",
            "--steps",
            "1",
            "--out",
            s(&dir.path().join("refused")),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            text(&o).contains("pi.original_max_position_embeddings"),
            "{}",
            text(&o)
        );
        let got = run_losses(
            &export(name),
            &data,
            &dir.path().join(name),
            &["--set", "pi.original_max_position_embeddings=256"],
        );
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                ((g - w) / w).abs() < 1e-4,
                "{name}: losses {got:?} vs the HF dir's {want:?}"
            );
        }
    }
}

#[test]
fn a_context_the_model_does_not_record_is_never_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("x.onnx")).to_string();
    for name in EXPORTS {
        for sets in [
            &["pi.scaling=yarn", "pi.factor=4"][..],
            &["pi.scaling=llama3", "pi.factor=4"],
            &["pi.scaling=dynamic", "pi.factor=4"],
            &["pi.target_len=1024"],
        ] {
            fails_with(
                &strs(&rewrite_args(&export(name), "raise,pi", sets, &out)),
                &["pass 'pi'", "pi.original_max_position_embeddings"],
            );
        }
    }
    // A torch export raised and saved as an HF dir keeps not knowing it:
    // its config.json has no max_position_embeddings, and pi still asks.
    let raised = dir.path().join("raised");
    ok(&[
        "rewrite",
        &export(EXPORTS[1]),
        "--passes",
        "raise",
        "-o",
        s(&raised),
    ]);
    let cfg = std::fs::read_to_string(raised.join("config.json")).unwrap();
    assert!(!cfg.contains("max_position_embeddings"), "{cfg}");
    fails_with(
        &[
            "rewrite",
            s(&raised),
            "--passes",
            "pi",
            "--set",
            "pi.target_len=1024",
            "-o",
            s(&dir.path().join("y")),
        ],
        &["pi.original_max_position_embeddings"],
    );
}

#[test]
fn an_export_that_cannot_hold_the_rewrite_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny().join("hf");
    let hf = s(&hf);
    // S²-Attn: an HF dir would run full attention.
    fails_with(
        &[
            "rewrite",
            hf,
            "--passes",
            "s2attn",
            "-o",
            s(&dir.path().join("s2")),
        ],
        &["S²-Attn", "s2attn.inference=true", "*.onnx"],
    );
    assert!(!dir.path().join("s2").exists(), "nothing is written");
    // ... while ONNX keeps it (and says so in its metadata, so converting
    // that ONNX to an HF dir refuses too), and inference=true gives a
    // plain HF dir.
    let s2_onnx = dir.path().join("s2.onnx");
    ok(&["rewrite", hf, "--passes", "s2attn", "-o", s(&s2_onnx)]);
    fails_with(
        &["convert", s(&s2_onnx), "-o", s(&dir.path().join("s2-hf"))],
        &["S²-Attn", "config.json cannot express"],
    );
    ok(&[
        "rewrite",
        hf,
        "--passes",
        "s2attn",
        "--set",
        "s2attn.inference=true",
        "-o",
        s(&dir.path().join("full")),
    ]);
    // Unmerged LoRA.
    fails_with(
        &[
            "rewrite",
            hf,
            "--passes",
            "lora",
            "-o",
            s(&dir.path().join("lora")),
        ],
        &["LoRA branches", "merge-lora"],
    );
    // A training graph, to either format.
    for out in ["train", "train.onnx"] {
        fails_with(
            &[
                "rewrite",
                hf,
                "--passes",
                "lora,autodiff",
                "-o",
                s(&dir.path().join(out)),
            ],
            &["training"],
        );
    }
    // A torch export whose blocks were not all raised: the primitive rest
    // would be lost from an HF dir.
    let mut g = lcc::model::load(&tiny().join(EXPORTS[0])).unwrap();
    lcc::passes::ensure_llama_level(&mut g, "test").unwrap();
    let logits = g.outputs[0].1;
    let negated = g
        .add(
            "extra_scale",
            lcc::ir::Op::Unary(lcc::ir::UnaryOp::Neg),
            &[logits],
            None,
        )
        .unwrap();
    g.outputs[0].1 = negated;
    let e = lcc::hf::save(&g, &dir.path().join("partial"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("extra_scale") && e.contains("ONNX"), "{e}");
}

/// `models/tiny` (a bf16 checkpoint) with every weight widened to f32.
fn widened_copy(src: &Path, dst: &Path) {
    let g = lcc::hf::load(src).unwrap();
    let mut f32 = g.clone();
    for w in g.weights.iter() {
        let mut t = w.to_tensor().unwrap();
        if t.dtype == DType::BF16 {
            t.dtype = DType::F32;
        }
        f32.weights
            .insert(Weight::from_tensor(w.name.clone(), &t, w.trainable));
    }
    lcc::hf::save(&f32, dst).unwrap();
}

#[test]
fn a_bf16_checkpoint_computes_in_f32_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let bf16 = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    assert_eq!(
        lcc::hf::load(&bf16)
            .unwrap()
            .weights
            .iter()
            .next()
            .unwrap()
            .dtype,
        DType::BF16
    );
    let f32_dir = dir.path().join("f32");
    widened_copy(&bf16, &f32_dir);
    let inputs = dir.path().join("ids.safetensors");
    let ids: Vec<i64> = "It is a truth universally acknowledged"
        .bytes()
        .map(i64::from)
        .collect();
    lcc::hf::write_tensors(
        &inputs,
        &[("input_ids".into(), Tensor::i64(vec![1, ids.len()], ids))],
    )
    .unwrap();
    let run = |model: &Path, extra: &[&str]| -> Tensor {
        let out = dir.path().join("out.safetensors");
        let mut args = vec!["exec", s(model), "--inputs", s(&inputs), "-o", s(&out)];
        args.extend_from_slice(extra);
        ok(&args);
        read(&out).remove("logits").unwrap()
    };
    let f32_ref = run(&f32_dir, &[]);
    let default = run(&bf16, &[]);
    assert_eq!(
        default.dtype,
        DType::F32,
        "outputs come in the compute dtype"
    );
    let d = rel_diff(&default, &f32_ref);
    eprintln!("bf16 checkpoint, default compute vs f32 forward over its weights: {d:.2e}");
    assert!(d < 1e-4, "{d}");
    let half = run(&bf16, &["--compute-dtype", "bf16"]);
    assert_eq!(half.dtype, DType::BF16);
    let d_half = rel_diff(&half, &f32_ref);
    eprintln!("--compute-dtype bf16 vs the f32 forward: {d_half:.2e}");
    assert!(d_half > 1e-3, "a bf16 forward rounds: {d_half}");

    // The library path the commands share: the same numbers.
    let g = lcc::hf::load(&bf16).unwrap();
    let lib: HashMap<String, Tensor> = CpuBackend::new()
        .with_compute_dtype(ComputeDType::F32)
        .run(&g, &read(&inputs))
        .unwrap();
    assert_eq!(lib["logits"], default);
}

#[test]
fn merge_run_is_the_release_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_text(dir.path());
    let run = dir.path().join("run");
    let base = tiny().join("hf");
    run_losses(s(&base), &data, &run, &[]);
    let merged = dir.path().join("merged");
    ok(&["merge", s(&base), "--run", s(&run), "-o", s(&merged)]);
    // config.json says how to read the positions, as transformers reads it.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["max_position_embeddings"], 1024, "{cfg}");
    // In the form the base's config was written in (transformers 5 here).
    let scaling = if cfg["rope_scaling"].is_object() {
        &cfg["rope_scaling"]
    } else {
        &cfg["rope_parameters"]
    };
    assert_eq!(scaling["rope_type"], "linear", "{cfg}");
    assert_eq!(scaling["factor"], 4.0, "{cfg}");
    // The merged model computes what the run evaluates to (`eval --run`).
    let mut unmerged = lcc::model::load(&base).unwrap();
    lcc::merge::apply_run(&mut unmerged, &run).unwrap();
    let inputs = rope("inputs_s300.safetensors");
    let want = logits_of(&unmerged, &inputs);
    let got = logits_of_file(&merged, &inputs);
    let d = rel_diff(&got, &want);
    eprintln!("merge --run vs the run applied unmerged: {d:.2e}");
    assert!(d < 1e-4, "{d}");
    // And differs from the base: the run did train.
    assert!(rel_diff(&logits_of_file(&base, &inputs), &want) > 1e-4);
    fails_with(
        &[
            "merge",
            s(&base),
            "--run",
            s(dir.path()),
            "-o",
            s(&dir.path().join("m2")),
        ],
        &["run.yaml"],
    );
}

#[test]
fn a_block_raise_cannot_match_is_named_by_layer_and_part() {
    use lcc::ir::{Op, UnaryOp};
    for name in EXPORTS {
        let mut g = lcc::model::load(&tiny().join(name)).unwrap();
        // The second layer's SiLU becomes something else: its MLP no longer
        // reads as SwiGLU.
        let sigmoids: Vec<_> = g
            .topo_order()
            .unwrap()
            .into_iter()
            .filter(|&n| g.node(n).op == Op::Unary(UnaryOp::Sigmoid))
            .collect();
        assert_eq!(sigmoids.len(), 2, "{name}");
        g.node_mut(sigmoids[1]).op = Op::Unary(UnaryOp::Exp);
        let e = lcc::passes::ensure_llama_level(&mut g, "pass 'pi'")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 1") && e.contains("MLP") && e.contains("pass 'pi'"),
            "{name}: {e}"
        );
        assert!(!e.contains("no LLaMA-level Rope"), "{e}");
    }
}
