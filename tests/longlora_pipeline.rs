//! The LongLoRA training rewrite end to end on the tiny model: the same
//! pipeline on the Hugging Face dir and on each raised torch export gives the
//! same graph and the same logits; the diff against the original shows
//! exactly the expected changes; the canonical print is a snapshot.

mod common;

use common::*;
use lcc::ir::{self, diff, Graph};
use lcc::passes::{Pipeline, RunOptions};
use lcc::runtime::{cpu::CpuBackend, Backend};
use std::path::Path;

fn train_pipeline(raise: bool) -> Pipeline {
    let names = if raise {
        "raise,pi,s2attn,lora,trainable"
    } else {
        "pi,s2attn,lora,trainable"
    };
    let mut p = Pipeline::from_names(names).unwrap();
    p.set("pi.original_max_position_embeddings=256").unwrap();
    p.set("pi.target_len=1024").unwrap();
    p
}

fn rewritten(model: &Path) -> Graph {
    let mut g = lcc::model::load(model).unwrap();
    let raise = model.extension().is_some_and(|e| e == "onnx");
    train_pipeline(raise)
        .run(
            &mut g,
            &RunOptions {
                verify: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap();
    g
}

#[test]
fn hf_and_every_export_rewrite_to_the_same_graph_and_logits() {
    let reference = rewritten(&tiny().join("hf"));
    let text = ir::print(&reference).unwrap();
    let inputs = read(&tiny().join("inputs_s16.safetensors"));
    let want = CpuBackend::new().run(&reference, &inputs).unwrap();
    for name in EXPORTS {
        let g = rewritten(&tiny().join(name));
        assert_eq!(ir::print(&g).unwrap(), text, "{name}");
        let got = CpuBackend::new().run(&g, &inputs).unwrap();
        let d = max_abs_diff(&got["logits"], &want["logits"]);
        assert!(
            d <= 1e-5,
            "{name}: logits differ from the HF dir's by {d:e}"
        );
    }
}

#[test]
fn diff_against_the_original_shows_exactly_the_longlora_changes() {
    let original = lcc::hf::load(&tiny().join("hf")).unwrap();
    let d = diff::diff(&original, &rewritten(&tiny().join("hf"))).unwrap();
    let count = |v: &[diff::NodeRef], op: &str| v.iter().filter(|n| n.op == op).count();
    // q, k, v, o of 2 layers become LoraLinear.
    assert_eq!(count(&d.nodes_removed, "Linear"), 8, "{d}");
    assert_eq!(count(&d.nodes_added, "LoraLinear"), 8, "{d}");
    assert_eq!(d.nodes_added.len(), 8, "{d}");
    assert_eq!(d.nodes_removed.len(), 8, "{d}");
    // 4 Rope get the interpolation; 2 Attention the shifted sparse pattern.
    let changed = |op: &str| {
        d.nodes_changed
            .iter()
            .filter(|c| c.op == op && !c.attrs.is_empty())
            .count()
    };
    assert_eq!(changed("Rope"), 4, "{d}");
    assert_eq!(changed("Attention"), 2, "{d}");
    // 16 LoRA matrices: per layer q (8·64 + 64·8), k and v (8·64 + 32·8), o (8·64 + 64·8).
    assert_eq!(d.weights_added.len(), 16);
    assert!(d
        .weights_added
        .iter()
        .all(|w| w.name.contains(".lora_") && w.ty.ends_with(" trainable")));
    assert_eq!(d.params_after - d.params_before, 2 * (2 * 1024 + 2 * 768));
    // The embedding and the 5 norms become trainable; nothing else changes type.
    assert_eq!(d.weights_changed.len(), 6, "{d}");
    assert!(d
        .weights_changed
        .iter()
        .all(|w| w.after.ends_with(" trainable")));
}

#[test]
fn canonical_print_after_the_training_rewrite_matches_the_snapshot() {
    let text = ir::print(&rewritten(&tiny().join("hf"))).unwrap();
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/tiny_longlora_train.txt");
    if std::env::var("LCC_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .expect("snapshot missing: run with LCC_BLESS=1 to create it");
    assert_eq!(
        text, want,
        "the canonical print changed; review and re-bless with LCC_BLESS=1"
    );
}
