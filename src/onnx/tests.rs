//! Unit tests that build ONNX messages by hand: bad input, functions,
//! external data, round trips.

use super::proto::*;
use super::*;
use crate::ir::{self, DType, Op, TensorType, WeightData};
use crate::Error;
use prost::bytes::Bytes;
use prost::Message;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: fixture {} is absent", p.display());
        None
    }
}

const FIXTURES: [&str; 3] = [
    "tiny_opset17_torchscript.onnx",
    "tiny_opset20_dynamo.onnx",
    "tiny_opset23_dynamo_sdpa.onnx",
];

fn vi(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, ins: &[&str], outs: &[&str]) -> NodeProto {
    NodeProto {
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        name: name.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[i64], vals: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: Bytes::from(
            vals.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        ..Default::default()
    }
}

fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            node: nodes,
            name: "test".into(),
            initializer: inits,
            input: vec![vi("x", 1, &[2])],
            // Typed but not shaped: the op under test decides the shape.
            output: vec![unshaped("y", 1)],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn unshaped(name: &str, elem: i32) -> ValueInfoProto {
    let mut v = vi(name, elem, &[]);
    if let Some(TypeProto {
        value: Some(type_proto::Value::TensorType(t)),
        ..
    }) = &mut v.r#type
    {
        t.shape = None;
    }
    v
}

fn load_model(m: &ModelProto) -> crate::Result<ir::Graph> {
    load_bytes(
        &m.encode_to_vec(),
        Path::new("/nonexistent/test-model.onnx"),
    )
}

/// The error text, checked to name the model file.
fn err_text(r: crate::Result<ir::Graph>, file: &str) -> String {
    let e = match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    let s = e.to_string();
    assert!(
        s.contains(file),
        "error does not name the file '{file}': {s}"
    );
    s
}

// --- fixtures ---------------------------------------------------------------

#[test]
fn fixtures_import_with_mapped_weights() {
    for f in FIXTURES {
        let Some(p) = fixture(f) else { continue };
        let g = load(&p).unwrap();
        assert_eq!(g.meta.format, "onnx");
        assert!(g.meta.default_opset().is_some());
        assert_eq!(g.inputs.len(), 1);
        assert_eq!(g.outputs.len(), 1);
        assert_eq!(g.outputs[0].0, "logits");
        let in_ty = g.node(g.inputs[0]).outputs[0].ty.clone().unwrap();
        assert_eq!(in_ty.to_string(), "i64[batch,seq]");
        let embed = g.weights.get("model.model.embed_tokens.weight").unwrap();
        assert_eq!(embed.shape, vec![256, 64]);
        match &embed.data {
            WeightData::Mapped { file, offset, len } => {
                assert_eq!(file.path, p);
                assert_eq!(*len, 256 * 64 * 4);
                assert!(offset + len <= file.bytes().len());
            }
            other => panic!("{f}: embedding weight not mapped: {other:?}"),
        }
        // The mapped bytes are the checkpoint's values.
        let hf = p.parent().unwrap().join("hf/model.safetensors");
        if hf.exists() {
            let data = std::fs::read(&hf).unwrap();
            let st = safetensors::SafeTensors::deserialize(&data).unwrap();
            let t = st.tensor("model.embed_tokens.weight").unwrap();
            assert_eq!(t.data(), embed.bytes().unwrap(), "{f}");
        }
    }
}

#[test]
fn fixture_op_counts() {
    let Some(p) = fixture("tiny_opset23_dynamo_sdpa.onnx") else {
        return;
    };
    let g = load(&p).unwrap();
    let h = g.op_histogram();
    assert_eq!(h.get("RMSNormalization"), Some(&5));
    assert_eq!(h.get("RotaryEmbedding"), Some(&4));
    assert_eq!(h.get("onnx.Attention"), Some(&2));
    assert_eq!(h.get("MatMul"), Some(&15));
    let Some(p) = fixture("tiny_opset17_torchscript.onnx") else {
        return;
    };
    let g = load(&p).unwrap();
    let h = g.op_histogram();
    assert_eq!(h.get("Constant"), Some(&181));
    assert_eq!(h.get("ReduceMean"), Some(&5));
    // Opset 17: ReduceMean keeps its axes attribute.
    let rm =
        g.g.node_weights()
            .find(|n| n.op.name() == "ReduceMean")
            .unwrap();
    assert!(matches!(&rm.op, Op::Reduce { axes: Some(a), keepdims: true, .. } if a == &vec![-1]));
}

#[test]
fn fixtures_round_trip_to_identical_print() {
    let dir = tempfile::tempdir().unwrap();
    for f in FIXTURES {
        let Some(p) = fixture(f) else { continue };
        let g1 = load(&p).unwrap();
        let p1 = ir::print(&g1).unwrap();
        for (i, opts) in [
            ExportOptions::default(),
            ExportOptions {
                external_data: ExternalData::Always,
                size_threshold: 0,
                location: Some("weights.bin".into()),
            },
        ]
        .iter()
        .enumerate()
        {
            let out = dir.path().join(format!("{i}_{f}"));
            save(&g1, &out, opts).unwrap();
            let g2 = load(&out).unwrap();
            assert_eq!(p1, ir::print(&g2).unwrap(), "{f} with {opts:?}");
            for w in g1.weights.iter() {
                let w2 = g2.weights.get(&w.name).unwrap();
                assert_eq!(w.bytes(), w2.bytes(), "{f}: weight {}", w.name);
                assert!(matches!(w2.data, WeightData::Mapped { .. }));
            }
            assert_eq!(g2.meta.default_opset(), g1.meta.default_opset());
        }
    }
}

// --- bad input ----------------------------------------------------------------

#[test]
fn empty_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.onnx");
    std::fs::write(&p, b"").unwrap();
    let s = err_text(load(&p), "empty.onnx");
    assert!(s.contains("empty"), "{s}");
}

