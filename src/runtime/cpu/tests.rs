//! Executor tests: small graphs built by hand, run end to end.

use super::*;
use crate::ir::{BinaryOp, DType, Dim, NodeIndex, Output, TensorType, UnaryOp, VariadicOp, Weight};

fn f32_t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), v.to_vec())
}

fn inputs(list: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
    list.iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect()
}

fn constant(g: &mut Graph, name: &str, t: Tensor) -> Value {
    g.add(name, Op::Constant { value: t }, &[], None).unwrap()
}

/// x[seq,4] + bias(bf16 weight)[4] → Reshape [0,2,2] → Transpose(0,2,1).
fn small_graph() -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(
        "x",
        TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::Fixed(4)]),
    );
    let bias = Tensor {
        dtype: DType::BF16,
        shape: vec![4],
        data: TensorData::F32(vec![0.5, -1.0, 2.0, 0.25]),
    };
    g.weights.insert(Weight::from_tensor("bias", &bias, false));
    let w = g.weight_value("bias").unwrap();
    let sum = g
        .add("add", Op::Binary(BinaryOp::Add), &[x, w], None)
        .unwrap();
    let shape = constant(&mut g, "shape", Tensor::i64(vec![3], vec![0, 2, 2]));
    let r = g
        .add(
            "reshape",
            Op::Reshape { allowzero: false },
            &[sum, shape],
            None,
        )
        .unwrap();
    let t = g
        .add(
            "transpose",
            Op::Transpose {
                perm: Some(vec![0, 2, 1]),
            },
            &[r],
            None,
        )
        .unwrap();
    g.outputs.push(("y".into(), t));
    g
}

#[test]
fn add_weight_reshape_transpose() {
    let g = small_graph();
    let x = f32_t(&[2, 4], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    let (out, stats) = run_with_stats(&g, &inputs(&[("x", x)])).unwrap();
    let y = &out["y"];
    assert_eq!(y.dtype, DType::F32);
    assert_eq!(y.shape, vec![2, 2, 2]);
    // x + bias = [[1.5, 1, 5, 4.25], [5.5, 5, 9, 8.25]] → [2,2,2] → swap last two
    assert_eq!(y.as_f32().unwrap(), &[1.5, 5., 1., 4.25, 5.5, 9., 5., 8.25]);
    assert_eq!(stats.weights_decoded, 1);
    assert_eq!(stats.nodes_run, 6);
    assert_eq!(out.len(), 1);
    // The same graph runs at another sequence length.
    let x = f32_t(&[1, 4], &[0., 0., 0., 0.]);
    let out = run(&g, &inputs(&[("x", x)])).unwrap();
    assert_eq!(out["y"].as_f32().unwrap(), &[0.5, 2., -1., 0.25]);
    assert_eq!(CpuBackend::new().name(), "cpu");
}

#[test]
fn input_validation_errors_name_the_input() {
    let g = small_graph();
    let err = |ins: HashMap<String, Tensor>| run(&g, &ins).unwrap_err().to_string();

    let e = err(HashMap::new());
    assert!(e.contains("'x'") && e.contains("missing"), "{e}");

    let e = err(inputs(&[("x", Tensor::i64(vec![2, 4], vec![0; 8]))]));
    assert!(
        e.contains("'x'") && e.contains("f32[seq,4]") && e.contains("i64"),
        "{e}"
    );

    let e = err(inputs(&[("x", f32_t(&[2, 3], &[0.; 6]))]));
    assert!(
        e.contains("'x'") && e.contains("dimension 1 must be 4"),
        "{e}"
    );

    let e = err(inputs(&[
        ("x", f32_t(&[1, 4], &[0.; 4])),
        ("z", f32_t(&[1], &[0.])),
    ]));
    assert!(e.contains("'z'") && e.contains("not an input"), "{e}");

    // A storage that contradicts the shape is refused, not indexed.
    let bad = Tensor {
        dtype: DType::F32,
        shape: vec![2, 4],
        data: TensorData::F32(vec![0.; 3]),
    };
    let e = err(inputs(&[("x", bad)]));
    assert!(e.contains("'x'") && e.contains("holds 3"), "{e}");
}

#[test]
fn a_symbol_binds_to_one_size_across_inputs() {
    let mut g = Graph::new();
    let seq = || TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::sym("seq")]);
    let a = g.add_input("a", seq());
    let b = g.add_input("b", seq());
    let s = g
        .add("sum", Op::Binary(BinaryOp::Add), &[a, b], None)
        .unwrap();
    g.outputs.push(("s".into(), s));
    let ok = run(
        &g,
        &inputs(&[
            ("a", f32_t(&[1, 3], &[1., 2., 3.])),
            ("b", f32_t(&[1, 3], &[1., 1., 1.])),
        ]),
    )
    .unwrap();
    assert_eq!(ok["s"].as_f32().unwrap(), &[2., 3., 4.]);
    let e = run(
        &g,
        &inputs(&[
            ("a", f32_t(&[1, 3], &[0.; 3])),
            ("b", f32_t(&[1, 2], &[0.; 2])),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'seq'") && e.contains("bound to 3"), "{e}");
}

#[test]
fn kernel_errors_carry_node_and_op() {
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[3]));
    let idx = constant(&mut g, "", Tensor::i64(vec![1], vec![5]));
    let y = g
        .add("pick", Op::Gather { axis: 0 }, &[x, idx], None)
        .unwrap();
    g.outputs.push(("y".into(), y));
    let e = run(&g, &inputs(&[("x", f32_t(&[3], &[1., 2., 3.]))])).unwrap_err();
    match e {
        Error::Exec { node, op, msg } => {
            assert_eq!(node, "pick");
            assert_eq!(op, "Gather");
            assert!(msg.contains("index 5"), "{msg}");
        }
        other => panic!("expected an exec error, got {other}"),
    }
}

