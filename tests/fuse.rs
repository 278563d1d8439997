//! The `fuse` pass: merged projections and fused elementwise chains compute
//! what the unfused graph computes (a training step's loss and every
//! gradient, through the plain executor and through a compiled session),
//! expand back into plain ops, export to ONNX, and show in the print.

mod common;

use common::{lcc, stdout, tiny};
use lcc::ir::{self, Graph, Op, Tensor};
use lcc::passes::autodiff::{autodiff, AutodiffOptions};
use lcc::passes::{Pipeline, RunOptions};
use lcc::runtime::{Backend, CompileOptions, CpuBackend};
use std::collections::HashMap;

fn training_graph() -> Graph {
    let mut g = lcc::model::load(&tiny().join("hf")).unwrap();
    let mut p = Pipeline::recipe("longlora-train").unwrap();
    p.set("pi.target_len=1024").unwrap();
    p.run(&mut g, &RunOptions::default(), |_, _| {}).unwrap();
    nonzero_lora_b(&mut g);
    autodiff(&mut g, &AutodiffOptions { ignore_index: -100 }).unwrap();
    g
}

/// PEFT starts lora_B at zero, which would hide a wrong LoRA branch in the
/// forward: give every lora_B small deterministic values.
fn nonzero_lora_b(g: &mut Graph) {
    let names: Vec<String> = g
        .weights
        .iter()
        .filter(|w| w.name.contains("lora_B"))
        .map(|w| w.name.clone())
        .collect();
    assert!(!names.is_empty());
    for (k, name) in names.iter().enumerate() {
        let w = g.weights.get(name).unwrap();
        let n: usize = w.shape.iter().product();
        let vals = (0..n)
            .map(|i| ((i * 31 + k * 17) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let t = Tensor::f32(w.shape.clone(), vals);
        g.weights
            .insert(ir::Weight::from_tensor(name.clone(), &t, w.trainable));
    }
}

fn fused(g: &Graph) -> Graph {
    let mut f = g.clone();
    let p = Pipeline::from_names("fuse").unwrap();
    p.run(&mut f, &RunOptions::default(), |_, _| {}).unwrap();
    f
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.g.node_weights().filter(|n| pred(&n.op)).count()
}

fn inputs(batch: usize, seq: usize) -> HashMap<String, Tensor> {
    let ids = Tensor::i64(
        vec![batch, seq],
        (0..batch * seq).map(|i| (i * 7 % 250) as i64).collect(),
    );
    let mut m = HashMap::new();
    m.insert("input_ids".to_string(), ids.clone());
    m.insert("labels".to_string(), ids);
    m
}

/// Largest difference relative to the reference's largest magnitude.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_f64_vec(), b.to_f64_vec());
    let scale = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
        / scale
}

fn assert_same(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (name, w) in want {
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no output {name}"));
        let d = rel_diff(g, w);
        assert!(d < 1e-5, "{what}: {name} differs by {d:e} (relative)");
    }
}

#[test]
fn a_fused_training_step_computes_the_unfused_loss_and_gradients() {
    let g = training_graph();
    let f = fused(&g);
    // Every layer's q/k/v and gate/up are merged (2 layers in the tiny
    // model), and the backward's gradient sums are fused.
    let layers = count(&g, |op| matches!(op, Op::RmsNorm { .. })) / 2;
    assert!(layers >= 2);
    assert_eq!(
        count(&f, |op| matches!(op, Op::MergedLinear(_))),
        2 * layers
    );
    assert!(count(&f, |op| matches!(op, Op::Fused(_))) >= layers);
    assert!(
        count(&f, |op| matches!(op, Op::Binary(_))) < count(&g, |op| matches!(op, Op::Binary(_)))
    );
    // The checkpoint keeps the separate weights.
    assert_eq!(
        f.weights.iter().map(|w| w.name.clone()).collect::<Vec<_>>(),
        g.weights.iter().map(|w| w.name.clone()).collect::<Vec<_>>()
    );

    let ins = inputs(2, 40);
    let want = CpuBackend::new().run(&g, &ins).unwrap();
    let plain = CpuBackend::new().run(&f, &ins).unwrap();
    assert_same(&plain, &want, "fused graph, plain run");
    // A compiled session precomputes the concatenated weights once.
    let backend = CpuBackend::new();
    let mut exe = Backend::compile(
        &backend,
        &f,
        &CompileOptions {
            training: true,
            ..Default::default()
        },
    )
    .unwrap();
    let first = exe.run(&ins).unwrap();
    assert_same(&first, &want, "fused graph, compiled");
    let again = exe.run(&ins).unwrap();
    assert_same(&again, &first, "second run of the compiled graph");
}

#[test]
fn expanding_the_fusions_gives_back_plain_ops_with_the_same_results() {
    let g = training_graph();
    let mut f = fused(&g);
    let n = ir::expand_all(&mut f).unwrap();
    assert!(n > 0);
    assert_eq!(count(&f, |op| op.is_fused()), 0);
    ir::verify(&f).unwrap();
    let ins = inputs(1, 24);
    assert_same(
        &CpuBackend::new().run(&f, &ins).unwrap(),
        &CpuBackend::new().run(&g, &ins).unwrap(),
        "expanded",
    );
}

#[test]
fn merged_weights_are_read_and_written_by_name_in_a_compiled_session() {
    let mut g = lcc::model::load(&tiny().join("hf")).unwrap();
    let f = fused(&g);
    let name = "model.layers.0.self_attn.q_proj.weight";
    let backend = CpuBackend::new();
    let mut exe = Backend::compile(&backend, &f, &CompileOptions::default()).unwrap();
    let stored = g.weights.get(name).unwrap().to_tensor().unwrap();
    assert_eq!(exe.weight(name).unwrap(), stored);
    let mut ins = inputs(1, 16);
    ins.remove("labels");
    // Writing a merged weight recomputes the concatenation: the session
    // then computes what the unfused graph with that weight computes.
    let zero = Tensor::zeros(stored.dtype, stored.shape.clone());
    exe.set_weight(name, zero.clone()).unwrap();
    assert_eq!(exe.weight(name).unwrap(), zero);
    g.weights
        .insert(ir::Weight::from_tensor(name.to_string(), &zero, false));
    assert_same(
        &exe.run(&ins).unwrap(),
        &CpuBackend::new().run(&g, &ins).unwrap(),
        "after set_weight",
    );
}

#[test]
fn a_fused_graph_exports_to_onnx_as_its_expansion() {
    let dir = std::env::temp_dir().join(format!("lcc-fuse-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("fused.onnx");
    let o = lcc(&[
        "rewrite",
        tiny().join("hf").to_str().unwrap(),
        "--passes",
        "lora,fuse",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let back = lcc::model::load(&out).unwrap();
    assert_eq!(count(&back, |op| op.is_fused()), 0);
    let mut unfused = lcc::model::load(&tiny().join("hf")).unwrap();
    Pipeline::from_names("lora")
        .unwrap()
        .run(&mut unfused, &RunOptions::default(), |_, _| {})
        .unwrap();
    // (lora_B is zero here, as PEFT initialises it; the training-step test
    // covers non-zero branches.)
    let mut ins = inputs(1, 12);
    ins.remove("labels");
    let a = CpuBackend::new().run(&back, &ins).unwrap();
    let b = CpuBackend::new().run(&unfused, &ins).unwrap();
    let key = |m: &HashMap<String, Tensor>| m.values().next().cloned().unwrap();
    assert!(rel_diff(&key(&a), &key(&b)) < 1e-5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn print_after_fuse_shows_the_fused_nodes() {
    let o = lcc(&[
        "inspect",
        tiny().join("hf").to_str().unwrap(),
        "--passes",
        "lora,trainable,autodiff,fuse",
        "--print",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("MergedLinear{parts=[64+lora(r=8,alpha=16.0),"),
        "{text}"
    );
    assert!(text.contains("Concat{axis=0}(@model.layers.0.self_attn.q_proj.weight, @model.layers.0.self_attn.k_proj.weight, @model.layers.0.self_attn.v_proj.weight)"));
    assert!(text.contains("Fused{expr=add("), "{text}");
}

#[test]
fn autodiff_refuses_a_fused_graph() {
    let mut g = lcc::model::load(&tiny().join("hf")).unwrap();
    Pipeline::from_names("lora,fuse")
        .unwrap()
        .run(&mut g, &RunOptions::default(), |_, _| {})
        .unwrap();
    let e = autodiff(&mut g, &AutodiffOptions { ignore_index: -100 }).unwrap_err();
    assert!(e.to_string().contains("run `fuse` after autodiff"), "{e}");
}
