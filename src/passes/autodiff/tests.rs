//! The pass against finite differences: differentiate a graph in f64, then
//! compare each weight gradient with central differences of the loss output
//! of the same graph with that weight perturbed.

use super::*;
use crate::ir::{verify, Weight};
use crate::passes::{Pipeline, RunOptions};
use crate::util::SplitMix64;
use std::path::Path;

fn rand_f64(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        .map(|x| x * scale)
        .collect()
}

fn t64(shape: &[usize], v: Vec<f64>) -> Tensor {
    Tensor {
        dtype: DType::F64,
        shape: shape.to_vec(),
        data: TensorData::F64(v),
    }
}

/// Every weight and float value type to f64; LoRA B (zeros at init, which
/// would make dA vanish) to small random values.
fn to_f64(graph: &mut Graph, rng: &mut SplitMix64) {
    let names: Vec<String> = graph.weights.iter().map(|w| w.name.clone()).collect();
    for name in names {
        let w = graph.weights.get(&name).unwrap();
        let t = w.to_tensor().unwrap();
        let mut v = t.to_f64_vec();
        if name.ends_with("lora_B.weight") {
            v = rand_f64(rng, v.len(), 0.2);
        }
        let trainable = w.trainable;
        graph
            .weights
            .insert(Weight::from_tensor(name, &t64(&t.shape, v), trainable));
    }
    let nodes: Vec<NodeIndex> = graph.g.node_indices().collect();
    for n in nodes {
        for o in &mut graph.g[n].outputs {
            if let Some(ty) = &mut o.ty {
                if ty.dtype == DType::F32 {
                    ty.dtype = DType::F64;
                }
            }
        }
    }
}

fn loss_of(graph: &Graph, inputs: &HashMap<String, Tensor>) -> f64 {
    let out = crate::runtime::cpu::run(graph, inputs).unwrap();
    out["loss"].to_f64_vec()[0]
}

/// Compares `grad:<w>` with central differences at `per_weight` coordinates
/// of every trainable weight (spread over the tensor); returns the largest
/// error relative to the gradient's max |value|.
fn check_grads_fd(
    graph: &Graph,
    info: &GradInfo,
    inputs: &HashMap<String, Tensor>,
    per_weight: usize,
) -> f64 {
    let out = crate::runtime::cpu::run(graph, inputs).unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    for (name, output) in &info.grads {
        let g = out[output].to_f64_vec();
        let w = graph.weights.get(name).unwrap().to_tensor().unwrap();
        assert_eq!(out[output].shape, w.shape, "{name}: gradient shape");
        let base = w.to_f64_vec();
        let scale = g.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-9);
        let step = (base.len() / per_weight).max(1);
        for i in (0..base.len()).step_by(step).take(per_weight) {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut gp = graph.clone();
                gp.weights
                    .insert(Weight::from_tensor(name.clone(), &t64(&w.shape, v), true));
                loss_of(&gp, inputs)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let err = (fd - g[i]).abs() / scale;
            assert!(
                err < 1e-5,
                "{name}[{i}]: autodiff {} vs finite differences {fd} (max |g| {scale})",
                g[i]
            );
            worst = worst.max(err);
        }
    }
    worst
}

fn ty(dims: &[usize]) -> Option<TensorType> {
    Some(TensorType::fixed(DType::F64, dims))
}