#[test]
fn truncated_model_is_rejected() {
    let Some(src) = fixture("tiny_opset17_torchscript.onnx") else {
        return;
    };
    let bytes = std::fs::read(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("half.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let s = err_text(load(&p), "half.onnx");
    assert!(s.contains("truncated"), "{s}");
}

#[test]
fn random_bytes_are_rejected() {
    let mut state = 0x1234_5678_9abc_def0u64;
    for len in [1usize, 7, 100, 4096] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect();
        err_text(load_bytes(&bytes, Path::new("random.onnx")), "random.onnx");
    }
}

#[test]
fn huge_dims_rejected_before_allocation() {
    let mut t = f32_init("w", &[1 << 40, 1 << 40], &[]);
    t.raw_data = Bytes::new();
    let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(
        s.contains("initializer 'w'") && s.contains("more elements"),
        "{s}"
    );
    // Large but representable: the size check (not an allocation) fails.
    let t = f32_init("w", &[1 << 20, 1 << 20], &[1.0]);
    let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("raw_data has 4 bytes"), "{s}");
}

#[test]
fn short_raw_data_is_rejected() {
    let t = f32_init("w", &[2, 3], &[1.0, 2.0]);
    let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(
        s.contains("raw_data has 8 bytes") && s.contains("needs 24"),
        "{s}"
    );
    // Typed fields are counted too.
    let t = TensorProto {
        name: "w".into(),
        dims: vec![3],
        data_type: 1,
        float_data: vec![1.0],
        ..Default::default()
    };
    let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("float_data has 1 values"), "{s}");
}

#[test]
fn negative_dim_and_unsupported_dtype_are_rejected() {
    let mut t = f32_init("w", &[-1], &[]);
    t.raw_data = Bytes::new();
    let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("negative dimension"), "{s}");
    let mut t = f32_init("w", &[2], &[1.0, 2.0]);
    t.data_type = 8;
    let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("STRING"), "{s}");
}

