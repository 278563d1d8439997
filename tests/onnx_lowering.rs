//! LLaMA-level graphs exported to ONNX run in onnxruntime and match a NumPy
//! reference (tests/onnx_lowering_check.py); fixture exports re-exported by
//! lcc still give the golden logits. Both need Python with onnx and
//! onnxruntime (`LCC_PYTHON`, default /work/pyenv/bin/python, else python3);
//! without it the checks print that they were skipped.

use lcc::ir::{
    AttentionAttrs, AttentionPattern, BinaryOp, DType, Dim, Graph, Op, RopeAttrs, RopeScaling,
    Tensor, TensorType, Value, Weight,
};
use lcc::onnx::{load, save, ExportOptions, ExternalData};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("LCC_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/work/pyenv/bin/python"),
            PathBuf::from("python3"),
        ])
        .collect();
    for p in candidates {
        let ok = Command::new(&p)
            .args(["-c", "import onnx, onnxruntime, numpy, safetensors"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(p);
        }
    }
    eprintln!("skipped: no python with onnx, onnxruntime, numpy and safetensors (set LCC_PYTHON)");
    None
}

fn run_check(py: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_lowering_check.py");
    let out = Command::new(py).arg(&script).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "check failed: {args:?}\n{text}");
}

struct Cfg {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scaling: RopeScaling,
    position_ids: bool,
}

/// Deterministic uniform values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn seq_ty(dtype: DType, last: Option<usize>) -> TensorType {
    let mut d = vec![Dim::sym("batch"), Dim::sym("seq")];
    if let Some(l) = last {
        d.push(Dim::Fixed(l as u64));
    }
    TensorType::new(dtype, d)
}

fn weight(g: &mut Graph, rng: &mut Lcg, name: &str, shape: Vec<usize>, norm: bool) -> Value {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let r = rng.next();
            if norm {
                1.0 + 0.1 * r
            } else {
                0.2 * r
            }
        })
        .collect();
    g.weights
        .insert(Weight::from_tensor(name, &Tensor::f32(shape, v), false));
    g.weight_value(name).unwrap()
}

fn lin(g: &mut Graph, rng: &mut Lcg, name: &str, x: Value, out: usize, inp: usize) -> Value {
    let w = weight(g, rng, &format!("{name}.weight"), vec![out, inp], false);
    g.add(
        name,
        Op::Linear,
        &[x, w],
        Some(seq_ty(DType::F32, Some(out))),
    )
    .unwrap()
}

fn build(cfg: &Cfg, seed: u64) -> Graph {
    let mut g = Graph::new();
    let mut rng = Lcg(seed);
    let (h, kv, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
    let ids = g.add_input("input_ids", seq_ty(DType::I64, None));
    let pos = cfg
        .position_ids
        .then(|| g.add_input("position_ids", seq_ty(DType::I64, None)));
    let hid = Some(seq_ty(DType::F32, Some(cfg.hidden)));
    let embed = weight(
        &mut g,
        &mut rng,
        "model.embed_tokens.weight",
        vec![cfg.vocab, cfg.hidden],
        false,
    );
    let mut x = g
        .add("embed", Op::Embedding, &[embed, ids], hid.clone())
        .unwrap();
    let rope = |heads: usize| {
        Op::Rope(RopeAttrs {
            num_heads: heads,
            head_dim: d,
            rotary_dim: d,
            theta: 10000.0,
            scaling: cfg.scaling.clone(),
        })
    };
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}.");
        let w_in = weight(
            &mut g,
            &mut rng,
            &format!("{p}input_layernorm.weight"),
            vec![cfg.hidden],
            true,
        );
        let hn = g
            .add(
                "norm_in",
                Op::RmsNorm { eps: 1e-5 },
                &[x, w_in],
                hid.clone(),
            )
            .unwrap();
        let q = lin(
            &mut g,
            &mut rng,
            &format!("{p}self_attn.q_proj"),
            hn,
            h * d,
            cfg.hidden,
        );
        let k = lin(
            &mut g,
            &mut rng,
            &format!("{p}self_attn.k_proj"),
            hn,
            kv * d,
            cfg.hidden,
        );
        let v = lin(
            &mut g,
            &mut rng,
            &format!("{p}self_attn.v_proj"),
            hn,
            kv * d,
            cfg.hidden,
        );
        let rope_in = |x: Value| -> Vec<Value> {
            match pos {
                Some(p) => vec![x, p],
                None => vec![x],
            }
        };
        let q = g.add("rope_q", rope(h), &rope_in(q), None).unwrap();
        let k = g.add("rope_k", rope(kv), &rope_in(k), None).unwrap();
        let attn = Op::Attention(AttentionAttrs {
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            pattern: AttentionPattern::FullCausal,
        });
        let a = g.add("attn", attn, &[q, k, v], None).unwrap();
        let o = lin(
            &mut g,
            &mut rng,
            &format!("{p}self_attn.o_proj"),
            a,
            cfg.hidden,
            h * d,
        );
        x = g
            .add("res1", Op::Binary(BinaryOp::Add), &[x, o], hid.clone())
            .unwrap();
        let w_post = weight(
            &mut g,
            &mut rng,
            &format!("{p}post_attention_layernorm.weight"),
            vec![cfg.hidden],
            true,
        );
        let hn = g
            .add(
                "norm_post",
                Op::RmsNorm { eps: 1e-5 },
                &[x, w_post],
                hid.clone(),
            )
            .unwrap();
        let gate = lin(
            &mut g,
            &mut rng,
            &format!("{p}mlp.gate_proj"),
            hn,
            cfg.inter,
            cfg.hidden,
        );
        let up = lin(
            &mut g,
            &mut rng,
            &format!("{p}mlp.up_proj"),
            hn,
            cfg.inter,
            cfg.hidden,
        );
        let act = g.add("swiglu", Op::SwiGlu, &[gate, up], None).unwrap();
        let down = lin(
            &mut g,
            &mut rng,
            &format!("{p}mlp.down_proj"),
            act,
            cfg.hidden,
            cfg.inter,
        );
        x = g
            .add("res2", Op::Binary(BinaryOp::Add), &[x, down], hid.clone())
            .unwrap();
    }
    let wn = weight(
        &mut g,
        &mut rng,
        "model.norm.weight",
        vec![cfg.hidden],
        true,
    );
    let x = g
        .add("norm", Op::RmsNorm { eps: 1e-5 }, &[x, wn], hid.clone())
        .unwrap();
    let wl = weight(
        &mut g,
        &mut rng,
        "lm_head.weight",
        vec![cfg.vocab, cfg.hidden],
        false,
    );
    let logits = g
        .add(
            "lm_head",
            Op::Linear,
            &[x, wl],
            Some(seq_ty(DType::F32, Some(cfg.vocab))),
        )
        .unwrap();
    g.outputs.push(("logits".into(), logits));

    let rope_scaling = match &cfg.scaling {
        RopeScaling::None => serde_json::Value::Null,
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Dynamic { factor, .. } => {
            serde_json::json!({"rope_type": "dynamic", "factor": factor})
        }
        other => panic!("no reference for {other:?}"),
    };
    let max_pos = match &cfg.scaling {
        RopeScaling::Dynamic {
            original_max_position_embeddings,
            ..
        } => *original_max_position_embeddings,
        _ => 64,
    };
    let config = serde_json::json!({
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.inter,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "head_dim": d,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_pos,
    });
    g.meta.format = "built".into();
    g.meta.props.push(("hf.config".into(), config.to_string()));
    lcc::ir::verify(&g).unwrap();
    g
}