/// A graph of ONNX primitives around an embedding: broadcasting Mul, Add,
/// Sub, Div, Neg, MatMul, Reshape, Transpose, Identity and a no-op Cast.
fn primitive_graph(rng: &mut SplitMix64) -> Graph {
    let mut g = Graph::new();
    let (b, s, v, h) = (2usize, 4usize, 5usize, 3usize);
    let ids = g.add_input("input_ids", TensorType::fixed(DType::I64, &[b, s]));
    let mut weight = |g: &mut Graph, name: &str, shape: &[usize], trainable: bool, off: f64| {
        let n = shape.iter().product();
        let vals: Vec<f64> = rand_f64(rng, n, 0.5).into_iter().map(|x| x + off).collect();
        g.weights
            .insert(Weight::from_tensor(name, &t64(shape, vals), trainable));
        g.weight_value(name).unwrap()
    };
    let table = weight(&mut g, "embed", &[v, h], true, 0.0);
    let scale = weight(&mut g, "scale", &[h], true, 1.0);
    let shift = weight(&mut g, "shift", &[1, 1, h], true, 0.0);
    let frozen = weight(&mut g, "frozen", &[s, 1], false, 0.0);
    let denom = weight(&mut g, "denom", &[h], true, 2.0);
    let proj = weight(&mut g, "proj", &[h, v], true, 0.0);
    let x = g
        .add("embed", Op::Embedding, &[table, ids], ty(&[b, s, h]))
        .unwrap();
    let bin = |g: &mut Graph, name: &str, op: BinaryOp, a: Value, c: Value| {
        g.add(name, Op::Binary(op), &[a, c], ty(&[b, s, h]))
            .unwrap()
    };
    let x = bin(&mut g, "mul", BinaryOp::Mul, x, scale);
    let x = bin(&mut g, "mul_self", BinaryOp::Mul, x, x);
    let x = bin(&mut g, "add", BinaryOp::Add, x, shift);
    let x = bin(&mut g, "sub", BinaryOp::Sub, frozen, x);
    let x = bin(&mut g, "div", BinaryOp::Div, x, denom);
    let denom2 = g
        .add(
            "denom2",
            Op::Binary(BinaryOp::Mul),
            &[denom, denom],
            ty(&[h]),
        )
        .unwrap();
    let x = bin(&mut g, "div2", BinaryOp::Div, x, denom2);
    let x = g
        .add("neg", Op::Unary(UnaryOp::Neg), &[x], ty(&[b, s, h]))
        .unwrap();
    let x = g.add("id", Op::Identity, &[x], ty(&[b, s, h])).unwrap();
    let x = g
        .add("cast", Op::Cast { to: DType::F64 }, &[x], ty(&[b, s, h]))
        .unwrap();
    let shape = g
        .add(
            "shape",
            Op::Constant {
                value: Tensor::i64(vec![2], vec![(b * s) as i64, h as i64]),
            },
            &[],
            None,
        )
        .unwrap();
    let x = g
        .add(
            "flat",
            Op::Reshape { allowzero: false },
            &[x, shape],
            ty(&[b * s, h]),
        )
        .unwrap();
    let x = g
        .add("t", Op::Transpose { perm: None }, &[x], ty(&[h, b * s]))
        .unwrap();
    let x = g
        .add(
            "t_back",
            Op::Transpose {
                perm: Some(vec![1, 0]),
            },
            &[x],
            ty(&[b * s, h]),
        )
        .unwrap();
    let shape3 = g
        .add(
            "shape3",
            Op::Constant {
                value: Tensor::i64(vec![3], vec![b as i64, s as i64, h as i64]),
            },
            &[],
            None,
        )
        .unwrap();
    let x = g
        .add(
            "unflat",
            Op::Reshape { allowzero: false },
            &[x, shape3],
            ty(&[b, s, h]),
        )
        .unwrap();
    let logits = g
        .add("head", Op::MatMul, &[x, proj], ty(&[b, s, v]))
        .unwrap();
    g.outputs.push(("logits".into(), logits));
    g
}

#[test]
fn primitive_ops_match_finite_differences() {
    let mut rng = SplitMix64::new(5);
    let mut g = primitive_graph(&mut rng);
    verify(&g).unwrap();
    let info = autodiff(&mut g, &AutodiffOptions::default()).unwrap();
    verify(&g).unwrap();
    let names: Vec<&str> = info.grads.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(names, ["embed", "scale", "shift", "denom", "proj"]);
    let outs: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        outs,
        [
            "loss",
            "grad:embed",
            "grad:scale",
            "grad:shift",
            "grad:denom",
            "grad:proj"
        ]
    );
    let inputs = HashMap::from([
        (
            "input_ids".to_string(),
            Tensor::i64(vec![2, 4], vec![0, 3, 4, 1, 2, 2, 0, 4]),
        ),
        (
            "labels".to_string(),
            Tensor::i64(vec![2, 4], vec![0, 3, -100, 1, 2, 2, 0, 4]),
        ),
    ]);
    let err = check_grads_fd(&g, &info, &inputs, 1000);
    eprintln!("primitive graph: max rel err vs FD {err:.2e}");
}