fn external_tensor(name: &str, location: &str, offset: u64, len: u64) -> TensorProto {
    let e = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    TensorProto {
        name: name.into(),
        dims: vec![2],
        data_type: 1,
        data_location: DATA_LOCATION_EXTERNAL,
        external_data: vec![
            e("location", location.into()),
            e("offset", offset.to_string()),
            e("length", len.to_string()),
        ],
        ..Default::default()
    }
}

#[test]
fn external_data_is_mapped_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = [0.0f32, 0.0, 1.5, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("w.bin"), &data).unwrap();
    let write = |t: TensorProto| {
        let m = model(vec![node("Add", "add", &["x", "w"], &["y"])], vec![t], 17);
        let p = dir.path().join("m.onnx");
        std::fs::write(&p, m.encode_to_vec()).unwrap();
        load(&p)
    };
    let g = write(external_tensor("w", "w.bin", 8, 8)).unwrap();
    let w = g.weights.get("w").unwrap();
    assert!(matches!(
        w.data,
        WeightData::Mapped {
            offset: 8,
            len: 8,
            ..
        }
    ));
    assert_eq!(w.to_tensor().unwrap().as_f32().unwrap(), &[1.5, -2.0]);

    let s = err_text(write(external_tensor("w", "missing.bin", 0, 8)), "m.onnx");
    assert!(
        s.contains("missing.bin") && s.contains("cannot open"),
        "{s}"
    );
    let s = err_text(write(external_tensor("w", "w.bin", 12, 8)), "m.onnx");
    assert!(s.contains("has 16 bytes") && s.contains("truncated"), "{s}");
    let s = err_text(write(external_tensor("w", "w.bin", u64::MAX, 8)), "m.onnx");
    assert!(s.contains("offset"), "{s}");
    let s = err_text(write(external_tensor("w", "../w.bin", 0, 8)), "m.onnx");
    assert!(s.contains("no '..'"), "{s}");
    let s = err_text(write(external_tensor("w", "/etc/passwd", 0, 8)), "m.onnx");
    assert!(s.contains("relative path"), "{s}");
    let s = err_text(write(external_tensor("w", "w.bin", 0, 12)), "m.onnx");
    assert!(s.contains("length is 12"), "{s}");
}

#[test]
fn cycle_is_rejected() {
    let m = model(
        vec![
            node("Add", "a", &["x", "c"], &["b"]),
            node("Neg", "n", &["b"], &["c"]),
            node("Identity", "out", &["b"], &["y"]),
        ],
        vec![],
        17,
    );
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("cycle"), "{s}");
}

#[test]
fn undefined_value_is_rejected() {
    let m = model(
        vec![node("Add", "adder", &["x", "ghost"], &["y"])],
        vec![],
        17,
    );
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("'adder'") && s.contains("'ghost'"), "{s}");
}

#[test]
fn duplicate_definition_is_rejected() {
    let m = model(
        vec![
            node("Neg", "n1", &["x"], &["y"]),
            node("Neg", "n2", &["x"], &["y"]),
        ],
        vec![],
        17,
    );
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("defined twice") && s.contains("n2"), "{s}");
}

#[test]
fn unsupported_op_names_node_type_domain_opset() {
    let m = model(
        vec![node("Einsum", "my_einsum", &["x"], &["y"])],
        vec![],
        19,
    );
    match load_model(&m) {
        Err(Error::UnsupportedOp {
            node,
            op_type,
            domain,
            opset,
        }) => {
            assert_eq!(node, "my_einsum");
            assert_eq!(op_type, "Einsum");
            assert_eq!(domain, "ai.onnx");
            assert_eq!(opset, 19);
        }
        other => panic!("expected UnsupportedOp, got {other:?}"),
    }
    let mut n = node("FusedMatMul", "fm", &["x", "x"], &["y"]);
    n.domain = "com.microsoft".into();
    let mut m = model(vec![n], vec![], 17);
    m.opset_import.push(OperatorSetIdProto {
        domain: "com.microsoft".into(),
        version: 1,
    });
    let e = load_model(&m).unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedOp { domain, opset: 1, .. } if domain == "com.microsoft"),
        "{e}"
    );
}

