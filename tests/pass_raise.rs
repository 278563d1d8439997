//! The `raise` pass on the three torch exports of the tiny model: the raised
//! graph prints exactly like the graph the Hugging Face builder makes from
//! the HF dir, and still gives torch's logits.

mod common;

use common::*;
use lcc::ir::{BinaryOp, DType, Graph, Op, Tensor, TensorType};
use lcc::passes::{Pipeline, Report, RunOptions};
use lcc::runtime::{cpu::CpuBackend, Backend};
use std::collections::HashMap;

const TOL: f64 = 1e-4;

fn raise(graph: &mut Graph) -> Report {
    let reports = Pipeline::from_names("raise")
        .unwrap()
        .run(
            graph,
            &RunOptions {
                verify: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap();
    reports.into_iter().next().unwrap()
}

fn check_export(file: &str) {
    let mut graph = lcc::model::load(&tiny().join(file)).unwrap();
    let report = raise(&mut graph);
    eprintln!("{file}: {report}");
    let hf = lcc::model::load(&tiny().join("hf")).unwrap();
    let got = lcc::ir::print(&graph).unwrap();
    let want = lcc::ir::print(&hf).unwrap();
    assert_eq!(got, want, "{file}: raised graph differs from the HF graph");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("15 Linear weights") && n.contains("transposed")),
        "{:?}",
        report.notes
    );
    // The reconstructed config builds the same model.
    let cfg = graph
        .meta
        .prop(lcc::ir::CONFIG_PROP)
        .expect("hf.config set");
    let cfg = lcc::ir::LlamaConfig::from_json_str(cfg, std::path::Path::new("hf.config")).unwrap();
    assert_eq!(
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size),
        (256, 64, 128)
    );
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (2, 4, 2, 16)
    );
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (10000.0, 1e-5));
    // Weights have the HF values, not only the HF names and shapes.
    for w in hf.weights.iter() {
        let a = w.to_tensor().unwrap();
        let b = graph.weights.get(&w.name).unwrap().to_tensor().unwrap();
        assert!(
            max_abs_diff(&a, &b) == 0.0,
            "{file}: weight {} differs",
            w.name
        );
    }
    for seq in [7, 16] {
        let inputs = read(&tiny().join(format!("inputs_s{seq}.safetensors")));
        let expected = read(&tiny().join(format!("logits_s{seq}.safetensors")));
        let out: HashMap<String, Tensor> = CpuBackend::new().run(&graph, &inputs).unwrap();
        let d = max_abs_diff(&out["logits"], &expected["logits"]);
        eprintln!("{file} seq {seq}: raised logits max abs diff vs torch {d:.2e}");
        assert!(d <= TOL, "{file}: seq {seq}: {d:e} > {TOL:e}");
    }
    // The raised graph saves as a Hugging Face dir that loads back the same.
    let dir = tempfile::tempdir().unwrap();
    lcc::hf::save(&graph, dir.path()).unwrap();
    let back = lcc::model::load(dir.path()).unwrap();
    assert_eq!(
        lcc::ir::print(&back).unwrap(),
        want,
        "{file}: HF dir round trip"
    );
    // A second run finds nothing to do.
    let again = raise(&mut graph);
    assert_eq!(again.matched, 0);
    assert_eq!(lcc::ir::print(&graph).unwrap(), want);
}

#[test]
fn torchscript_opset17_raises_to_the_hf_graph() {
    check_export(EXPORTS[0]);
}

#[test]
fn dynamo_opset20_raises_to_the_hf_graph() {
    check_export(EXPORTS[1]);
}

#[test]
fn dynamo_opset23_fused_ops_raise_to_the_hf_graph() {
    check_export(EXPORTS[2]);
}

