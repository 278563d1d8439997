//! The `pi` pass: every RoPE scaling against transformers' logits
//! (tests/fixtures/rope, made by tests/fixtures/gen/make_rope_fixtures.py),
//! composition, the HF config it records, its ONNX export in onnxruntime,
//! and its errors.
//!
//! Checked by hand once (not run here, tests never run transformers): the
//! HF dirs lcc saves after `pi` (linear 4, dynamic 4, yarn target 1024,
//! llama3 8 / original 64) load in transformers 5.24 with the same
//! `rope_parameters` and reproduce these goldens exactly.

mod common;

use common::*;
use lcc::ir::{Graph, Op, RopeScaling, Tensor};
use lcc::passes::{Pipeline, Report, RunOptions};
use lcc::runtime::{cpu::CpuBackend, Backend};
use serde_json::{json, Value};
use std::collections::HashMap;

const TOL: f64 = 1e-4;

fn load_tiny() -> Graph {
    lcc::hf::load(&tiny().join("hf")).unwrap()
}

/// Runs `pi` with `key=value` settings; the graph is verified afterwards.
fn run_pi(graph: &mut Graph, sets: &[&str]) -> lcc::Result<Report> {
    let mut p = Pipeline::from_names("pi")?;
    for s in sets {
        p.set(&format!("pi.{s}"))?;
    }
    let mut reports = p.run(
        graph,
        &RunOptions {
            verify: true,
            ..Default::default()
        },
        |_, _| {},
    )?;
    Ok(reports.pop().expect("pi ran"))
}

fn rope_scalings(g: &Graph) -> Vec<RopeScaling> {
    g.g.node_weights()
        .filter_map(|n| match &n.op {
            Op::Rope(r) => Some(r.scaling.clone()),
            _ => None,
        })
        .collect()
}

/// The `Rope{…}` part of the first Rope line of the canonical print.
fn rope_print(g: &Graph) -> String {
    let text = lcc::ir::print(g).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("Rope{"))
        .expect("a Rope line");
    let start = line.find("Rope{").unwrap();
    let end = start + line[start..].find('}').unwrap() + 1;
    line[start..end].to_string()
}

fn logits(g: &Graph, seq: usize) -> Tensor {
    let inputs = read(&fixtures().join(format!("rope/inputs_s{seq}.safetensors")));
    let out: HashMap<String, Tensor> = CpuBackend::new().run(g, &inputs).unwrap();
    out["logits"].clone()
}

fn check_against_transformers(case: &str, sets: &[&str], seqs: &[usize]) -> Graph {
    let mut g = load_tiny();
    let report = run_pi(&mut g, sets).unwrap();
    assert_eq!(report.matched, 4, "{case}: 2 layers × (q, k)");
    for &seq in seqs {
        let want = read(&fixtures().join(format!("rope/logits_{case}_s{seq}.safetensors")));
        let got = logits(&g, seq);
        let d = max_abs_diff(&got, &want["logits"]);
        eprintln!("{case} seq {seq}: max abs diff vs transformers {d:.2e}");
        assert!(d <= TOL, "{case} seq {seq}: max abs diff {d:e} > {TOL:e}");
    }
    g
}

#[test]
fn linear_matches_transformers() {
    let g = check_against_transformers("linear", &["factor=4"], &[16]);
    assert_eq!(
        rope_print(&g),
        "Rope{heads=4, head_dim=16, theta=10000.0, scaling=linear, factor=4.0}"
    );
}

#[test]
fn dynamic_matches_transformers_inside_and_past_the_original_length() {
    let g = check_against_transformers("dynamic", &["scaling=dynamic", "factor=4"], &[16, 300]);
    assert_eq!(
        rope_print(&g),
        "Rope{heads=4, head_dim=16, theta=10000.0, scaling=dynamic, factor=4.0, original_max_position_embeddings=256}"
    );
}

#[test]
fn yarn_matches_transformers() {
    let g = check_against_transformers("yarn", &["scaling=yarn", "target_len=1024"], &[16, 300]);
    assert_eq!(
        rope_print(&g),
        "Rope{heads=4, head_dim=16, theta=10000.0, scaling=yarn, factor=4.0, original_max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0}"
    );
}

#[test]
fn llama3_matches_transformers() {
    let g = check_against_transformers(
        "llama3",
        &[
            "scaling=llama3",
            "factor=8",
            "original_max_position_embeddings=64",
        ],
        &[16],
    );
    assert_eq!(
        rope_print(&g),
        "Rope{heads=4, head_dim=16, theta=10000.0, scaling=llama3, factor=8.0, original_max_position_embeddings=64, low_freq_factor=1.0, high_freq_factor=4.0}"
    );
}

fn config_of(g: &Graph) -> Value {
    serde_json::from_str(g.meta.prop("hf.config").unwrap()).unwrap()
}

