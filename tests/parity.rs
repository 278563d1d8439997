//! Exporter parity: lcc runs every torch export of the tiny model, and the
//! Hugging Face dir itself, and gets torch's logits within 1e-4.

mod common;

use common::*;
use lcc::ir::Tensor;
use lcc::runtime::{cpu::CpuBackend, Backend};
use std::collections::HashMap;

const TOL: f64 = 1e-4;

fn run(model: &std::path::Path, seq: usize) -> (Tensor, Tensor) {
    let graph = lcc::model::load(model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let inputs = read(&tiny().join(format!("inputs_s{seq}.safetensors")));
    let expected = read(&tiny().join(format!("logits_s{seq}.safetensors")));
    let out: HashMap<String, Tensor> = CpuBackend::new()
        .run(&graph, &inputs)
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    (out["logits"].clone(), expected["logits"].clone())
}

fn check(model: &std::path::Path) {
    for seq in [7, 16] {
        let (got, want) = run(model, seq);
        assert_eq!(got.shape, vec![2, seq, 256]);
        let d = max_abs_diff(&got, &want);
        eprintln!(
            "{} seq {seq} batch 2: max abs diff vs torch {d:.2e}",
            model.display()
        );
        assert!(
            d <= TOL,
            "{}: seq {seq}: max abs diff {d:e} > {TOL:e}",
            model.display()
        );
    }
}

#[test]
fn hf_dir_matches_torch() {
    check(&tiny().join("hf"));
}

#[test]
fn torchscript_opset17_export_matches_torch() {
    check(&tiny().join(EXPORTS[0]));
}

#[test]
fn dynamo_opset20_export_matches_torch() {
    check(&tiny().join(EXPORTS[1]));
}

#[test]
fn dynamo_opset23_sdpa_export_matches_torch_at_batch_2() {
    // The cos/sin caches of this export have batch 1; lcc broadcasts them.
    check(&tiny().join(EXPORTS[2]));
}
