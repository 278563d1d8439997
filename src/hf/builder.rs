//! The LLaMA forward graph from a config and Hugging Face weights, with the
//! LLaMA-level ops, reading like `LlamaForCausalLM.forward`:
//!
//! ```text
//! h = Embedding(model.embed_tokens.weight, input_ids)
//! for each layer i:
//!   x = RmsNorm(h, input_layernorm)
//!   q, k, v = Linear(x, q_proj), Linear(x, k_proj), Linear(x, v_proj)
//!   a = Attention(Rope(q), Rope(k), v)          # causal, GQA, 1/sqrt(head_dim)
//!   h = h + Linear(a, o_proj)
//!   x = RmsNorm(h, post_attention_layernorm)
//!   h = h + Linear(SwiGlu(Linear(x, gate_proj), Linear(x, up_proj)), down_proj)
//! logits = Linear(RmsNorm(h, model.norm), lm_head)  # or the embedding when tied
//! ```
//!
//! Node names are Hugging Face module paths (`model.layers.0.self_attn.q_proj`);
//! activations are f32 whatever the weights' storage type.

use crate::ir::{
    AttentionAttrs, AttentionPattern, BinaryOp, DType, Dim, Graph, LlamaConfig, ModelMeta, Op,
    TensorType, Value, Weight, WeightData, WeightStore, CONFIG_PROP,
};
use crate::{Error, Result};
use std::path::PathBuf;

/// The metadata key listing checkpoint tensors the builder did not use.
pub const IGNORED_PROP: &str = "hf.ignored_tensors";

/// Every tensor a checkpoint for `cfg` must hold, with its shape, in
/// module order.
pub fn expected_weights(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let inter = cfg.intermediate_size;
    let mut w: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        w.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (proj, out, inp, bias) in [
            ("self_attn.q_proj", q_out, h, cfg.attention_bias),
            ("self_attn.k_proj", kv_out, h, cfg.attention_bias),
            ("self_attn.v_proj", kv_out, h, cfg.attention_bias),
            ("self_attn.o_proj", h, q_out, cfg.attention_bias),
            ("mlp.gate_proj", inter, h, cfg.mlp_bias),
            ("mlp.up_proj", inter, h, cfg.mlp_bias),
            ("mlp.down_proj", h, inter, cfg.mlp_bias),
        ] {
            if proj == "mlp.gate_proj" {
                w.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            }
            w.push((format!("{p}.{proj}.weight"), vec![out, inp]));
            if bias {
                w.push((format!("{p}.{proj}.bias"), vec![out]));
            }
        }
    }
    w.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        w.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    w
}

/// A weight store with every expected tensor typed from the config and no
/// values: a shape-only model that can be inspected but not run.
pub fn shape_only_weights(cfg: &LlamaConfig) -> WeightStore {
    let dtype = cfg.weight_dtype();
    let mut store = WeightStore::new();
    for (name, shape) in expected_weights(cfg) {
        store.insert(Weight {
            name,
            dtype,
            shape,
            data: WeightData::Absent,
            trainable: false,
        });
    }
    store
}

