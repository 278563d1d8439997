//! Helpers shared by the integration tests.
#![allow(dead_code)]

use lcc::ir::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny() -> PathBuf {
    fixtures().join("tiny")
}

/// The three torch exports of the tiny model.
pub const EXPORTS: [&str; 3] = [
    "tiny_opset17_torchscript.onnx",
    "tiny_opset20_dynamo.onnx",
    "tiny_opset23_dynamo_sdpa.onnx",
];

pub fn read(path: &Path) -> HashMap<String, Tensor> {
    lcc::hf::read_tensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A Python with onnx and onnxruntime: `LCC_PYTHON`, else `python3` if it
/// can import both. With `LCC_REQUIRE_PYTHON=1` (CI) a missing one fails the
/// test instead of skipping the cross-check.
pub fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("LCC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let ok = Command::new(&candidate)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(candidate);
    }
    if std::env::var("LCC_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!(
            "LCC_REQUIRE_PYTHON=1 but {} cannot import onnx, onnxruntime and numpy",
            candidate.display()
        );
    }
    eprintln!("note: skipping the onnxruntime cross-check (no python with onnx + onnxruntime; set LCC_PYTHON)");
    None
}

/// Runs tests/check_onnx.py: onnx.checker on `model`, then onnxruntime on
/// `inputs`, compared with `expected` within `tol`. Panics with its output.
pub fn check_with_onnxruntime(py: &Path, model: &Path, inputs: &Path, expected: &Path, tol: f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_onnx.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(model)
        .arg(inputs)
        .arg(expected)
        .arg(tol.to_string())
        .output()
        .expect("running python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "onnxruntime check of {} failed:\n{text}",
        model.display()
    );
    eprintln!("{}", text.trim());
}

/// Runs a YAML pipeline `recipe` without raising on demand (`--no-raise`)
/// and returns its error.
pub fn run_no_raise(graph: &mut lcc::ir::Graph, recipe: &str) -> String {
    lcc::passes::Pipeline::from_yaml_str(recipe, Path::new("test.yaml"))
        .unwrap()
        .run(
            graph,
            &lcc::passes::RunOptions {
                verify: true,
                no_raise: true,
            },
            |_, _| {},
        )
        .unwrap_err()
        .to_string()
}

/// Runs the `lcc` binary with `args`.
pub fn lcc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lcc"))
        .args(args)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Both streams, labelled, for assertion messages.
pub fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o))
}

/// About 17 KB of generated English-like lines in `dir/text.txt` (training
/// data for short runs).
pub fn generated_text(dir: &Path) -> PathBuf {
    let body: String = (0..300)
        .map(|i| format!("Line {i}: the quick brown fox jumps over the lazy dog.\n"))
        .collect();
    let path = dir.join("text.txt");
    std::fs::write(&path, body).unwrap();
    path
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every line of a run directory's `metrics.jsonl`, parsed.
pub fn metrics_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
