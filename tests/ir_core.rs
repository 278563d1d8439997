//! The IR's own contracts: canonical print, verifier, patches, diffs.

use lcc::ir::{
    self, diff, BinaryOp, DType, Dim, Graph, Op, Output, Patch, PatchValue, Tensor, TensorType,
    UnaryOp, Weight,
};

fn ty(dims: &[Dim]) -> TensorType {
    TensorType::new(DType::F32, dims.to_vec())
}

/// x → Add(x, w) → Neg → output, built in the given insertion order.
fn small_graph(reverse_weight_first: bool) -> Graph {
    let mut g = Graph::new();
    let w = Tensor::f32(vec![4], vec![1.0, 2.0, 3.0, 4.0]);
    g.weights.insert(Weight::from_tensor("bias", &w, false));
    let (x, wv) = if reverse_weight_first {
        let wv = g.weight_value("bias").unwrap();
        (
            g.add_input("x", ty(&[Dim::sym("batch"), Dim::Fixed(4)])),
            wv,
        )
    } else {
        let x = g.add_input("x", ty(&[Dim::sym("batch"), Dim::Fixed(4)]));
        (x, g.weight_value("bias").unwrap())
    };
    let sum = g
        .add(
            "add",
            Op::Binary(BinaryOp::Add),
            &[x, wv],
            Some(ty(&[Dim::sym("batch"), Dim::Fixed(4)])),
        )
        .unwrap();
    let neg = g.add("neg", Op::Unary(UnaryOp::Neg), &[sum], None).unwrap();
    g.outputs.push(("y".into(), neg));
    g
}

#[test]
fn canonical_print_is_independent_of_insertion_order() {
    let a = ir::print(&small_graph(false)).unwrap();
    let b = ir::print(&small_graph(true)).unwrap();
    assert_eq!(a, b);
    let expected = "graph {
  input %x: f32[batch,4]
  weight @bias: f32[4]
  %0 = Add(%x, @bias) : f32[batch,4]
  %1 = Neg(%0) : f32[batch,4]
  output y = %1 : f32[batch,4]
}
";
    assert_eq!(a, expected);
}

#[test]
fn verify_accepts_a_well_formed_graph() {
    ir::verify(&small_graph(false)).unwrap();
}

#[test]
fn verify_rejects_a_cycle() {
    let mut g = small_graph(false);
    let add =
        g.g.node_indices()
            .find(|&n| g.node(n).name == "add")
            .unwrap();
    let neg =
        g.g.node_indices()
            .find(|&n| g.node(n).name == "neg")
            .unwrap();
    g.set_input(add, 1, Some(lcc::ir::Value::new(neg, 0)));
    let err = ir::verify(&g).unwrap_err().to_string();
    assert!(err.contains("cycle"), "{err}");
}

#[test]
fn verify_rejects_a_missing_required_input_and_wrong_types() {
    let mut g = small_graph(false);
    let add =
        g.g.node_indices()
            .find(|&n| g.node(n).name == "add")
            .unwrap();
    g.set_input(add, 1, None);
    let err = ir::verify(&g).unwrap_err().to_string();
    assert!(err.contains("required input 1"), "{err}");

    let mut g = small_graph(false);
    let ids = g.add_input("ids", TensorType::new(DType::I64, vec![Dim::Fixed(4)]));
    let x = lcc::ir::Value::new(g.inputs[0], 0);
    g.add("bad", Op::Binary(BinaryOp::Mul), &[x, ids], None)
        .unwrap();
    let err = ir::verify(&g).unwrap_err().to_string();
    assert!(err.contains("operand types differ"), "{err}");
}

#[test]
fn verify_rejects_a_weight_missing_from_the_store() {
    let mut g = small_graph(false);
    g.weights.remove("bias");
    let err = ir::verify(&g).unwrap_err().to_string();
    assert!(err.contains("weight 'bias' is not in the model"), "{err}");
}