/// The files a store's weights come from, for error messages.
fn source_files(store: &WeightStore) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = store
        .iter()
        .filter_map(|w| match &w.data {
            WeightData::Mapped { file, .. } => Some(file.path.clone()),
            _ => None,
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

fn weight_error(w: Option<&Weight>, msg: String) -> Error {
    match w.map(|w| &w.data) {
        Some(WeightData::Mapped { file, .. }) => Error::format(&file.path, msg),
        _ => Error::invalid(msg),
    }
}

/// Checks `weights` against `cfg` and builds the forward graph. Tensors the
/// model does not use (e.g. `rotary_emb.inv_freq`, or `lm_head.weight` when
/// the embeddings are tied) are dropped and listed in the graph's
/// `hf.ignored_tensors` property.
pub fn build_llama(cfg: &LlamaConfig, mut weights: WeightStore) -> Result<Graph> {
    // Shapes from a config can be absurd; refuse before anything is sized by them.
    for (name, v) in [
        (
            "vocab_size × hidden_size",
            cfg.vocab_size.checked_mul(cfg.hidden_size),
        ),
        (
            "num_attention_heads × head_dim × hidden_size",
            cfg.num_attention_heads
                .checked_mul(cfg.head_dim)
                .and_then(|x| x.checked_mul(cfg.hidden_size)),
        ),
        (
            "intermediate_size × hidden_size",
            cfg.intermediate_size.checked_mul(cfg.hidden_size),
        ),
    ] {
        if v.is_none_or(|n| n.checked_mul(8).is_none()) {
            return Err(Error::invalid(format!(
                "config.json: {name} overflows; the config is not a real model"
            )));
        }
    }
    let expected = expected_weights(cfg);
    let files = source_files(&weights);
    let mut ordered = WeightStore::new();
    for (name, shape) in &expected {
        let Some(w) = weights.remove(name) else {
            let from = if files.is_empty() {
                "the weights given".to_string()
            } else {
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let why = if name == "lm_head.weight" {
                " (config.json says tie_word_embeddings is false)"
            } else {
                ""
            };
            return Err(Error::invalid(format!(
                "tensor '{name}' (shape {shape:?}) is missing from {from}{why}"
            )));
        };
        if w.shape != *shape {
            return Err(weight_error(
                Some(&w),
                format!(
                    "tensor '{name}' has shape {:?}, config.json expects {shape:?} (hidden_size {}, intermediate_size {}, heads {}/{} kv, head_dim {}, vocab_size {})",
                    w.shape,
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.num_attention_heads,
                    cfg.num_key_value_heads,
                    cfg.head_dim,
                    cfg.vocab_size
                ),
            ));
        }
        if !w.dtype.is_float() {
            return Err(weight_error(
                Some(&w),
                format!(
                    "tensor '{name}' is {}, a LLaMA weight must be a float type",
                    w.dtype
                ),
            ));
        }
        ordered.insert(w);
    }
    let ignored: Vec<String> = weights.iter().map(|w| w.name.clone()).collect();

    let mut g = Graph::new();
    g.weights = ordered;
    g.meta = ModelMeta {
        format: "hf".into(),
        graph_name: Some("LlamaForCausalLM".into()),
        props: vec![(CONFIG_PROP.into(), cfg.to_prop_text())],
        ..ModelMeta::default()
    };
    if !ignored.is_empty() {
        g.meta.props.push((IGNORED_PROP.into(), ignored.join(",")));
    }
    Builder { g: &mut g, cfg }.forward()?;
    Ok(g)
}

struct Builder<'a> {
    g: &'a mut Graph,
    cfg: &'a LlamaConfig,
}

impl Builder<'_> {
    /// f32 `[batch, seq, width]`.
    fn act(width: usize) -> Option<TensorType> {
        Some(TensorType::new(
            DType::F32,
            vec![Dim::sym("batch"), Dim::sym("seq"), Dim::Fixed(width as u64)],
        ))
    }

    fn linear(&mut self, module: &str, x: Value, out: usize, bias: bool) -> Result<Value> {
        let w = self.g.weight_value(&format!("{module}.weight"))?;
        let mut ins = vec![x, w];
        if bias {
            ins.push(self.g.weight_value(&format!("{module}.bias"))?);
        }
        self.g.add(module, Op::Linear, &ins, Self::act(out))
    }

    fn rms_norm(&mut self, module: &str, x: Value) -> Result<Value> {
        let w = self.g.weight_value(&format!("{module}.weight"))?;
        let eps = self.cfg.rms_norm_eps as f32;
        self.g.add(
            module,
            Op::RmsNorm { eps },
            &[x, w],
            Self::act(self.cfg.hidden_size),
        )
    }

    fn add(&mut self, name: &str, a: Value, b: Value) -> Result<Value> {
        self.g.add(
            name,
            Op::Binary(BinaryOp::Add),
            &[a, b],
            Self::act(self.cfg.hidden_size),
        )
    }

    fn forward(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let ids = self.g.add_input(
            "input_ids",
            TensorType::new(DType::I64, vec![Dim::sym("batch"), Dim::sym("seq")]),
        );
        let embed = self.g.weight_value("model.embed_tokens.weight")?;
        let mut h = self.g.add(
            "model.embed_tokens",
            Op::Embedding,
            &[embed, ids],
            Self::act(cfg.hidden_size),
        )?;
        let q_width = cfg.num_attention_heads * cfg.head_dim;
        let kv_width = cfg.num_key_value_heads * cfg.head_dim;
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let x = self.rms_norm(&format!("{p}.input_layernorm"), h)?;
            let bias = cfg.attention_bias;
            let q = self.linear(&format!("{attn}.q_proj"), x, q_width, bias)?;
            let k = self.linear(&format!("{attn}.k_proj"), x, kv_width, bias)?;
            let v = self.linear(&format!("{attn}.v_proj"), x, kv_width, bias)?;
            let q = self.g.add(
                format!("{attn}.rope_q"),
                Op::Rope(cfg.rope_attrs(cfg.num_attention_heads)),
                &[q],
                Self::act(q_width),
            )?;
            let k = self.g.add(
                format!("{attn}.rope_k"),
                Op::Rope(cfg.rope_attrs(cfg.num_key_value_heads)),
                &[k],
                Self::act(kv_width),
            )?;
            let a = self.g.add(
                attn.clone(),
                Op::Attention(AttentionAttrs {
                    num_heads: cfg.num_attention_heads,
                    num_kv_heads: cfg.num_key_value_heads,
                    head_dim: cfg.head_dim,
                    scale: (cfg.head_dim as f64).powf(-0.5) as f32,
                    pattern: AttentionPattern::FullCausal,
                }),
                &[q, k, v],
                Self::act(q_width),
            )?;
            let o = self.linear(&format!("{attn}.o_proj"), a, cfg.hidden_size, bias)?;
            h = self.add(&format!("{p}.attn_residual"), h, o)?;
            let x = self.rms_norm(&format!("{p}.post_attention_layernorm"), h)?;
            let mlp = format!("{p}.mlp");
            let bias = cfg.mlp_bias;
            let gate = self.linear(&format!("{mlp}.gate_proj"), x, cfg.intermediate_size, bias)?;
            let up = self.linear(&format!("{mlp}.up_proj"), x, cfg.intermediate_size, bias)?;
            let act = self.g.add(
                format!("{mlp}.act_fn"),
                Op::SwiGlu,
                &[gate, up],
                Self::act(cfg.intermediate_size),
            )?;
            let down = self.linear(&format!("{mlp}.down_proj"), act, cfg.hidden_size, bias)?;
            h = self.add(&format!("{p}.mlp_residual"), h, down)?;
        }
        let h = self.rms_norm("model.norm", h)?;
        let head = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let w = self.g.weight_value(head)?;
        let logits = self
            .g
            .add("lm_head", Op::Linear, &[h, w], Self::act(cfg.vocab_size))?;
        self.g.outputs.push(("logits".into(), logits));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{print, verify, RopeScaling, Tensor};
    use std::path::Path;

    pub(crate) fn tiny_config(extra: &[(&str, serde_json::Value)]) -> LlamaConfig {
        let mut v = serde_json::json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0
        });
        for (k, x) in extra {
            v.as_object_mut().unwrap().insert(k.to_string(), x.clone());
        }
        LlamaConfig::from_value(v, Path::new("config.json")).unwrap()
    }

    fn filled(cfg: &LlamaConfig) -> WeightStore {
        let mut s = WeightStore::new();
        for (i, (name, shape)) in expected_weights(cfg).into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let t = Tensor::f32(shape, (0..n).map(|j| (i * 1000 + j) as f32).collect());
            s.insert(Weight::from_tensor(name, &t, false));
        }
        s
    }

    #[test]
    fn builds_a_graph_that_verifies() {
        let cfg = tiny_config(&[]);
        let g = build_llama(&cfg, filled(&cfg)).unwrap();
        verify(&g).unwrap();
        let h = g.op_histogram();
        assert_eq!(h["Linear"], 2 * 7 + 1);
        assert_eq!(h["Rope"], 4);
        assert_eq!(h["Attention"], 2);
        assert_eq!(h["RmsNorm"], 5);
        assert_eq!(h["SwiGlu"], 2);
        assert_eq!(h["Add"], 4);
        assert_eq!(h["Embedding"], 1);
        assert_eq!(g.weights.len(), 1 + 2 * 9 + 2);
        let (name, out) = &g.outputs[0];
        assert_eq!(name, "logits");
        assert_eq!(g.value_type(*out).unwrap().to_string(), "f32[batch,seq,32]");
        let text = print(&g).unwrap();
        assert!(text.contains("input %input_ids: i64[batch,seq]"), "{text}");
        assert!(text.contains(
            "Attention{heads=4, kv_heads=2, head_dim=4, scale=0.5, pattern=full_causal}"
        ));
        assert!(text.contains("Rope{heads=2, head_dim=4, theta=10000.0}"));
        assert!(g
            .g
            .node_weights()
            .any(|n| n.name == "model.layers.1.self_attn.q_proj"));
        assert_eq!(g.meta.format, "hf");
        let back =
            LlamaConfig::from_json_str(g.meta.prop(CONFIG_PROP).unwrap(), Path::new("p")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn biases_ties_and_scaling_are_honoured() {
        let cfg = tiny_config(&[
            ("attention_bias", true.into()),
            ("mlp_bias", true.into()),
            ("tie_word_embeddings", true.into()),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 2.0}),
            ),
        ]);
        let mut store = filled(&cfg);
        store.insert(Weight::from_tensor(
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            &Tensor::f32(vec![2], vec![1.0, 0.5]),
            false,
        ));
        let g = build_llama(&cfg, store).unwrap();
        verify(&g).unwrap();
        assert!(!g.weights.contains("lm_head.weight"));
        assert!(!g
            .weights
            .contains("model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert_eq!(
            g.meta.prop(IGNORED_PROP),
            Some("model.layers.0.self_attn.rotary_emb.inv_freq")
        );
        let text = print(&g).unwrap();
        assert!(text.contains("Linear(%"), "{text}");
        assert!(
            text.contains("@model.layers.0.self_attn.q_proj.bias)"),
            "{text}"
        );
        assert!(
            text.contains("@model.layers.1.mlp.down_proj.bias)"),
            "{text}"
        );
        assert!(
            text.contains("@model.embed_tokens.weight) : f32[batch,seq,32]"),
            "{text}"
        );
        assert!(text.contains("scaling=linear, factor=2.0"), "{text}");
        let rope =
            g.g.node_weights()
                .find_map(|n| match &n.op {
                    Op::Rope(r) => Some(r.clone()),
                    _ => None,
                })
                .unwrap();
        assert_eq!(rope.scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn missing_or_misshapen_weights_are_named() {
        let cfg = tiny_config(&[]);
        let mut store = filled(&cfg);
        store.remove("model.layers.1.mlp.up_proj.weight");
        let e = build_llama(&cfg, store).unwrap_err().to_string();
        assert!(
            e.contains("tensor 'model.layers.1.mlp.up_proj.weight' (shape [24, 16]) is missing"),
            "{e}"
        );

        let mut store = filled(&cfg);
        store.insert(Weight::from_tensor(
            "model.layers.0.self_attn.k_proj.weight",
            &Tensor::f32(vec![16, 16], vec![0.0; 256]),
            false,
        ));
        let e = build_llama(&cfg, store).unwrap_err().to_string();
        assert!(
            e.contains("tensor 'model.layers.0.self_attn.k_proj.weight' has shape [16, 16], config.json expects [8, 16]"),
            "{e}"
        );

        let mut store = filled(&cfg);
        store.remove("lm_head.weight");
        let e = build_llama(&cfg, store).unwrap_err().to_string();
        assert!(e.contains("tie_word_embeddings is false"), "{e}");
    }

    #[test]
    fn shape_only_models_build() {
        let cfg = tiny_config(&[("torch_dtype", "float16".into())]);
        let g = build_llama(&cfg, shape_only_weights(&cfg)).unwrap();
        verify(&g).unwrap();
        let w = g.weights.get("model.norm.weight").unwrap();
        assert_eq!(w.dtype, DType::F16);
        assert!(matches!(w.data, WeightData::Absent));
    }
}