#[test]
fn target_lengths_compose_to_the_total_factor() {
    let mut g = load_tiny();
    run_pi(&mut g, &["target_len=512"]).unwrap();
    assert_eq!(rope_scalings(&g)[0], RopeScaling::Linear { factor: 2.0 });
    assert_eq!(config_of(&g)["max_position_embeddings"], json!(512));
    // 256 → 512 → 2048: factor 2048 / 256, not 2048 / 512 (LongLoRA's
    // scripts) nor 2 · 4.
    let r = run_pi(&mut g, &["target_len=2048"]).unwrap();
    assert!(rope_scalings(&g)
        .iter()
        .all(|s| *s == RopeScaling::Linear { factor: 8.0 }));
    assert_eq!(r.matched, 4);
    assert!(
        r.notes[0].contains("linear factor 2 -> linear factor 8")
            && r.notes[0].contains("original context 256, now 2048"),
        "{:?}",
        r.notes
    );
    assert_eq!(config_of(&g)["max_position_embeddings"], json!(2048));
    // The same target again changes nothing.
    let before = lcc::ir::print(&g).unwrap();
    let r = run_pi(&mut g, &["target_len=2048"]).unwrap();
    assert_eq!((r.matched, r.nodes_added, r.nodes_removed), (0, 0, 0));
    assert!(r.notes[0].starts_with("already applied"), "{:?}", r.notes);
    assert_eq!(lcc::ir::print(&g).unwrap(), before);

    // An explicit factor extends the model as it is: 2 · 4 = 8.
    let mut g = load_tiny();
    run_pi(&mut g, &["factor=2"]).unwrap();
    run_pi(&mut g, &["factor=4"]).unwrap();
    assert_eq!(rope_scalings(&g)[0], RopeScaling::Linear { factor: 8.0 });
    assert_eq!(config_of(&g)["max_position_embeddings"], json!(2048));
}

#[test]
fn a_saved_scaled_model_reloads_with_its_original_length() {
    // 4k→8k-style: save the 2× model, load it, extend to 8×.
    let tmp = tempfile::tempdir().unwrap();
    let mut g = load_tiny();
    run_pi(&mut g, &["target_len=512"]).unwrap();
    lcc::hf::save(&g, &tmp.path().join("x2")).unwrap();
    let mut g2 = lcc::hf::load(&tmp.path().join("x2")).unwrap();
    assert_eq!(rope_scalings(&g2)[0], RopeScaling::Linear { factor: 2.0 });
    run_pi(&mut g2, &["target_len=2048"]).unwrap();
    assert_eq!(rope_scalings(&g2)[0], RopeScaling::Linear { factor: 8.0 });
    // Switching kind keeps the total: yarn over the original 256.
    run_pi(&mut g2, &["scaling=yarn", "target_len=2048"]).unwrap();
    assert!(matches!(
        rope_scalings(&g2)[0],
        RopeScaling::Yarn {
            factor: 8.0,
            original_max_position_embeddings: 256,
            ..
        }
    ));
}

fn saved_config(g: &Graph) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    lcc::hf::save(g, &out).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
}