/// A chain of `n` unary ops over one input.
fn chain(n: usize, len: usize) -> (Graph, Tensor) {
    let mut g = Graph::new();
    let mut v = g.add_input("x", TensorType::fixed(DType::F32, &[len]));
    for i in 0..n {
        let op = if i % 2 == 0 {
            UnaryOp::Neg
        } else {
            UnaryOp::Abs
        };
        v = g.add(format!("u{i}"), Op::Unary(op), &[v], None).unwrap();
    }
    g.outputs.push(("y".into(), v));
    let x = Tensor::f32(vec![len], (0..len).map(|k| k as f32).collect());
    (g, x)
}

#[test]
fn values_are_freed_after_their_last_use() {
    let len = 1000;
    let bytes = len * 4;
    for n in [1, 5, 40] {
        let (g, x) = chain(n, len);
        let (out, stats) = run_with_stats(&g, &inputs(&[("x", x)])).unwrap();
        let want: Vec<f32> = (0..len)
            .map(|k| if n % 2 == 1 { -(k as f32) } else { k as f32 })
            .collect();
        assert_eq!(out["y"].as_f32().unwrap(), &want[..]);
        // Input and output of one step at a time, whatever the chain length.
        assert_eq!(stats.peak_live_values, 2, "chain of {n}");
        assert_eq!(stats.peak_live_bytes, 2 * bytes, "chain of {n}");
        assert_eq!(stats.nodes_run, n + 1);
    }
}

#[test]
fn a_value_with_two_readers_lives_until_the_second() {
    // x → a = Neg(x); b = Exp(x); c = Add(a, b); d = Mul(c, x)
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[2]));
    let a = g.add("a", Op::Unary(UnaryOp::Neg), &[x], None).unwrap();
    let b = g.add("b", Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
    let c = g
        .add("c", Op::Binary(BinaryOp::Add), &[a, b], None)
        .unwrap();
    let d = g
        .add("d", Op::Binary(BinaryOp::Mul), &[c, x], None)
        .unwrap();
    // x·x reads the same value on both ports.
    let sq = g
        .add("sq", Op::Binary(BinaryOp::Mul), &[d, d], None)
        .unwrap();
    g.outputs.push(("d".into(), d));
    g.outputs.push(("sq".into(), sq));
    let (out, stats) = run_with_stats(&g, &inputs(&[("x", f32_t(&[2], &[0., 1.]))])).unwrap();
    let e = std::f32::consts::E;
    let d0 = 0.0 * (0.0 + 1.0);
    let d1 = 1.0 * (-1.0 + e);
    assert_eq!(out["d"].as_f32().unwrap(), &[d0, d1]);
    assert_eq!(out["sq"].as_f32().unwrap(), &[d0 * d0, d1 * d1]);
    assert!(stats.peak_live_values <= 4, "{stats:?}");
}

#[test]
fn a_weight_read_by_two_nodes_is_decoded_once() {
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[2]));
    let w = Tensor {
        dtype: DType::F16,
        shape: vec![2],
        data: TensorData::F32(vec![1.5, -2.0]),
    };
    g.weights.insert(Weight::from_tensor("w", &w, true));
    let w1 = g.weight_value("w").unwrap();
    // A second reader node for the same weight, as a pass might leave it.
    let idx = g.g.add_node(crate::ir::Node {
        name: "w_again".into(),
        op: Op::Weight { name: "w".into() },
        num_inputs: 0,
        outputs: vec![Output {
            name: "w_again".into(),
            ty: None,
        }],
    });
    let w2 = Value::new(idx, 0);
    let a = g
        .add("a", Op::Binary(BinaryOp::Mul), &[x, w1], None)
        .unwrap();
    let b = g
        .add("b", Op::Binary(BinaryOp::Sub), &[a, w2], None)
        .unwrap();
    g.outputs.push(("y".into(), b));
    let (out, stats) = run_with_stats(&g, &inputs(&[("x", f32_t(&[2], &[2., 3.]))])).unwrap();
    assert_eq!(out["y"].as_f32().unwrap(), &[1.5, -4.0]);
    assert_eq!(out["y"].dtype, DType::F32);
    assert_eq!(stats.weights_decoded, 1);
}

