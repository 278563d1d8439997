//! The command line as users run it: output, files, exit codes.

mod common;

use common::*;

const TINY_PARAMS: u64 =
    2 * 256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64;

#[test]
fn inspect_summarises_an_hf_dir() {
    let hf = tiny().join("hf");
    let o = lcc(&["inspect", hf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("format:     Hugging Face directory"),
        "{text}"
    );
    assert!(text.contains("input_ids"), "{text}");
    assert!(text.contains("i64[batch,seq]"), "{text}");
    assert!(text.contains("f32[batch,seq,256]"), "{text}");
    assert!(text.contains("parameters: 106,816"), "{text}");

    let o = lcc(&["inspect", hf.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format"], "hf");
    assert_eq!(v["parameters"], TINY_PARAMS);
    assert_eq!(v["parameter_bytes"], TINY_PARAMS * 4);
    assert_eq!(v["inputs"][0]["name"], "input_ids");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!(["batch", "seq"]));
    assert_eq!(
        v["outputs"][0]["shape"],
        serde_json::json!(["batch", "seq", 256])
    );
    assert_eq!(v["ops"]["Attention"], 2);
    assert_eq!(v["ops"]["Linear"], 15);
    assert_eq!(v["weight_dtypes"]["f32"], TINY_PARAMS);
}

#[test]
fn inspect_summarises_an_onnx_export_and_prints_canonical_ir() {
    let m = tiny().join(EXPORTS[0]);
    let o = lcc(&["inspect", m.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format"], "onnx");
    assert_eq!(v["ir_version"], 8);
    assert_eq!(v["opsets"][0]["version"], 17);
    assert_eq!(v["parameters"], TINY_PARAMS);
    assert_eq!(v["ops"]["MatMul"], 19);

    let a = lcc(&["inspect", m.to_str().unwrap(), "--print"]);
    let b = lcc(&["inspect", m.to_str().unwrap(), "--print"]);
    assert!(a.status.success());
    assert!(
        stdout(&a).starts_with("graph {\n  input %input_ids: i64[batch,seq]\n"),
        "{}",
        stdout(&a)
    );
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn exec_writes_logits_matching_torch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    for model in [tiny().join("hf"), tiny().join(EXPORTS[1])] {
        let o = lcc(&[
            "exec",
            model.to_str().unwrap(),
            "--inputs",
            tiny().join("inputs_s16.safetensors").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let got = read(&out);
        let want = read(&tiny().join("logits_s16.safetensors"));
        assert!(max_abs_diff(&got["logits"], &want["logits"]) <= 1e-4);
    }
}

#[test]
fn exec_names_a_missing_input() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("none.safetensors");
    lcc::hf::write_tensors(
        &empty,
        &[("other".into(), lcc::ir::Tensor::scalar_f32(1.0))],
    )
    .unwrap();
    let o = lcc(&[
        "exec",
        tiny().join("hf").to_str().unwrap(),
        "--inputs",
        empty.to_str().unwrap(),
        "-o",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("input_ids"), "{}", stderr(&o));
}

#[test]
fn diff_graph_exit_codes_follow_diff() {
    let hf = tiny().join("hf");
    let ts = tiny().join(EXPORTS[0]);
    let o = lcc(&["diff-graph", hf.to_str().unwrap(), hf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("graphs are equal"));

    let o = lcc(&[
        "diff-graph",
        hf.to_str().unwrap(),
        ts.to_str().unwrap(),
        "--no-color",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("nodes:"), "{text}");
    assert!(text.contains("weights:"), "{text}");
    assert!(text.contains("\n+++ "), "{text}");
    assert!(!text.contains("\x1b["), "colour without a terminal");

    let o = lcc(&[
        "diff-graph",
        hf.to_str().unwrap(),
        ts.to_str().unwrap(),
        "--stat",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!stdout(&o).contains("\n+++ "));

    let o = lcc(&[
        "diff-graph",
        hf.to_str().unwrap(),
        "/nonexistent/model.onnx",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/model.onnx"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn convert_moves_between_hf_and_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("tiny.onnx");
    let back = dir.path().join("tiny-hf");
    let hf = tiny().join("hf");
    let o = lcc(&[
        "convert",
        hf.to_str().unwrap(),
        "-o",
        onnx.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lcc(&[
        "convert",
        onnx.to_str().unwrap(),
        "-o",
        back.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(back.join("config.json").is_file());
    let o = lcc(&["diff-graph", hf.to_str().unwrap(), back.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));

    // A torch export carries no Hugging Face names for its projections.
    let o = lcc(&[
        "convert",
        tiny().join(EXPORTS[0]).to_str().unwrap(),
        "-o",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("LLaMA"), "{}", stderr(&o));
}

#[test]
fn merge_writes_a_model_with_peft_logits_and_rewrite_explains_its_passes() {
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    let hf = tiny().join("hf");
    let adapter = fixtures().join("peft/adapter");
    let o = lcc(&[
        "merge",
        hf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out.safetensors");
    let o = lcc(&[
        "exec",
        merged.to_str().unwrap(),
        "--inputs",
        tiny().join("inputs_s7.safetensors").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = read(&fixtures().join("peft/logits_s7.safetensors"));
    assert!(max_abs_diff(&read(&out)["logits"], &want["logits"]) <= 1e-4);

    // LoRA branches have no place in a Hugging Face dir: a clear error.
    let o = lcc(&[
        "rewrite",
        hf.to_str().unwrap(),
        "--passes",
        "lora",
        "-o",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("merge-lora"), "{}", stderr(&o));

    let o = lcc(&[
        "rewrite",
        hf.to_str().unwrap(),
        "--passes",
        "pi,lora,merge-lora",
        "--set",
        "pi.factor=2",
        "--explain",
        "-o",
        dir.path().join("y").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("pi: matched 4"), "{err}");
    assert!(err.contains("lora: matched 8"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("y/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["max_position_embeddings"], 512);

    let o = lcc(&[
        "rewrite",
        hf.to_str().unwrap(),
        "--passes",
        "frobnicate",
        "-o",
        "/tmp/never",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown pass 'frobnicate'"),
        "{}",
        stderr(&o)
    );
}