#[test]
fn wrong_attribute_type_is_rejected() {
    let mut n = node("Softmax", "sm", &["x"], &["y"]);
    n.attribute.push(AttributeProto {
        name: "axis".into(),
        r#type: attr_type::FLOAT,
        f: 1.0,
        ..Default::default()
    });
    let s = err_text(load_model(&model(vec![n], vec![], 17)), "test-model.onnx");
    assert!(s.contains("'axis' is FLOAT, expected INT"), "{s}");
}

// --- op forms -------------------------------------------------------------------

#[test]
fn softmax_default_axis_depends_on_opset() {
    let m = model(vec![node("Softmax", "sm", &["x"], &["y"])], vec![], 13);
    let g = load_model(&m).unwrap();
    assert!(g.g.node_weights().any(|n| n.op == Op::Softmax { axis: -1 }));
    // Opset 11 on a rank-1 input: axis 1 defaults... and is out of range for
    // rank 1, so lcc refuses the coerced 2-D form rather than guess.
    let m = model(vec![node("Softmax", "sm", &["x"], &["y"])], vec![], 11);
    assert!(load_model(&m).is_err());
}

#[test]
fn moved_attributes_keep_their_form() {
    let axes = AttributeProto {
        name: "axes".into(),
        r#type: attr_type::INTS,
        ints: vec![0],
        ..Default::default()
    };
    let mut n = node("ReduceMean", "rm", &["x"], &["y"]);
    n.attribute.push(axes.clone());
    let g = load_model(&model(vec![n], vec![], 17)).unwrap();
    assert!(g
        .g
        .node_weights()
        .any(|n| matches!(&n.op, Op::Reduce { axes: Some(a), .. } if a == &vec![0])));
    let ax = TensorProto {
        name: "ax".into(),
        dims: vec![1],
        data_type: 7,
        int64_data: vec![0],
        ..Default::default()
    };
    let n = node("ReduceMean", "rm", &["x", "ax"], &["y"]);
    let g = load_model(&model(vec![n], vec![ax.clone()], 18)).unwrap();
    let rm =
        g.g.node_indices()
            .find(|&i| g.node(i).op.name() == "ReduceMean")
            .unwrap();
    assert!(matches!(g.node(rm).op, Op::Reduce { axes: None, .. }));
    assert!(g.inputs_of(rm)[1].is_some());
    // Absent optional input in the middle: Slice(x, s, e, "", steps).
    let st = TensorProto {
        name: "st".into(),
        int64_data: vec![1],
        ..ax.clone()
    };
    let n = node("Slice", "sl", &["x", "ax", "ax", "", "st"], &["y"]);
    let g = load_model(&model(vec![n], vec![ax, st], 13)).unwrap();
    let sl =
        g.g.node_indices()
            .find(|&i| g.node(i).op == Op::Slice)
            .unwrap();
    let ins = g.inputs_of(sl);
    assert_eq!(ins.len(), 5);
    assert!(ins[3].is_none() && ins[4].is_some());
    // Export writes the attribute form back as an input at opset 18.
    let mut n = node("ReduceMean", "rm", &["x"], &["y"]);
    n.attribute.push(axes);
    let mut g = load_model(&model(vec![n], vec![], 17)).unwrap();
    g.meta.opsets = vec![(String::new(), 18)];
    let mp = super::export::to_model_proto(&g).unwrap();
    let gp = mp.graph.unwrap();
    let rm = gp.node.iter().find(|n| n.op_type == "ReduceMean").unwrap();
    assert_eq!(rm.input.len(), 2);
    assert!(rm.attribute.iter().all(|a| a.name != "axes"));
}

