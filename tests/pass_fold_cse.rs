//! `fold` and `cse`: small hand-built graphs with their canonical prints, and
//! the three torch exports of the tiny model, which shrink under
//! fold + cse + dce while their logits stay within 1e-6 of the unfolded graph.

mod common;

use common::*;
use lcc::ir::{self, BinaryOp, DType, Dim, Graph, Op, Tensor, TensorType, UnaryOp};
use lcc::passes::{create, PassSpec, Pipeline, Report, RunOptions};
use lcc::runtime::{cpu::CpuBackend, Backend};
use serde_json::Map;

fn run_pass(name: &str, g: &mut Graph) -> Report {
    let pass = create(&PassSpec {
        name: name.into(),
        options: Map::new(),
    })
    .unwrap();
    let r = pass.run(g).unwrap();
    ir::verify(g).unwrap();
    r
}

fn constant(g: &mut Graph, name: &str, t: Tensor) -> ir::Value {
    let ty = TensorType::fixed(t.dtype, &t.shape);
    g.add(name, Op::Constant { value: t }, &[], Some(ty))
        .unwrap()
}

#[test]
fn add_of_two_constants_folds_to_three() {
    let mut g = Graph::new();
    let a = constant(&mut g, "a", Tensor::scalar_f32(1.0));
    let b = constant(&mut g, "b", Tensor::scalar_f32(2.0));
    let ty = TensorType::fixed(DType::F32, &[]);
    let s = g
        .add("sum", Op::Binary(BinaryOp::Add), &[a, b], Some(ty))
        .unwrap();
    g.outputs.push(("y".into(), s));
    let r = run_pass("fold", &mut g);
    assert_eq!(r.matched, 1);
    assert_eq!(
        ir::print(&g).unwrap(),
        "graph {\n  %0 = Constant{dtype=f32, shape=[], value=[3.0]}() : f32[]\n  output y = %0 : f32[]\n}\n"
    );
    let again = run_pass("fold", &mut g);
    assert_eq!(again.matched, 0);
    assert_eq!(again.nodes_added + again.nodes_removed, 0);
}

#[test]
fn shape_folds_for_fixed_types_only() {
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[2, 3]));
    let y = g.add_input(
        "y",
        TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::Fixed(3)]),
    );
    let shape_ty = Some(TensorType::fixed(DType::I64, &[2]));
    let sx = g
        .add(
            "sx",
            Op::Shape {
                start: None,
                end: None,
            },
            &[x],
            shape_ty.clone(),
        )
        .unwrap();
    let sy = g
        .add(
            "sy",
            Op::Shape {
                start: None,
                end: None,
            },
            &[y],
            shape_ty,
        )
        .unwrap();
    g.outputs.push(("sx".into(), sx));
    g.outputs.push(("sy".into(), sy));
    let r = run_pass("fold", &mut g);
    assert_eq!(r.matched, 1);
    assert_eq!(
        ir::print(&g).unwrap(),
        "graph {\n  input %x: f32[2,3]\n  input %y: f32[batch,3]\n  \
         %0 = Constant{dtype=i64, shape=[2], value=[2, 3]}() : i64[2]\n  \
         %1 = Shape(%y) : i64[2]\n  output sx = %0 : i64[2]\n  output sy = %1 : i64[2]\n}\n"
    );
    assert_eq!(run_pass("fold", &mut g).matched, 0);
}

#[test]
fn identical_negations_merge() {
    let mut g = Graph::new();
    let ty = TensorType::new(DType::F32, vec![Dim::sym("n")]);
    let x = g.add_input("x", ty.clone());
    let n1 = g
        .add("n1", Op::Unary(UnaryOp::Neg), &[x], Some(ty.clone()))
        .unwrap();
    let n2 = g
        .add("n2", Op::Unary(UnaryOp::Neg), &[x], Some(ty.clone()))
        .unwrap();
    let e1 = g
        .add("e1", Op::Unary(UnaryOp::Exp), &[n1], Some(ty.clone()))
        .unwrap();
    let e2 = g
        .add("e2", Op::Unary(UnaryOp::Exp), &[n2], Some(ty.clone()))
        .unwrap();
    let c1 = constant(&mut g, "c1", Tensor::f32(vec![1], vec![2.0]));
    let c2 = constant(&mut g, "c2", Tensor::f32(vec![1], vec![2.0]));
    let m1 = g
        .add("m1", Op::Binary(BinaryOp::Mul), &[e1, c1], Some(ty.clone()))
        .unwrap();
    let m2 = g
        .add("m2", Op::Binary(BinaryOp::Mul), &[e2, c2], Some(ty.clone()))
        .unwrap();
    // Same op, different attributes: must stay apart.
    let s1 = g
        .add("s1", Op::Softmax { axis: 0 }, &[x], Some(ty.clone()))
        .unwrap();
    let s2 = g
        .add("s2", Op::Softmax { axis: -1 }, &[x], Some(ty.clone()))
        .unwrap();
    let a = g
        .add("a", Op::Binary(BinaryOp::Add), &[m1, m2], Some(ty.clone()))
        .unwrap();
    let b = g
        .add("b", Op::Binary(BinaryOp::Add), &[s1, s2], Some(ty))
        .unwrap();
    g.outputs.push(("a".into(), a));
    g.outputs.push(("b".into(), b));
    let before = g.g.node_count();
    let r = run_pass("cse", &mut g);
    // Neg, then Exp, the constant and Mul merge in one run.
    assert_eq!(r.matched, 4);
    assert_eq!(g.g.node_count(), before - 4);
    assert_eq!(
        ir::print(&g).unwrap(),
        "graph {\n  input %x: f32[n]\n  \
         %0 = Neg(%x) : f32[n]\n  \
         %1 = Exp(%0) : f32[n]\n  \
         %2 = Constant{dtype=f32, shape=[1], value=[2.0]}() : f32[1]\n  \
         %3 = Mul(%1, %2) : f32[n]\n  \
         %4 = Add(%3, %3) : f32[n]\n  \
         %5 = Softmax{axis=0}(%x) : f32[n]\n  \
         %6 = Softmax{axis=-1}(%x) : f32[n]\n  \
         %7 = Add(%5, %6) : f32[n]\n  \
         output a = %4 : f32[n]\n  output b = %7 : f32[n]\n}\n"
    );
    let again = run_pass("cse", &mut g);
    assert_eq!(again.matched, 0);
}

