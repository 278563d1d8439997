//! The memory plan (runtime/plan.rs) against what the CPU executor measures,
//! and `lcc inspect --memory` as typed.

mod common;

use common::{lcc, stdout, text, tiny};
use lcc::ir::{Graph, Tensor};
use lcc::passes::autodiff::{autodiff, AutodiffOptions};
use lcc::passes::{Pipeline, RunOptions};
use lcc::runtime::plan::{self, ElemBytes};
use lcc::runtime::{CpuBackend, Schedule};
use std::collections::HashMap;
use std::path::Path;

fn training_graph(recipe: &str) -> Graph {
    let mut g = lcc::model::load(&tiny().join("hf")).unwrap();
    let mut p = Pipeline::recipe(recipe).unwrap();
    p.set("pi.target_len=1024").unwrap();
    p.run(&mut g, &RunOptions::default(), |_, _| {}).unwrap();
    autodiff(&mut g, &AutodiffOptions { ignore_index: -100 }).unwrap();
    g
}

fn ids(batch: usize, seq: usize) -> Tensor {
    Tensor::i64(
        vec![batch, seq],
        (0..batch * seq).map(|i| (i * 7 % 250) as i64).collect(),
    )
}

#[test]
fn the_plan_predicts_the_executors_peak_of_a_training_step() {
    let g = training_graph("longlora-train");
    for (batch, seq) in [(1, 32), (2, 48)] {
        let mut inputs = HashMap::new();
        inputs.insert("input_ids".to_string(), ids(batch, seq));
        inputs.insert("labels".to_string(), ids(batch, seq));
        let (_, stats) = CpuBackend::new().run_with_stats(&g, &inputs).unwrap();
        let bindings = plan::bind_batch_seq(&g, batch, seq);
        let p = plan::plan(&g, &Schedule::new(&g).unwrap(), &bindings, ElemBytes::Cpu).unwrap();
        // Same liveness, same sizes: the plan is the executor's accounting
        // exactly (weights counted while read as values).
        assert_eq!(
            p.peak_value_bytes, stats.peak_live_bytes as u64,
            "batch {batch} seq {seq}: planned vs the executor's measured peak"
        );
        assert!(p.arena_bytes >= p.peak_live_bytes);
        assert!(
            p.arena_bytes as f64 <= p.peak_live_bytes as f64 * 1.25,
            "arena {} for a peak of {}",
            p.arena_bytes,
            p.peak_live_bytes
        );
    }
}

#[test]
fn offsets_never_overlap_for_values_live_at_once() {
    let g = training_graph("longlora-train");
    let bindings = plan::bind_batch_seq(&g, 1, 64);
    let p = plan::plan(
        &g,
        &Schedule::new(&g).unwrap(),
        &bindings,
        ElemBytes::Storage,
    )
    .unwrap();
    let bufs: Vec<_> = p
        .buffers
        .iter()
        .filter(|b| !b.resident && b.bytes > 0)
        .collect();
    assert!(bufs.len() > 100);
    for (i, a) in bufs.iter().enumerate() {
        assert!(a.offset + a.bytes <= p.arena_bytes);
        for b in &bufs[i + 1..] {
            let alive_together = a.first <= b.last && b.first <= a.last;
            let overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            assert!(
                !(alive_together && overlap),
                "{} and {} share memory while both live",
                a.name,
                b.name
            );
        }
    }
}

#[test]
fn activations_grow_linearly_with_the_length() {
    let g = training_graph("longlora-train");
    let act = |seq: usize| {
        plan::step_memory(&g, 1, seq, ElemBytes::Cpu, 2, None)
            .unwrap()
            .activation_bytes as f64
    };
    let (a, b) = (act(1024), act(4096));
    let ratio = b / a;
    assert!(
        (3.6..=4.4).contains(&ratio),
        "4× the length: {ratio}× the activations"
    );
}

#[test]
fn inspect_memory_prints_a_7b_longlora_step_as_typed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let m = root.join("models/llama-2-7b");
    let out = lcc(&[
        "inspect",
        m.to_str().unwrap(),
        "--memory",
        "--seq-len",
        "8192",
        "--pipeline",
        "longlora-train",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let s = stdout(&out);
    for want in [
        "training step",
        "frozen weights",
        "trainable weights",
        "gradients",
        "optimizer state",
        "activations (peak)",
        "total",
        "lm_head",
    ] {
        assert!(s.contains(want), "missing '{want}':\n{s}");
    }
    // A bare config.json is a model too; JSON output for scripts.
    let out = lcc(&[
        "inspect",
        root.join("tests/bench/llama-h256-l4.json")
            .to_str()
            .unwrap(),
        "--memory",
        "--seq-len",
        "2048",
        "--passes",
        "lora",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v["activation_bytes"].as_u64().unwrap() > 50 << 20);
    assert_eq!(
        v["optimizer_bytes"],
        v["trainable_weight_bytes"].as_u64().unwrap() * 2
    );
    // Without --seq-len there is nothing to plan.
    let out = lcc(&["inspect", m.to_str().unwrap(), "--memory"]);
    assert!(!out.status.success());
}