#[test]
fn constants_in_every_attribute_form() {
    let mk = |name: &str, a: AttributeProto| {
        let mut n = node("Constant", name, &[], &[name]);
        n.attribute.push(a);
        n
    };
    let nodes = vec![
        mk(
            "c1",
            AttributeProto {
                name: "value_float".into(),
                r#type: attr_type::FLOAT,
                f: 2.5,
                ..Default::default()
            },
        ),
        mk(
            "c2",
            AttributeProto {
                name: "value_ints".into(),
                r#type: attr_type::INTS,
                ints: vec![3, 4],
                ..Default::default()
            },
        ),
        mk(
            "c3",
            AttributeProto {
                name: "value".into(),
                r#type: attr_type::TENSOR,
                t: Some(TensorProto {
                    dims: vec![2],
                    data_type: 10,
                    int32_data: vec![0x3c00, 0xc000],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        node("Mul", "m", &["x", "c1"], &["y"]),
    ];
    let mut m = model(nodes, vec![], 17);
    m.graph.as_mut().unwrap().output.push(vi("c2", 7, &[2]));
    m.graph.as_mut().unwrap().output.push(vi("c3", 10, &[2]));
    let g = load_model(&m).unwrap();
    let consts: Vec<_> =
        g.g.node_weights()
            .filter_map(|n| match &n.op {
                Op::Constant { value } => Some((n.name.clone(), value.clone())),
                _ => None,
            })
            .collect();
    let get = |n: &str| consts.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get("c1").as_f32().unwrap(), &[2.5]);
    assert!(get("c1").shape.is_empty());
    assert_eq!(get("c2").as_i64().unwrap(), &[3, 4]);
    let c3 = get("c3");
    assert_eq!(c3.dtype, DType::F16);
    assert_eq!(c3.as_f32().unwrap(), &[1.0, -2.0]);
}

#[test]
fn model_local_functions_are_inlined() {
    // custom.ScaledSilu(X) = X * Sigmoid(X) * alpha, alpha an attribute.
    let mut body_mul = node("Mul", "scale", &["s", "alpha_c"], &["Y"]);
    body_mul.attribute.clear();
    let mut alpha_node = node("Constant", "alpha", &[], &["alpha_c"]);
    alpha_node.attribute.push(AttributeProto {
        name: "value_float".into(),
        ref_attr_name: "alpha".into(),
        r#type: attr_type::FLOAT,
        ..Default::default()
    });
    let f = FunctionProto {
        name: "ScaledSilu".into(),
        domain: "custom".into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute: vec!["alpha".into()],
        node: vec![
            node("Sigmoid", "sig", &["X"], &["sg"]),
            node("Mul", "silu", &["X", "sg"], &["s"]),
            alpha_node,
            body_mul,
        ],
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        ..Default::default()
    };
    let call = |name: &str, i: &str, o: &str, alpha: f32| {
        let mut n = node("ScaledSilu", name, &[i], &[o]);
        n.domain = "custom".into();
        n.attribute.push(AttributeProto {
            name: "alpha".into(),
            r#type: attr_type::FLOAT,
            f: alpha,
            ..Default::default()
        });
        n
    };
    let mut m = model(
        vec![call("f1", "x", "h", 2.0), call("f2", "h", "y", 3.0)],
        vec![],
        17,
    );
    m.functions.push(f);
    m.opset_import.push(OperatorSetIdProto {
        domain: "custom".into(),
        version: 1,
    });
    let g = load_model(&m).unwrap();
    let h = g.op_histogram();
    assert_eq!(h.get("Sigmoid"), Some(&2));
    assert_eq!(h.get("Mul"), Some(&4));
    let mut alphas: Vec<f32> =
        g.g.node_weights()
            .filter_map(|n| match &n.op {
                Op::Constant { value } => Some(value.as_f32().unwrap()[0]),
                _ => None,
            })
            .collect();
    alphas.sort_by(f32::total_cmp);
    assert_eq!(alphas, vec![2.0, 3.0]);
    assert_eq!(g.outputs[0].0, "y");
}

// --- export -----------------------------------------------------------------

#[test]
fn external_data_export_is_aligned_sparse_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = ir::Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[4]));
    let big = 3 << 20; // 3 MiB of zeros with a few values at the end
    let mut vals = vec![0f32; big / 4];
    let n = vals.len();
    vals[n - 1] = 7.0;
    vals[n - 2] = -1.0;
    let big_t = ir::Tensor::f32(vec![n], vals);
    g.weights
        .insert(ir::Weight::from_tensor("big", &big_t, false));
    let small = ir::Tensor::f32(vec![4], vec![1.0, 2.0, 3.0, 4.0]);
    g.weights
        .insert(ir::Weight::from_tensor("small", &small, false));
    let s = g.weight_value("small").unwrap();
    let y = g
        .add(
            "add",
            Op::Binary(ir::BinaryOp::Add),
            &[x, s],
            Some(TensorType::fixed(DType::F32, &[4])),
        )
        .unwrap();
    let _ = g.weight_value("big").unwrap();
    g.outputs.push(("y".into(), y));
    g.meta.props.push(("hf.config".into(), "{\"a\": 1}".into()));
    let p = dir.path().join("m.onnx");
    let opts = ExportOptions {
        external_data: ExternalData::Always,
        ..Default::default()
    };
    save(&g, &p, &opts).unwrap();
    let data = dir.path().join("m.onnx.data");
    let md = std::fs::metadata(&data).unwrap();
    assert_eq!(md.len(), big as u64);
    use std::os::unix::fs::MetadataExt;
    // Two of the three MiB are holes (blocks are 512 bytes).
    assert!(
        md.blocks() * 512 < 2 << 20,
        "data file not sparse: {} blocks",
        md.blocks()
    );
    let g2 = load(&p).unwrap();
    assert_eq!(g2.meta.prop("hf.config"), Some("{\"a\": 1}"));
    let b = g2.weights.get("big").unwrap();
    assert!(matches!(&b.data, WeightData::Mapped { offset: 0, .. }));
    assert_eq!(b.bytes(), g.weights.get("big").unwrap().bytes());
    // Below the threshold: embedded.
    let sm = g2.weights.get("small").unwrap();
    assert!(matches!(&sm.data, WeightData::Mapped { file, .. } if file.path == p));
    // Re-export onto the same paths while the old files are mapped.
    save(&g2, &p, &opts).unwrap();
    let g3 = load(&p).unwrap();
    assert_eq!(g3.weights.get("big").unwrap().bytes(), b.bytes());
    assert_eq!(ir::print(&g3).unwrap(), ir::print(&g).unwrap());
}