fn tiny(scaling: RopeScaling, position_ids: bool) -> Cfg {
    Cfg {
        vocab: 32,
        hidden: 32,
        inter: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        scaling,
        position_ids,
    }
}

#[test]
fn lowered_llama_matches_numpy_reference_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("plain", tiny(RopeScaling::None, false)),
        (
            "linear_pos",
            tiny(RopeScaling::Linear { factor: 2.0 }, true),
        ),
        (
            "dynamic",
            tiny(
                RopeScaling::Dynamic {
                    factor: 2.0,
                    original_max_position_embeddings: 6,
                },
                false,
            ),
        ),
        (
            "dynamic_pos",
            tiny(
                RopeScaling::Dynamic {
                    factor: 3.0,
                    original_max_position_embeddings: 6,
                },
                true,
            ),
        ),
    ];
    let py = python();
    for (i, (name, cfg)) in cases.iter().enumerate() {
        let g = build(cfg, 42 + i as u64);
        let path = dir.path().join(format!("{name}.onnx"));
        save(&g, &path, &ExportOptions::default()).unwrap();
        // The export is primitive-only, opset 17, weights kept by name.
        let back = load(&path).unwrap();
        assert_eq!(back.meta.default_opset(), Some(17));
        assert!(back.g.node_weights().all(|n| !n.op.is_llama_level()));
        for w in g.weights.iter() {
            let w2 = back.weights.get(&w.name).expect("weight name kept");
            assert_eq!(w2.shape, w.shape, "{} keeps its HF layout", w.name);
            assert_eq!(w2.bytes(), w.bytes());
        }
        assert_eq!(back.meta.prop("hf.config"), g.meta.prop("hf.config"));
        // Lowered twice gives the same graph (deterministic export).
        let path2 = dir.path().join(format!("{name}_again.onnx"));
        save(&g, &path2, &ExportOptions::default()).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&path2).unwrap()
        );
        if let Some(py) = &py {
            run_check(py, &["lowered", path.to_str().unwrap()]);
        }
    }
    // External data: the same check through the data file.
    let g = build(&tiny(RopeScaling::None, false), 7);
    let path = dir.path().join("ext.onnx");
    let opts = ExportOptions {
        external_data: ExternalData::Always,
        ..Default::default()
    };
    save(&g, &path, &opts).unwrap();
    assert!(dir.path().join("ext.onnx.data").exists());
    if let Some(py) = &py {
        run_check(py, &["lowered", path.to_str().unwrap()]);
    }
}

#[test]
fn reexported_fixtures_give_golden_logits() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    if !fx.exists() {
        eprintln!("skipped: {} is absent", fx.display());
        return;
    }
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "tiny_opset17_torchscript.onnx",
        "tiny_opset20_dynamo.onnx",
        "tiny_opset23_dynamo_sdpa.onnx",
    ] {
        let g = load(&fx.join(f)).unwrap();
        let out = dir.path().join(f);
        save(&g, &out, &ExportOptions::default()).unwrap();
        for s in ["s7", "s16"] {
            run_check(
                &py,
                &[
                    "golden",
                    out.to_str().unwrap(),
                    fx.join(format!("inputs_{s}.safetensors")).to_str().unwrap(),
                    fx.join(format!("logits_{s}.safetensors")).to_str().unwrap(),
                ],
            );
        }
    }
}