#[test]
fn hf_export_records_the_scaling_as_transformers_reads_it() {
    // The tiny config is in the 5.x form: rope_parameters.
    let mut g = load_tiny();
    run_pi(&mut g, &["target_len=1024"]).unwrap();
    let c = saved_config(&g);
    assert_eq!(
        c["rope_parameters"],
        json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    );
    assert_eq!(c["max_position_embeddings"], json!(1024));
    assert!(c.get("rope_scaling").is_none());

    let mut g = load_tiny();
    run_pi(&mut g, &["scaling=yarn", "factor=4"]).unwrap();
    let c = saved_config(&g);
    assert_eq!(
        c["rope_parameters"],
        json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
               "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0})
    );
    assert_eq!(c["max_position_embeddings"], json!(1024));

    let mut g = load_tiny();
    run_pi(&mut g, &["scaling=llama3", "factor=8"]).unwrap();
    let c = saved_config(&g);
    assert_eq!(
        c["rope_parameters"],
        json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
               "original_max_position_embeddings": 256, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    );
    assert_eq!(c["max_position_embeddings"], json!(2048));

    // Dynamic NTK reads the pretraining length from max_position_embeddings.
    let mut g = load_tiny();
    run_pi(&mut g, &["scaling=dynamic", "factor=4"]).unwrap();
    let c = saved_config(&g);
    assert_eq!(
        c["rope_parameters"],
        json!({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    );
    assert_eq!(c["max_position_embeddings"], json!(256));

    // The 4.x form: rope_scaling with both type keys, rope_theta beside it.
    let tmp = tempfile::tempdir().unwrap();
    let v4 = tmp.path().join("v4");
    std::fs::create_dir(&v4).unwrap();
    std::fs::copy(tiny().join("config_v4.json"), v4.join("config.json")).unwrap();
    std::fs::copy(
        tiny().join("hf/model.safetensors"),
        v4.join("model.safetensors"),
    )
    .unwrap();
    let mut g = lcc::hf::load(&v4).unwrap();
    run_pi(&mut g, &["target_len=2048"]).unwrap();
    let c = saved_config(&g);
    assert_eq!(
        c["rope_scaling"],
        json!({"type": "linear", "rope_type": "linear", "factor": 8.0})
    );
    assert_eq!(c["max_position_embeddings"], json!(2048));
    assert_eq!(c["rope_theta"], json!(10000.0));
}

#[test]
fn onnx_export_of_the_rewritten_model_matches_lcc_in_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], usize); 4] = [
        ("linear", &["factor=4"], 16),
        ("dynamic", &["scaling=dynamic", "factor=4"], 300),
        ("yarn", &["scaling=yarn", "factor=4"], 300),
        (
            "llama3",
            &[
                "scaling=llama3",
                "factor=8",
                "original_max_position_embeddings=64",
            ],
            16,
        ),
    ];
    let py = python();
    for (name, sets, seq) in cases {
        let mut g = load_tiny();
        run_pi(&mut g, sets).unwrap();
        let model = tmp.path().join(format!("{name}.onnx"));
        lcc::onnx::save(&g, &model, &lcc::onnx::ExportOptions::default()).unwrap();
        // lcc runs its own export the same as the graph it came from.
        let mine = logits(&g, seq);
        let back = lcc::onnx::load(&model).unwrap();
        let again = logits(&back, seq);
        let d = max_abs_diff(&mine, &again);
        assert!(d <= TOL, "{name}: lcc on its ONNX export differs by {d:e}");
        let Some(py) = &py else { continue };
        let expected = tmp.path().join(format!("{name}_logits.safetensors"));
        lcc::hf::write_tensors(&expected, &[("logits".into(), mine)]).unwrap();
        let inputs = fixtures().join(format!("rope/inputs_s{seq}.safetensors"));
        check_with_onnxruntime(py, &model, &inputs, &expected, TOL);
    }
}

#[test]
fn errors_say_what_to_do() {
    // A torch export, not raised: RoPE is primitives.
    // With --no-raise it is refused; by default raised on demand.
    let mut g = lcc::onnx::load(&tiny().join(EXPORTS[0])).unwrap();
    let e = run_no_raise(&mut g.clone(), "passes: [pi: {factor: 4}]");
    assert!(
        e.contains("pass 'pi'") && e.contains("primitive ONNX") && e.contains("'raise'"),
        "{e}"
    );
    let r = run_pi(&mut g, &["factor=4"]).unwrap();
    assert_eq!(r.matched, 4);
    let e = run_pi(
        &mut lcc::onnx::load(&tiny().join(EXPORTS[0])).unwrap(),
        &["target_len=1024"],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("pi.original_max_position_embeddings"), "{e}");

    let mut g = load_tiny();
    for (sets, want) in [
        (
            &["factor=4", "target_len=1024"][..],
            "either 'factor' (relative to the model as it is) or 'target_len'",
        ),
        (&[][..], "'factor' (e.g. --set pi.factor=8) or 'target_len'"),
        (&["factor=0"][..], "option 'factor' must be positive, got 0"),
        (
            &["factor=-2"][..],
            "option 'factor' must be positive, got -2",
        ),
        (&["target_len=0"][..], "'target_len' must be at least 1"),
        (
            &["factor=\"x\""][..],
            "pass 'pi': bad options: invalid type",
        ),
        (
            &["factr=4"][..],
            "pass 'pi': bad options: unknown field `factr`",
        ),
        (
            &["factor=4", "scaling=ntk"][..],
            "unknown variant `ntk`, expected one of `linear`, `dynamic`, `yarn`, `llama3`",
        ),
        (
            &["factor=4", "scaling=llama3", "low_freq_factor=4"][..],
            "0 < low_freq_factor < high_freq_factor",
        ),
    ] {
        let e = run_pi(&mut g, sets).unwrap_err().to_string();
        assert!(e.contains(want), "{sets:?}: {e}");
    }
    // Nothing was changed by the failed runs.
    assert_eq!(rope_scalings(&g)[0], RopeScaling::None);

    // Without a config, a target length has nothing to divide.
    g.meta.props.retain(|(k, _)| k != "hf.config");
    let e = run_pi(&mut g, &["target_len=1024"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("original (pretraining) context length")
            && e.contains("pi.original_max_position_embeddings"),
        "{e}"
    );
    // …but an explicit factor, or an explicit original length, does.
    run_pi(&mut g, &["factor=2"]).unwrap();
    run_pi(
        &mut g,
        &["target_len=1024", "original_max_position_embeddings=256"],
    )
    .unwrap();
    assert_eq!(rope_scalings(&g)[0], RopeScaling::Linear { factor: 4.0 });
}