#[test]
fn fold_cse_dce_shrink_the_torch_exports_and_keep_their_logits() {
    let backend = CpuBackend::new();
    let pipeline = Pipeline::from_names("fold,cse,dce").unwrap();
    for export in EXPORTS {
        let path = tiny().join(export);
        let original = lcc::onnx::load(&path).unwrap();
        let mut folded = original.clone();
        let reports = pipeline
            .run(
                &mut folded,
                &RunOptions {
                    verify: true,
                    ..Default::default()
                },
                |_, _| {},
            )
            .unwrap();
        let (before, after) = (original.g.node_count(), folded.g.node_count());
        eprintln!("{export}: {before} nodes -> {after} nodes");
        for r in &reports {
            eprintln!("  {r}");
        }
        // torch's dynamo exporter already folds and deduplicates (its
        // remaining shape arithmetic reads the symbolic batch and seq), so
        // only the TorchScript export has work left: 181 Constant nodes,
        // most of them duplicates.
        if export.contains("torchscript") {
            assert!(after < before, "{export}: {before} -> {after}");
        } else {
            assert!(after <= before, "{export}: {before} -> {after}");
        }
        for seq in [7, 16] {
            let inputs = read(&tiny().join(format!("inputs_s{seq}.safetensors")));
            let want = backend.run(&original, &inputs).unwrap();
            let got = backend.run(&folded, &inputs).unwrap();
            let d = max_abs_diff(&got["logits"], &want["logits"]);
            eprintln!("  seq {seq}: max abs diff vs unfolded {d:.2e}");
            assert!(d <= 1e-6, "{export} seq {seq}: {d:e}");
        }
        // A second run of the whole pipeline changes nothing.
        let printed = ir::print(&folded).unwrap();
        let reports = pipeline
            .run(
                &mut folded,
                &RunOptions {
                    verify: true,
                    ..Default::default()
                },
                |_, _| {},
            )
            .unwrap();
        assert!(
            reports.iter().all(|r| r.matched == 0),
            "{export}: {reports:?}"
        );
        assert_eq!(ir::print(&folded).unwrap(), printed, "{export}");
    }
}

#[test]
fn large_results_and_trainable_weights_are_not_folded() {
    use lcc::ir::Weight;
    let mut g = Graph::new();
    // ConstantOfShape([512, 1024]) is 2 MiB of f32: over the 1 MiB default.
    let big_shape = constant(&mut g, "big_shape", Tensor::i64(vec![2], vec![512, 1024]));
    let small_shape = constant(&mut g, "small_shape", Tensor::i64(vec![1], vec![4]));
    let big = g
        .add(
            "big",
            Op::ConstantOfShape { value: None },
            &[big_shape],
            Some(TensorType::fixed(DType::F32, &[512, 1024])),
        )
        .unwrap();
    let small = g
        .add(
            "small",
            Op::ConstantOfShape { value: None },
            &[small_shape],
            Some(TensorType::fixed(DType::F32, &[4])),
        )
        .unwrap();
    let t = Tensor::f32(vec![4], vec![1.0, 2.0, 3.0, 4.0]);
    g.weights.insert(Weight::from_tensor("frozen", &t, false));
    g.weights.insert(Weight::from_tensor("trained", &t, true));
    let frozen = g.weight_value("frozen").unwrap();
    let trained = g.weight_value("trained").unwrap();
    let ty = Some(TensorType::fixed(DType::F32, &[4]));
    let nf = g
        .add("nf", Op::Unary(UnaryOp::Neg), &[frozen], ty.clone())
        .unwrap();
    let nt = g
        .add("nt", Op::Unary(UnaryOp::Neg), &[trained], ty.clone())
        .unwrap();
    let s = g
        .add(
            "s",
            Op::Variadic(lcc::ir::VariadicOp::Sum),
            &[small, nf, nt],
            ty,
        )
        .unwrap();
    g.outputs.push(("big".into(), big));
    g.outputs.push(("s".into(), s));
    let r = run_pass("fold", &mut g);
    // small and Neg(frozen) fold; big is too large; Neg(trained) and the Sum stay.
    assert_eq!(r.matched, 2, "{r}");
    assert!(r.notes.iter().any(|n| n.contains("max_bytes")), "{r}");
    let text = ir::print(&g).unwrap();
    assert!(text.contains("ConstantOfShape(%"), "{text}");
    assert!(
        text.contains("Constant{dtype=f32, shape=[4], value=[-1.0, -2.0, -3.0, -4.0]}()"),
        "{text}"
    );
    assert!(text.contains("Neg(@trained)"), "{text}");
    assert!(text.contains("weight @trained: f32[4] trainable"), "{text}");
    assert_eq!(run_pass("fold", &mut g).matched, 0);
}