#[test]
fn multi_output_split_and_passthrough_outputs() {
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::I64, &[5]));
    let outs = (0..3)
        .map(|i| Output {
            name: format!("part{i}"),
            ty: None,
        })
        .collect();
    let n: NodeIndex = g
        .add_node(
            "split",
            Op::Split {
                axis: 0,
                split: None,
                num_outputs: 3,
            },
            &[Some(x)],
            outs,
        )
        .unwrap();
    let id = g
        .add("id", Op::Identity, &[Value::new(n, 2)], None)
        .unwrap();
    g.outputs.push(("first".into(), Value::new(n, 0)));
    g.outputs.push(("last".into(), id));
    g.outputs.push(("x_again".into(), x));
    let out = run(
        &g,
        &inputs(&[("x", Tensor::i64(vec![5], vec![1, 2, 3, 4, 5]))]),
    )
    .unwrap();
    assert_eq!(out["first"].as_i64().unwrap(), &[1, 2]);
    assert_eq!(out["last"].as_i64().unwrap(), &[5]);
    assert_eq!(out["x_again"].as_i64().unwrap(), &[1, 2, 3, 4, 5]);
}

#[test]
fn shape_subgraph_like_an_onnx_export() {
    // Shape → Gather(1) → Unsqueeze → Concat([-1]) → Reshape: flattens the
    // trailing dims the way exporters compute shapes at run time.
    let mut g = Graph::new();
    let x = g.add_input(
        "x",
        TensorType::new(
            DType::F32,
            vec![Dim::sym("b"), Dim::Fixed(2), Dim::Fixed(3)],
        ),
    );
    let shape = g
        .add(
            "shape",
            Op::Shape {
                start: None,
                end: None,
            },
            &[x],
            None,
        )
        .unwrap();
    let zero = constant(&mut g, "zero", Tensor::scalar_i64(0));
    let b = g
        .add("b", Op::Gather { axis: 0 }, &[shape, zero], None)
        .unwrap();
    let ax = constant(&mut g, "ax", Tensor::i64(vec![1], vec![0]));
    let b1 = g
        .add("b1", Op::Unsqueeze { axes: None }, &[b, ax], None)
        .unwrap();
    let m1 = constant(&mut g, "m1", Tensor::i64(vec![1], vec![-1]));
    let spec = g
        .add("spec", Op::Concat { axis: 0 }, &[b1, m1], None)
        .unwrap();
    let y = g
        .add("y", Op::Reshape { allowzero: false }, &[x, spec], None)
        .unwrap();
    let cnt = g.add("n", Op::Size, &[y], None).unwrap();
    let s = g
        .add("sum", Op::Variadic(VariadicOp::Sum), &[cnt, cnt], None)
        .unwrap();
    g.outputs.push(("y".into(), y));
    g.outputs.push(("n2".into(), s));
    let x = Tensor::f32(vec![2, 2, 3], (0..12).map(|k| k as f32).collect());
    let out = run(&g, &inputs(&[("x", x)])).unwrap();
    assert_eq!(out["y"].shape, vec![2, 6]);
    assert_eq!(out["n2"].as_i64().unwrap(), &[24]);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let len = 200_000;
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[len / 100, 100]));
    let col = constant(
        &mut g,
        "col",
        Tensor::f32(vec![100], (0..100).map(|k| k as f32 * 0.01).collect()),
    );
    let a = g
        .add("a", Op::Binary(BinaryOp::Mul), &[x, col], None)
        .unwrap();
    let b = g.add("b", Op::Unary(UnaryOp::Tanh), &[a], None).unwrap();
    let t = g
        .add("t", Op::Transpose { perm: None }, &[b], None)
        .unwrap();
    let axis = constant(&mut g, "axis", Tensor::scalar_i64(1));
    let c = g
        .add(
            "c",
            Op::CumSum {
                exclusive: false,
                reverse: false,
            },
            &[t, axis],
            None,
        )
        .unwrap();
    g.outputs.push(("y".into(), c));
    let x = Tensor::f32(
        vec![len / 100, 100],
        (0..len)
            .map(|k| ((k * 7919) % 1000) as f32 * 1e-3)
            .collect(),
    );
    let ins = inputs(&[("x", x)]);
    let one = CpuBackend::with_threads(1).run(&g, &ins).unwrap();
    let two = CpuBackend::with_threads(2).run(&g, &ins).unwrap();
    let default = run(&g, &ins).unwrap();
    assert_eq!(one["y"], two["y"]);
    assert_eq!(one["y"], default["y"]);
    assert_eq!(one["y"].shape, vec![100, len / 100]);
}

#[test]
fn a_shape_only_weight_is_a_clear_error() {
    let mut g = Graph::new();
    g.weights.insert(Weight {
        name: "w".into(),
        dtype: DType::F32,
        shape: vec![2],
        data: crate::ir::WeightData::Absent,
        trainable: false,
    });
    let w = g.weight_value("w").unwrap();
    let y = g.add("neg", Op::Unary(UnaryOp::Neg), &[w], None).unwrap();
    g.outputs.push(("y".into(), y));
    let e = run(&g, &HashMap::new()).unwrap_err().to_string();
    assert!(e.contains("'w'") && e.contains("shape-only"), "{e}");
}