#[test]
fn add_node_rejects_an_undefined_value() {
    let mut g = small_graph(false);
    let ghost = lcc::ir::Value::new(lcc::ir::NodeIndex::new(999), 0);
    let err = g
        .add("n", Op::Unary(UnaryOp::Exp), &[ghost], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn patch_replaces_a_value_and_drops_dead_nodes() {
    let mut g = small_graph(false);
    let neg = g.outputs[0].1;
    let add = g.inputs_of(neg.node)[0].unwrap();
    // Replace Neg(Add(x, w)) by Exp(Add(x, w)).
    let mut p = Patch::new();
    let exp = p.add(
        "exp",
        Op::Unary(UnaryOp::Exp),
        &[Some(PatchValue::Existing(add))],
        vec![Output {
            name: "exp".into(),
            ty: None,
        }],
    );
    p.replace(neg, exp);
    let stats = g.apply(p).unwrap();
    assert_eq!(stats.added, 1);
    assert_eq!(stats.removed, 1);
    let text = ir::print(&g).unwrap();
    assert!(text.contains("%1 = Exp(%0)"), "{text}");
    assert!(!text.contains("Neg"), "{text}");
}

#[test]
fn diff_reports_changed_attributes_added_nodes_and_weights() {
    let a = small_graph(false);
    let mut b = small_graph(false);
    // Change an attribute-bearing node: put a Softmax after Neg in b, and a weight.
    let neg = b.outputs[0].1;
    let sm = b.add("sm", Op::Softmax { axis: -1 }, &[neg], None).unwrap();
    b.outputs[0].1 = sm;
    b.weights
        .insert(Weight::from_tensor("extra", &Tensor::scalar_f32(1.0), true));
    let d = diff::diff(&a, &b).unwrap();
    assert_eq!(d.nodes_added.len(), 1);
    assert_eq!(d.nodes_added[0].op, "Softmax");
    assert!(d.nodes_removed.is_empty());
    assert_eq!(d.weights_added.len(), 1);
    assert_eq!(d.params_after - d.params_before, 1);

    let mut c = small_graph(false);
    let n = c.outputs[0].1;
    let sm2 = c.add("sm", Op::Softmax { axis: 0 }, &[n], None).unwrap();
    c.outputs[0].1 = sm2;
    let d = diff::diff(&b, &c).unwrap();
    assert_eq!(d.nodes_changed.len(), 1, "{d:?}");
    assert_eq!(d.nodes_changed[0].attrs[0].attr, "axis");
    assert_eq!(d.nodes_changed[0].attrs[0].before.as_deref(), Some("-1"));
    assert_eq!(d.nodes_changed[0].attrs[0].after.as_deref(), Some("0"));
    assert!(diff::diff(&a, &small_graph(true)).unwrap().is_empty());
}

#[test]
fn tensor_bytes_round_trip_through_storage_types() {
    let t = Tensor::f32(vec![3], vec![1.0, -2.5, 65504.0]);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let mut u = t.clone();
        u.dtype = dt;
        let back = Tensor::from_le_bytes(dt, vec![3], &u.to_le_bytes()).unwrap();
        assert_eq!(back.as_f32().unwrap()[..2], [1.0, -2.5]);
    }
    let err = Tensor::from_le_bytes(DType::F32, vec![4], &[0u8; 15])
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs 16 bytes, got 15"), "{err}");
    let err = Tensor::from_le_bytes(DType::F32, vec![1 << 40, 1 << 40], &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("overflows"), "{err}");
}

#[test]
fn rope_frequencies_follow_transformers_formulas() {
    use lcc::ir::{rope, RopeAttrs, RopeScaling};
    let base = RopeAttrs {
        num_heads: 1,
        head_dim: 8,
        rotary_dim: 8,
        theta: 10000.0,
        scaling: RopeScaling::None,
    };
    let (f, s) = rope::inv_freq(&base, 16);
    assert_eq!(s, 1.0);
    // 1 / 10000^(i/8) for i = 0, 2, 4, 6
    let expect = [1.0f32, 0.1, 0.01, 0.001];
    for (a, b) in f.iter().zip(expect) {
        assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
    }
    let lin = RopeAttrs {
        scaling: RopeScaling::Linear { factor: 4.0 },
        ..base.clone()
    };
    let (g, _) = rope::inv_freq(&lin, 16);
    for (a, b) in g.iter().zip(&f) {
        assert!((a * 4.0 - b).abs() < 1e-9);
    }
    // Dynamic NTK leaves short sequences alone.
    let dy = RopeAttrs {
        scaling: RopeScaling::Dynamic {
            factor: 2.0,
            original_max_position_embeddings: 32,
        },
        ..base.clone()
    };
    assert_eq!(rope::inv_freq(&dy, 32).0, f);
    assert!(rope::inv_freq(&dy, 64).0[1] < f[1]);
}
