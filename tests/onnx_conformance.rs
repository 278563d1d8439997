//! ONNX conformance: every node test case in tests/fixtures/onnx-node (made
//! offline by tests/fixtures/gen/collect_onnx_node_tests.py from the onnx
//! package) runs through the importer and the CPU executor. The expectations
//! file lists each case as `pass` or `not-yet` with the reason; any drift in
//! either direction fails the test. Run with `LCC_BLESS=1` to rewrite it
//! after a deliberate change.

mod common;

use lcc::ir::{DType, Tensor};
use lcc::runtime::{cpu::CpuBackend, Backend};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const EXPECTATIONS: &str = "tests/onnx_conformance.expect";

fn numbered(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name
                        .strip_prefix(prefix)?
                        .strip_suffix(".pb")?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

fn close(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.shape != want.shape {
        return Err(format!("shape {:?}, expected {:?}", got.shape, want.shape));
    }
    if got.dtype != want.dtype {
        return Err(format!("dtype {}, expected {}", got.dtype, want.dtype));
    }
    // onnx's backend tests use rtol 1e-3; half-precision results may differ
    // from the reference by one rounding of their own precision.
    let rtol = match want.dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-3,
    };
    let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-5 + rtol * y.abs();
        if !ok {
            return Err(format!("element {i}: {x} vs expected {y}"));
        }
    }
    Ok(())
}

/// Runs one case; Ok(()) when every output matches.
fn run_case(dir: &Path) -> Result<(), String> {
    let graph = lcc::onnx::load(&dir.join("model.onnx")).map_err(|e| format!("import: {e}"))?;
    let data = dir.join("test_data_set_0");
    let inputs = numbered(&data, "input_");
    let outputs = numbered(&data, "output_");
    let mut feeds = HashMap::new();
    for (i, path) in inputs.iter().enumerate() {
        let t = lcc::onnx::read_tensor_file(path).map_err(|e| format!("input: {e}"))?;
        let Some(&node) = graph.inputs.get(i) else {
            return Err(format!(
                "test data has input {i}, the graph has {}",
                graph.inputs.len()
            ));
        };
        feeds.insert(graph.node(node).outputs[0].name.clone(), t);
    }
    let got = CpuBackend::with_threads(1)
        .run(&graph, &feeds)
        .map_err(|e| format!("run: {e}"))?;
    for (i, path) in outputs.iter().enumerate() {
        let want =
            lcc::onnx::read_tensor_file(path).map_err(|e| format!("expected output: {e}"))?;
        let name = &graph.outputs[i].0;
        let t = got.get(name).ok_or_else(|| format!("no output '{name}'"))?;
        close(t, &want).map_err(|e| format!("output '{name}': {e}"))?;
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    let s = s.replace(['\n', '\t'], " ");
    if s.len() > 160 {
        let mut end = 160;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s
    }
}

#[test]
fn onnx_node_tests_match_expectations() {
    let root = common::fixtures().join("onnx-node");
    let cases: Vec<String> = std::fs::read_to_string(root.join("CASES.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let mut results: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    for case in &cases {
        let dir = root.join(case);
        let r = std::panic::catch_unwind(|| run_case(&dir)).unwrap_or_else(|_| Err("PANIC".into()));
        results.insert(case.clone(), r);
    }
    let panics: Vec<&String> = results
        .iter()
        .filter(|(_, r)| matches!(r, Err(e) if e == "PANIC"))
        .map(|(c, _)| c)
        .collect();
    assert!(
        panics.is_empty(),
        "cases panicked (must be errors): {panics:?}"
    );

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = String::from(
        "# ONNX node test cases: `pass`, or `not-yet` and why. Checked by tests/onnx_conformance.rs;\n# regenerate with LCC_BLESS=1 cargo test --test onnx_conformance after a deliberate change.\n",
    );
    for (case, r) in &results {
        match r {
            Ok(()) => text.push_str(&format!("{case}\tpass\n")),
            Err(e) => {
                // Paths differ between checkouts; the reason names the case already.
                let e = e.replace(&format!("{}/{case}/", root.display()), "");
                text.push_str(&format!("{case}\tnot-yet\t{}\n", one_line(&e)))
            }
        }
    }
    let passed = results.values().filter(|r| r.is_ok()).count();
    eprintln!("ONNX node tests: {passed} of {} pass", results.len());
    if std::env::var("LCC_BLESS").as_deref() == Ok("1") {
        std::fs::write(manifest.join(EXPECTATIONS), &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(manifest.join(EXPECTATIONS))
        .expect("tests/onnx_conformance.expect is missing; run with LCC_BLESS=1 to create it");
    let status = |t: &str| -> BTreeMap<String, String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let mut parts = l.split('\t');
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect()
    };
    let (want, got) = (status(&expected), status(&text));
    let mut drift = Vec::new();
    for (case, s) in &got {
        match want.get(case) {
            Some(w) if w == s => {}
            Some(w) => drift.push(format!(
                "{case}: expected {w}, now {s} ({:?})",
                results[case]
            )),
            None => drift.push(format!("{case}: not in the expectations file")),
        }
    }
    for case in want.keys() {
        if !got.contains_key(case) {
            drift.push(format!("{case}: in the expectations file but not run"));
        }
    }
    assert!(drift.is_empty(), "conformance drift:\n{}", drift.join("\n"));
}