#[test]
fn a_graph_that_is_not_a_llama_is_left_unchanged() {
    let mut g = Graph::new();
    let ty = TensorType::fixed(DType::F32, &[2, 3]);
    let a = g.add_input("a", ty.clone());
    let b = g.add_input("b", ty.clone());
    let s = g
        .add("sum", Op::Binary(BinaryOp::Add), &[a, b], Some(ty))
        .unwrap();
    g.outputs.push(("y".into(), s));
    let before = lcc::ir::print(&g).unwrap();
    let report = raise(&mut g);
    assert_eq!(lcc::ir::print(&g).unwrap(), before);
    assert_eq!(report.matched, 0);
    assert!(
        report.notes.iter().any(|n| n.contains("no embedding")),
        "{:?}",
        report.notes
    );
}

#[test]
fn an_unmatched_block_stays_primitive_with_a_note() {
    // Break layer 1's MLP: its silu reads the gate through an extra Neg, so
    // it is no longer SwiGLU. Layer 0 is raised, the rest stays primitive.
    let mut graph = lcc::model::load(&tiny().join(EXPORTS[1])).unwrap();
    let sigmoids: Vec<_> = graph
        .g
        .node_indices()
        .filter(|&n| graph.node(n).op == Op::Unary(lcc::ir::UnaryOp::Sigmoid))
        .collect();
    assert_eq!(sigmoids.len(), 2);
    let last = *sigmoids.iter().max().unwrap();
    let gate = graph.inputs_of(last)[0].unwrap();
    let neg = graph
        .add("neg", Op::Unary(lcc::ir::UnaryOp::Neg), &[gate], None)
        .unwrap();
    let neg2 = graph
        .add("neg2", Op::Unary(lcc::ir::UnaryOp::Neg), &[neg], None)
        .unwrap();
    graph.set_input(last, 0, Some(neg2));
    let report = raise(&mut graph);
    eprintln!("{report}");
    let h = graph.op_histogram();
    assert_eq!(h.get("Attention"), Some(&2), "{h:?}");
    assert_eq!(h.get("SwiGlu"), Some(&1), "{h:?}");
    assert_eq!(h.get("Linear"), Some(&11), "{h:?}");
    assert_eq!(h.get("Sigmoid"), Some(&1), "{h:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("layer 1 MLP not matched")),
        "{:?}",
        report.notes
    );
    assert!(graph.meta.prop(lcc::ir::CONFIG_PROP).is_none());
    // Neg(Neg(x)) = x, so the logits are still torch's.
    let inputs = read(&tiny().join("inputs_s7.safetensors"));
    let expected = read(&tiny().join("logits_s7.safetensors"));
    let out = CpuBackend::new().run(&graph, &inputs).unwrap();
    let d = max_abs_diff(&out["logits"], &expected["logits"]);
    assert!(d <= TOL, "{d:e}");
}

#[test]
fn attention_without_a_causal_mask_is_not_raised() {
    // Drop the mask Add before every Softmax: that is bidirectional
    // attention, which Attention{full_causal} would get wrong.
    let mut graph = lcc::model::load(&tiny().join(EXPORTS[1])).unwrap();
    let softmaxes: Vec<_> = graph
        .g
        .node_indices()
        .filter(|&n| matches!(graph.node(n).op, Op::Softmax { .. }))
        .collect();
    for s in softmaxes {
        let add = graph.inputs_of(s)[0].unwrap().node;
        assert_eq!(graph.node(add).op, Op::Binary(BinaryOp::Add));
        let scores = graph.inputs_of(add)[0].unwrap();
        graph.set_input(s, 0, Some(scores));
    }
    graph.remove_dead();
    let report = raise(&mut graph);
    let h = graph.op_histogram();
    assert!(!h.contains_key("Attention"), "{h:?}");
    assert!(!h.contains_key("Embedding"), "{h:?}");
    assert_eq!(h.get("Softmax"), Some(&2), "{h:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("layer 0 attention not matched") && n.contains("causal mask")),
        "{:?}",
        report.notes
    );
}