#[test]
fn never_embeds_and_absent_weights_fail() {
    let mut g = ir::Graph::new();
    let x = g.add_input("x", TensorType::fixed(DType::F32, &[2]));
    g.weights.insert(ir::Weight {
        name: "w".into(),
        dtype: DType::F32,
        shape: vec![2],
        data: WeightData::Absent,
        trainable: false,
    });
    let w = g.weight_value("w").unwrap();
    let y = g
        .add("m", Op::Binary(ir::BinaryOp::Mul), &[x, w], None)
        .unwrap();
    g.outputs.push(("y".into(), y));
    let dir = tempfile::tempdir().unwrap();
    let e = save(&g, &dir.path().join("m.onnx"), &ExportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("'w' has no data"), "{e}");
}

#[test]
fn recursive_function_is_rejected() {
    let mut inner = node("Loopy", "again", &["X"], &["Y"]);
    inner.domain = "custom".into();
    let f = FunctionProto {
        name: "Loopy".into(),
        domain: "custom".into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        node: vec![inner],
        ..Default::default()
    };
    let mut call = node("Loopy", "top", &["x"], &["y"]);
    call.domain = "custom".into();
    let mut m = model(vec![call], vec![], 17);
    m.functions.push(f);
    let s = err_text(load_model(&m), "test-model.onnx");
    assert!(s.contains("nest deeper"), "{s}");
}