/// The tiny LLaMA with LoRA on q,k,v,o and trainable embed + norms, in f64.
fn tiny_training_graph(extra: &str) -> Graph {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf");
    let mut g = crate::hf::load(&dir).unwrap();
    let p = Pipeline::from_names(&format!("lora,trainable{extra}")).unwrap();
    p.run(
        &mut g,
        &RunOptions {
            verify: true,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap();
    let mut rng = SplitMix64::new(42);
    to_f64(&mut g, &mut rng);
    g
}

fn tiny_inputs(seq: usize) -> HashMap<String, Tensor> {
    let ids: Vec<i64> = (0..2 * seq as i64).map(|i| (i * 37 + 11) % 256).collect();
    let mut labels = ids.clone();
    labels[3] = -100;
    labels[seq + 1] = -100;
    labels[2 * seq - 1] = -100;
    HashMap::from([
        ("input_ids".to_string(), Tensor::i64(vec![2, seq], ids)),
        ("labels".to_string(), Tensor::i64(vec![2, seq], labels)),
    ])
}

#[test]
fn tiny_model_structure_after_autodiff() {
    let mut g = tiny_training_graph("");
    let trainable: Vec<String> = g
        .weights
        .iter()
        .filter(|w| w.trainable)
        .map(|w| w.name.clone())
        .collect();
    let info = autodiff(&mut g, &AutodiffOptions::default()).unwrap();
    verify(&g).unwrap();
    assert_eq!(info.loss, "loss");
    let names: Vec<String> = info.grads.iter().map(|(w, _)| w.clone()).collect();
    assert_eq!(names, trainable);
    // 2 layers × 4 LoRA projections × (A, B) + embed + 2×2 layer norms + final norm.
    assert_eq!(names.len(), 2 * 4 * 2 + 1 + 4 + 1);
    let h = g.op_histogram();
    assert_eq!(h.get("Attention"), None);
    assert_eq!(h["AttentionFwd"], 2);
    assert_eq!(h["AttentionGrad"], 2);
    assert_eq!(h["RmsNormGrad"], 5);
    assert_eq!(h["EmbeddingGrad"], 1);
    // LoRA A and B of 8 projections; no frozen weight gets a LinearGradWeight.
    assert_eq!(h["LinearGradWeight"], 16);
    let outs: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(outs[0], "loss");
    assert!(!outs.contains(&"logits"));
}

#[test]
fn tiny_model_gradients_match_finite_differences() {
    let mut g = tiny_training_graph("");
    let info = autodiff(&mut g, &AutodiffOptions::default()).unwrap();
    let err = check_grads_fd(&g, &info, &tiny_inputs(6), 3);
    eprintln!("tiny LLaMA (LoRA + embed + norms): max rel err vs FD {err:.2e}");
}

#[test]
fn tiny_model_full_finetuning_and_s2attn_match_finite_differences() {
    // Every weight trainable (pretraining), shifted sparse attention.
    let mut g = tiny_training_graph(",s2attn");
    let names: Vec<String> = g.weights.iter().map(|w| w.name.clone()).collect();
    for n in names {
        g.weights.get_mut(&n).unwrap().trainable = true;
    }
    let info = autodiff(&mut g, &AutodiffOptions::default()).unwrap();
    verify(&g).unwrap();
    let err = check_grads_fd(&g, &info, &tiny_inputs(8), 2);
    eprintln!("tiny LLaMA (all weights, S²-Attn): max rel err vs FD {err:.2e}");
}

#[test]
fn errors_name_what_to_do() {
    let mut rng = SplitMix64::new(1);
    // No trainable weight.
    let mut g = primitive_graph(&mut rng);
    let names: Vec<String> = g.weights.iter().map(|w| w.name.clone()).collect();
    for n in &names {
        g.weights.get_mut(n).unwrap().trainable = false;
    }
    let e = autodiff(&mut g, &AutodiffOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no weight is trainable") && e.contains("lora"),
        "{e}"
    );

    // No logits output.
    let mut g = primitive_graph(&mut rng);
    g.outputs[0].0 = "out".into();
    let e = autodiff(&mut g, &AutodiffOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no output 'logits'"), "{e}");

    // An op without a rule on the gradient path.
    let mut g = primitive_graph(&mut rng);
    let logits = g.outputs[0].1;
    let sm = g
        .add("softmax", Op::Softmax { axis: -1 }, &[logits], None)
        .unwrap();
    g.outputs[0].1 = sm;
    let e = autodiff(&mut g, &AutodiffOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'softmax' (Softmax)") && e.contains("raise"),
        "{e}"
    );

    // LoRA dropout.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf");
    let mut g = crate::hf::load(&dir).unwrap();
    let mut p = Pipeline::from_names("lora").unwrap();
    p.set("lora.dropout=0.1").unwrap();
    p.run(&mut g, &RunOptions::default(), |_, _| {}).unwrap();
    let e = autodiff(&mut g, &AutodiffOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dropout") && e.contains("not support"), "{e}");

    // Twice.
    let mut g = primitive_graph(&mut rng);
    autodiff(&mut g, &AutodiffOptions::default()).unwrap();
    g.outputs.push(("logits".into(), g.outputs[0].1));
    let e = autodiff(&mut g, &AutodiffOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already has an input 'labels'"), "{e}");
}

#[test]
fn the_pass_runs_from_the_registry() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf");
    let mut g = crate::hf::load(&dir).unwrap();
    let p = Pipeline::from_names("lora,trainable,autodiff").unwrap();
    let reports = p
        .run(
            &mut g,
            &RunOptions {
                verify: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap();
    let r = reports.last().unwrap();
    assert_eq!(r.pass, "autodiff");
    assert_eq!(r.matched, 22);
    assert!(r.notes[0].contains("22 gradients"), "{}", r.notes[0]);
}
