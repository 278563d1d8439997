//! The LLaMA model description: what a graph records about the model it is
//! (sizes, RoPE theta and scaling, the trained context), in the graph
//! property [`CONFIG_PROP`]. Importers write it, passes read and update it
//! ([`LlamaConfig::from_graph`], [`LlamaConfig::store_in`]), exporters write
//! it out again; none of them needs to know the others.
//!
//! The property's text is the model's Hugging Face `config.json`, in both
//! the transformers 4.x form (`rope_theta` + `rope_scaling`) and the 5.x form
//! (`rope_parameters`): that is what ONNX files lcc wrote carry in their
//! metadata, and what a Hugging Face export writes back byte for byte. Reading
//! the file from disk is `hf::read_config`.
//!
//! The raw JSON is kept, so keys lcc does not know (tokenizer ids,
//! `architectures`, …) survive a load/save round trip; [`LlamaConfig::to_json`]
//! writes back only the fields whose values changed, in the form the file was
//! read in.
//!
//! Defaults follow transformers' `LlamaConfig`: `num_key_value_heads` =
//! `num_attention_heads`, `head_dim` = `hidden_size / num_attention_heads`,
//! `max_position_embeddings` = 2048, `rms_norm_eps` = 1e-6, `rope_theta` =
//! 10000, `partial_rotary_factor` = 1, biases and tied embeddings off. Only
//! `model_type` "llama" (or no `model_type`) is accepted: Mistral and Qwen2
//! configs differ in ways that change the forward (sliding windows, q/k/v
//! biases that `attention_bias` does not describe).

use super::{DType, Graph, RopeAttrs, RopeScaling};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The graph property holding the model's [`LlamaConfig`] as config.json
/// text. The key is older than this module; ONNX files lcc wrote carry it.
pub const CONFIG_PROP: &str = "hf.config";

/// How errors name the property as a source.
const PROP_SOURCE: &str = "<graph property hf.config>";

/// More layers than any real model has (LLaMA-3 405B has 126); a bound that
/// keeps a hostile config from making the builder loop for ever.
const MAX_LAYERS: usize = 100_000;

/// Which transformers generation wrote the file; `to_json` writes the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigForm {
    /// `rope_theta` at top level, `rope_scaling` (or null) beside it.
    V4,
    /// `rope_parameters` { rope_type, rope_theta, factor, … }.
    V5,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: u64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// `dtype` (5.x) or `torch_dtype` (4.x), e.g. "bfloat16".
    pub dtype: Option<String>,
    pub partial_rotary_factor: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub form: ConfigForm,
    /// The JSON as read; unknown keys survive `to_json`.
    pub raw: Value,
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Typed field access with errors that name the file and the field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    /// Prefix for nested dicts (`rope_scaling.`).
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }

    fn missing(&self, key: &str) -> Error {
        self.err(format!(
            "missing required field '{}{key}' (a LLaMA config.json declares it)",
            self.prefix
        ))
    }

    fn wrong(&self, key: &str, expected: &str, v: &Value) -> Error {
        self.err(format!(
            "field '{}{key}' must be {expected}, got {}",
            self.prefix,
            describe(v)
        ))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a finite number", v)),
        }
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.missing(key))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    fn obj_opt(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_object()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an object (or null)", v)),
        }
    }
}

/// Keys of a rope dict that lcc interprets (and rewrites when the scaling
/// changes); any other key is kept as it is.
const ROPE_KEYS: &[&str] = &[
    "type",
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "rope_theta",
    "partial_rotary_factor",
];

impl LlamaConfig {
    /// Whether the file states `max_position_embeddings` (else the field
    /// holds transformers' default, 2048, which says nothing about how long
    /// the model was trained).
    pub fn records_max_position_embeddings(&self) -> bool {
        self.raw
            .get("max_position_embeddings")
            .is_some_and(|v| v.is_u64())
    }

    /// The config the graph records in [`CONFIG_PROP`], if it has one.
    pub fn from_graph(graph: &Graph) -> Option<Result<LlamaConfig>> {
        let text = graph.meta.prop(CONFIG_PROP)?;
        Some(Self::from_json_str(text, Path::new(PROP_SOURCE)))
    }

    /// The property text for this config (what [`Self::store_in`] writes).
    pub fn to_prop_text(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).expect("JSON serializes")
    }

    /// Writes this config back into the graph's existing [`CONFIG_PROP`]
    /// (where it stands among the properties); a graph without one is left
    /// as it is.
    pub fn store_in(&self, graph: &mut Graph) {
        if let Some(p) = graph.meta.props.iter_mut().find(|(k, _)| k == CONFIG_PROP) {
            p.1 = self.to_prop_text();
        }
    }

    /// Parses config text; `path` names the source in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<LlamaConfig> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_value(raw, path)
    }

    /// Interprets parsed JSON; `path` names the source in errors.
    pub fn from_value(raw: Value, path: &Path) -> Result<LlamaConfig> {
        let obj = raw.as_object().ok_or_else(|| {
            Error::format(
                path,
                format!("must be a JSON object, got {}", describe(&raw)),
            )
        })?;
        let f = Fields {
            path,
            obj,
            prefix: "",
        };
        if let Some(mt) = f.str_opt("model_type")? {
            if mt != "llama" {
                return Err(f.err(format!(
                    "model_type '{mt}' is not supported; lcc reads LLaMA configs (model_type \"llama\")"
                )));
            }
        }
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(f.err(format!(
                    "hidden_act '{act}' is not supported; LLaMA uses \"silu\" (SwiGLU)"
                )));
            }
        }
        let vocab_size = f.usize_req("vocab_size")?;
        let hidden_size = f.usize_req("hidden_size")?;
        let intermediate_size = f.usize_req("intermediate_size")?;
        let num_hidden_layers = f.usize_req("num_hidden_layers")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        for (k, v) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
        ] {
            if v == 0 {
                return Err(f.err(format!("field '{k}' must be at least 1, got 0")));
            }
        }
        if num_hidden_layers > MAX_LAYERS {
            return Err(f.err(format!(
                "num_hidden_layers {num_hidden_layers} is not a real model (lcc accepts at most {MAX_LAYERS})"
            )));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(format!(
                "num_key_value_heads ({num_key_value_heads}) must divide num_attention_heads ({num_attention_heads})"
            )));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(0) => return Err(f.err("field 'head_dim' must be at least 1, got 0".into())),
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and head_dim is not given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let max_position_embeddings = f
            .usize_opt("max_position_embeddings")?
            .map_or(2048, |v| v as u64);
        let rms_norm_eps = f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps < 0.0 {
            return Err(f.err(format!(
                "field 'rms_norm_eps' must not be negative, got {rms_norm_eps}"
            )));
        }
        let tie_word_embeddings = f.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        let attention_bias = f.bool_opt("attention_bias")?.unwrap_or(false);
        let mlp_bias = f.bool_opt("mlp_bias")?.unwrap_or(false);
        let dtype = match f.str_opt("dtype")? {
            Some(d) => Some(d.to_string()),
            None => f.str_opt("torch_dtype")?.map(str::to_string),
        };

        // transformers 5 gives `rope_scaling` priority over `rope_parameters`
        // when both are present (`convert_rope_params_to_dict`).
        let scaling_dict = f.obj_opt("rope_scaling")?;
        let params_dict = f.obj_opt("rope_parameters")?;
        let (form, rope_dict, prefix) = match (scaling_dict, params_dict) {
            (Some(d), _) => (ConfigForm::V4, Some(d), "rope_scaling."),
            (None, Some(d)) => (ConfigForm::V5, Some(d), "rope_parameters."),
            (None, None) => (ConfigForm::V4, None, "rope_scaling."),
        };
        let empty = Map::new();
        let r = Fields {
            path,
            obj: rope_dict.unwrap_or(&empty),
            prefix,
        };
        let rope_theta = match r.f64_opt("rope_theta")? {
            Some(t) => t,
            None => f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
        };
        if rope_theta <= 1.0 {
            return Err(r.err(format!(
                "rope_theta must be greater than 1, got {rope_theta}"
            )));
        }
        let partial_rotary_factor = match r.f64_opt("partial_rotary_factor")? {
            Some(p) => p,
            None => f.f64_opt("partial_rotary_factor")?.unwrap_or(1.0),
        };
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(f.err(format!(
                "partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}"
            )));
        }
        let rotary_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        if rotary_dim == 0 || rotary_dim % 2 != 0 {
            return Err(f.err(format!(
                "head_dim {head_dim} × partial_rotary_factor {partial_rotary_factor} gives {rotary_dim} rotary channels; RoPE needs a positive even number"
            )));
        }
        let rope_scaling = parse_scaling(&r, max_position_embeddings)?;

        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
            dtype,
            partial_rotary_factor,
            rope_theta,
            rope_scaling,
            form,
            raw,
        })
    }

    /// The number of channels of each head that RoPE rotates.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// RoPE attributes for a tensor of `num_heads` heads.
    pub fn rope_attrs(&self, num_heads: usize) -> RopeAttrs {
        RopeAttrs {
            num_heads,
            head_dim: self.head_dim,
            rotary_dim: self.rotary_dim(),
            theta: self.rope_theta,
            scaling: self.rope_scaling.clone(),
        }
    }

    /// The storage dtype the config declares (f32 when absent or unknown).
    pub fn weight_dtype(&self) -> DType {
        match self.dtype.as_deref() {
            Some("bfloat16") => DType::BF16,
            Some("float16") | Some("half") => DType::F16,
            _ => DType::F32,
        }
    }

    /// Adopts a graph's RoPE (after a rewrite such as position
    /// interpolation): theta, scaling, and the rotary fraction.
    pub fn set_rope(&mut self, attrs: &RopeAttrs) {
        self.rope_theta = attrs.theta;
        self.rope_scaling = attrs.scaling.clone();
        if attrs.rotary_dim != self.rotary_dim() && self.head_dim > 0 {
            let mut p = attrs.rotary_dim as f64 / self.head_dim as f64;
            // transformers truncates `head_dim * factor`; nudge the factor up
            // until it gives back exactly this rotary dim.
            for _ in 0..4 {
                if (self.head_dim as f64 * p) as usize >= attrs.rotary_dim {
                    break;
                }
                p = f64::from_bits(p.to_bits() + 1);
            }
            self.partial_rotary_factor = p;
        }
    }

    /// The raw JSON with every changed field written back, in the form it
    /// was read in. An unchanged config gives back its raw JSON exactly.
    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        if !out.is_object() {
            out = Value::Object(Map::new());
        }
        let orig = LlamaConfig::from_value(self.raw.clone(), Path::new("config.json")).ok();
        let obj = out.as_object_mut().expect("made an object above");
        macro_rules! put {
            ($field:ident, $key:expr) => {
                if orig.as_ref().is_none_or(|o| o.$field != self.$field) {
                    obj.insert($key.to_string(), serde_json::json!(self.$field));
                }
            };
        }
        put!(vocab_size, "vocab_size");
        put!(hidden_size, "hidden_size");
        put!(intermediate_size, "intermediate_size");
        put!(num_hidden_layers, "num_hidden_layers");
        put!(num_attention_heads, "num_attention_heads");
        put!(num_key_value_heads, "num_key_value_heads");
        put!(head_dim, "head_dim");
        put!(max_position_embeddings, "max_position_embeddings");
        put!(rms_norm_eps, "rms_norm_eps");
        put!(tie_word_embeddings, "tie_word_embeddings");
        put!(attention_bias, "attention_bias");
        put!(mlp_bias, "mlp_bias");
        if orig.as_ref().is_none_or(|o| o.dtype != self.dtype) {
            let key = if obj.contains_key("dtype") {
                "dtype"
            } else if obj.contains_key("torch_dtype") || self.form == ConfigForm::V4 {
                "torch_dtype"
            } else {
                "dtype"
            };
            match &self.dtype {
                Some(d) => obj.insert(key.into(), Value::String(d.clone())),
                None => obj.remove(key),
            };
        }
        if obj.get("model_type").is_none() && orig.is_none() {
            obj.insert("model_type".into(), Value::String("llama".into()));
        }
        let rope_changed = orig.as_ref().is_none_or(|o| {
            o.rope_theta != self.rope_theta
                || o.rope_scaling != self.rope_scaling
                || o.partial_rotary_factor != self.partial_rotary_factor
                || o.form != self.form
        });
        if rope_changed {
            self.write_rope(obj);
        }
        out
    }

    fn write_rope(&self, obj: &mut Map<String, Value>) {
        let dict_key = match self.form {
            ConfigForm::V4 => "rope_scaling",
            ConfigForm::V5 => "rope_parameters",
        };
        // Keep keys lcc does not interpret (e.g. `truncate`).
        let mut dict: Map<String, Value> = obj
            .get(dict_key)
            .and_then(Value::as_object)
            .map(|d| {
                d.iter()
                    .filter(|(k, _)| !ROPE_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let had_type_key = obj
            .get(dict_key)
            .and_then(Value::as_object)
            .is_some_and(|d| d.contains_key("type"));
        let num = |x: f64| serde_json::json!(x);
        let rope_type = match &self.rope_scaling {
            RopeScaling::None => "default",
            RopeScaling::Linear { factor } => {
                dict.insert("factor".into(), num(*factor));
                "linear"
            }
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => {
                dict.insert("factor".into(), num(*factor));
                // transformers' dynamic scaling grows past
                // `max_position_embeddings`; that is where the original
                // length is recorded.
                obj.insert(
                    "max_position_embeddings".into(),
                    serde_json::json!(original_max_position_embeddings),
                );
                "dynamic"
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                dict.insert("factor".into(), num(*factor));
                dict.insert(
                    "original_max_position_embeddings".into(),
                    serde_json::json!(original_max_position_embeddings),
                );
                dict.insert("beta_fast".into(), num(*beta_fast));
                dict.insert("beta_slow".into(), num(*beta_slow));
                if let Some(af) = attention_factor {
                    dict.insert("attention_factor".into(), num(*af));
                }
                "yarn"
            }
            RopeScaling::Llama3 {
                factor,
                original_max_position_embeddings,
                low_freq_factor,
                high_freq_factor,
            } => {
                dict.insert("factor".into(), num(*factor));
                dict.insert(
                    "original_max_position_embeddings".into(),
                    serde_json::json!(original_max_position_embeddings),
                );
                dict.insert("low_freq_factor".into(), num(*low_freq_factor));
                dict.insert("high_freq_factor".into(), num(*high_freq_factor));
                "llama3"
            }
        };
        let prf_needed = self.partial_rotary_factor != 1.0;
        match self.form {
            ConfigForm::V5 => {
                dict.insert("rope_type".into(), rope_type.into());
                dict.insert("rope_theta".into(), num(self.rope_theta));
                if prf_needed {
                    dict.insert(
                        "partial_rotary_factor".into(),
                        num(self.partial_rotary_factor),
                    );
                }
                if obj.contains_key("rope_theta") {
                    obj.insert("rope_theta".into(), num(self.rope_theta));
                }
                if obj.contains_key("partial_rotary_factor") {
                    obj.insert(
                        "partial_rotary_factor".into(),
                        num(self.partial_rotary_factor),
                    );
                }
                obj.insert(dict_key.into(), Value::Object(dict));
            }
            ConfigForm::V4 => {
                obj.insert("rope_theta".into(), num(self.rope_theta));
                if prf_needed || obj.contains_key("partial_rotary_factor") {
                    obj.insert(
                        "partial_rotary_factor".into(),
                        num(self.partial_rotary_factor),
                    );
                }
                if matches!(self.rope_scaling, RopeScaling::None) && dict.is_empty() {
                    obj.insert(dict_key.into(), Value::Null);
                } else {
                    dict.insert("rope_type".into(), rope_type.into());
                    // transformers before 4.45 read only `type`; LongLoRA's
                    // own scripts write it too.
                    if had_type_key || rope_type != "default" {
                        dict.insert("type".into(), rope_type.into());
                    }
                    obj.insert(dict_key.into(), Value::Object(dict));
                }
            }
        }
    }
}

/// Maps a rope dict onto `RopeScaling` with transformers' defaults and
/// formulas (`modeling_rope_utils`).
fn parse_scaling(r: &Fields, max_position_embeddings: u64) -> Result<RopeScaling> {
    let rope_type = match r.str_opt("rope_type")? {
        Some(t) => t,
        None => r.str_opt("type")?.unwrap_or("default"),
    };
    let factor_req = || -> Result<f64> {
        let f = r.f64_req("factor")?;
        if f <= 0.0 {
            return Err(r.err(format!(
                "field '{}factor' must be positive, got {f}",
                r.prefix
            )));
        }
        Ok(f)
    };
    let original = || -> Result<u64> {
        Ok(r.usize_opt("original_max_position_embeddings")?
            .map_or(max_position_embeddings, |v| v as u64))
    };
    Ok(match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: factor_req()?,
        },
        // transformers' dynamic NTK scaling grows the base once the length
        // passes `config.max_position_embeddings`, whatever the dict says.
        "dynamic" => RopeScaling::Dynamic {
            factor: factor_req()?,
            original_max_position_embeddings: max_position_embeddings,
        },
        "yarn" => {
            let orig = original()?;
            if orig == 0 {
                return Err(r.err(format!(
                    "field '{}original_max_position_embeddings' must be at least 1",
                    r.prefix
                )));
            }
            let factor = match r.f64_opt("factor")? {
                Some(f) if f > 0.0 => f,
                Some(f) => {
                    return Err(r.err(format!(
                        "field '{}factor' must be positive, got {f}",
                        r.prefix
                    )))
                }
                None => max_position_embeddings as f64 / orig as f64,
            };
            // `get("beta_fast") or 32`: a 0 means the default too.
            let beta_fast = r.f64_opt("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0);
            let beta_slow = r.f64_opt("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0);
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match r.f64_opt("attention_factor")? {
                Some(a) => Some(a),
                None => match (r.f64_opt("mscale")?, r.f64_opt("mscale_all_dim")?) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        Some(mscale(factor, m) / mscale(factor, ma))
                    }
                    _ => None,
                },
            };
            if r.bool_opt("truncate")? == Some(false) {
                return Err(r.err(format!(
                    "'{}truncate': false is not supported by lcc's YaRN (transformers' default, true, is)",
                    r.prefix
                )));
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast,
                beta_slow,
                attention_factor,
            }
        }
        "llama3" => {
            let low = r.f64_req("low_freq_factor")?;
            let high = r.f64_req("high_freq_factor")?;
            if !(low > 0.0 && high > low) {
                return Err(r.err(format!(
                    "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got {low} and {high}"
                )));
            }
            RopeScaling::Llama3 {
                factor: factor_req()?,
                original_max_position_embeddings: original()?,
                low_freq_factor: low,
                high_freq_factor: high,
            }
        }
        other => {
            return Err(r.err(format!(
                "rope type '{other}' is not supported by lcc (supported: default, linear, dynamic, yarn, llama3)"
            )))
        }
    })
}

/// The sizes and RoPE of a LLaMA as its structure shows them (what the
/// `raise` pass reads off a primitive graph, which records no config).
#[derive(Clone, Debug, PartialEq)]
pub struct StructuralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The factor of a linear RoPE scaling, if the model has one.
    pub linear_rope_factor: Option<f64>,
    pub tie_word_embeddings: bool,
}

/// What [`StructuralConfig::record_in`] took from the config the graph
/// already recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    /// Keys kept from the earlier config, in its order.
    pub kept: Vec<String>,
    /// `max_position_embeddings` as written, when the config states it.
    pub max_position_embeddings: Option<String>,
}

impl StructuralConfig {
    fn to_json(&self) -> Value {
        let mut cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "float32",
        });
        if let Some(factor) = self.linear_rope_factor {
            cfg["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
        }
        cfg
    }

    /// Records this config as the graph's [`CONFIG_PROP`] (replacing any
    /// earlier one, placed last). An earlier config (ONNX that lcc wrote
    /// carries the model's config.json in its metadata) gives what the
    /// structure cannot show (the trained context, token ids); its RoPE
    /// dict does not, the structure states the RoPE.
    pub fn record_in(&self, graph: &mut Graph) -> Recorded {
        let mut cfg = self.to_json();
        let recorded = graph
            .meta
            .prop(CONFIG_PROP)
            .and_then(|t| serde_json::from_str::<Value>(t).ok());
        let mut kept = Vec::new();
        if let (Some(Value::Object(old)), Some(new)) = (recorded, cfg.as_object_mut()) {
            for (k, v) in old {
                if !new.contains_key(&k) && k != "rope_scaling" && k != "rope_parameters" {
                    kept.push(k.clone());
                    new.insert(k, v);
                }
            }
        }
        let text = serde_json::to_string_pretty(&cfg).expect("JSON serializes");
        graph.meta.props.retain(|(k, _)| k != CONFIG_PROP);
        graph.meta.props.push((CONFIG_PROP.into(), text));
        Recorded {
            kept,
            max_position_embeddings: cfg.get("max_position_embeddings").map(Value::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "rope_theta": 10000.0,
            "rope_scaling": null,
            "bos_token_id": 1
        })
    }

    fn parse(v: Value) -> Result<LlamaConfig> {
        LlamaConfig::from_value(v, Path::new("/models/x/config.json"))
    }

    fn with(mut v: Value, key: &str, val: Value) -> Value {
        v.as_object_mut().unwrap().insert(key.into(), val);
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        v.as_object_mut().unwrap().remove(key);
        v
    }

    #[test]
    fn reads_v4_form_with_defaults() {
        let c = parse(without(base(), "num_key_value_heads")).unwrap();
        assert_eq!(c.form, ConfigForm::V4);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
        assert_eq!(c.rotary_dim(), 16);
        assert!(!c.attention_bias && !c.mlp_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn reads_v5_form() {
        let v = without(without(base(), "rope_theta"), "rope_scaling");
        let v = with(
            v,
            "rope_parameters",
            json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}),
        );
        let v = with(without(v, "torch_dtype"), "dtype", json!("bfloat16"));
        let c = parse(v).unwrap();
        assert_eq!(c.form, ConfigForm::V5);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        assert_eq!(c.weight_dtype(), DType::BF16);
    }

    #[test]
    fn every_rope_scaling_parses_with_transformers_defaults() {
        let cases = [
            (
                json!({"type": "linear", "factor": 2.0}),
                RopeScaling::Linear { factor: 2.0 },
            ),
            (
                json!({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 99}),
                RopeScaling::Dynamic {
                    factor: 2.0,
                    original_max_position_embeddings: 256,
                },
            ),
            (
                json!({"rope_type": "yarn", "factor": 4.0}),
                RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 256,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: None,
                },
            ),
            (
                json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                       "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.5}),
                RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 64,
                    beta_fast: 16.0,
                    beta_slow: 2.0,
                    attention_factor: Some(1.5),
                },
            ),
            (
                // factor absent: max_position_embeddings / original.
                json!({"rope_type": "yarn", "original_max_position_embeddings": 64}),
                RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 64,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: None,
                },
            ),
            (
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                RopeScaling::Llama3 {
                    factor: 8.0,
                    original_max_position_embeddings: 8192,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                },
            ),
            (
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
                RopeScaling::Llama3 {
                    factor: 8.0,
                    original_max_position_embeddings: 256,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                },
            ),
            (json!({"rope_type": "default"}), RopeScaling::None),
        ];
        for (dict, want) in cases {
            let c = parse(with(base(), "rope_scaling", dict.clone())).unwrap();
            assert_eq!(c.rope_scaling, want, "v4 {dict}");
            // The same dict in the 5.x form.
            let v5 = with(
                without(without(base(), "rope_scaling"), "rope_theta"),
                "rope_parameters",
                {
                    let mut d = dict.clone();
                    d.as_object_mut()
                        .unwrap()
                        .insert("rope_theta".into(), json!(1e4));
                    d
                },
            );
            let c5 = parse(v5).unwrap();
            assert_eq!(c5.rope_scaling, want, "v5 {dict}");
            assert_eq!(c5.form, ConfigForm::V5);
        }
        // mscale / mscale_all_dim give the attention factor (DeepSeek style).
        let c = parse(with(
            base(),
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}),
        ))
        .unwrap();
        let RopeScaling::Yarn {
            attention_factor: Some(af),
            ..
        } = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        let m = |s: f64, m: f64| 0.1 * m * s.ln() + 1.0;
        assert!((af - m(4.0, 1.0) / m(4.0, 0.5)).abs() < 1e-12);
    }

    #[test]
    fn unsupported_and_incomplete_rope_is_an_error() {
        let e = parse(with(
            base(),
            "rope_scaling",
            json!({"rope_type": "longrope"}),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("longrope") && e.contains("/models/x/config.json"),
            "{e}"
        );
        let e = parse(with(base(), "rope_scaling", json!({"type": "linear"})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'rope_scaling.factor'"), "{e}");
        let e = parse(with(
            base(),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("high_freq_factor"), "{e}");
    }

    #[test]
    fn missing_field_names_file_and_field() {
        let e = parse(without(base(), "hidden_size"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/models/x/config.json: missing required field 'hidden_size' (a LLaMA config.json declares it)"
        );
    }

    #[test]
    fn wrong_types_say_what_was_expected() {
        let e = parse(with(base(), "vocab_size", json!("256")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'vocab_size' must be a non-negative integer, got \"256\""),
            "{e}"
        );
        let e = parse(with(base(), "tie_word_embeddings", json!(1)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'tie_word_embeddings' must be true or false"),
            "{e}"
        );
        let e = parse(with(base(), "rms_norm_eps", json!([1])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a finite number"), "{e}");
        let e = parse(json!([1, 2])).unwrap_err().to_string();
        assert!(e.contains("must be a JSON object"), "{e}");
        let e = LlamaConfig::from_json_str("{", Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.json: not valid JSON"), "{e}");
    }

    #[test]
    fn inconsistent_values_are_errors() {
        let e = parse(with(base(), "num_attention_heads", json!(5)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_key_value_heads (2) must divide num_attention_heads (5)"),
            "{e}"
        );
        let v = with(
            with(base(), "num_attention_heads", json!(6)),
            "num_key_value_heads",
            json!(3),
        );
        let e = parse(v.clone()).unwrap_err().to_string();
        assert!(e.contains("not divisible"), "{e}");
        // With head_dim given, hidden need not divide.
        let c = parse(with(v, "head_dim", json!(16))).unwrap();
        assert_eq!(c.head_dim, 16);
        let e = parse(with(base(), "model_type", json!("mistral")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type 'mistral'"), "{e}");
    }

    #[test]
    fn absurd_layer_counts_are_refused() {
        let e = parse(with(base(), "num_hidden_layers", json!(1u64 << 40)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a real model"), "{e}");
    }

    #[test]
    fn set_rope_keeps_the_rotary_dim() {
        let mut c = parse(base()).unwrap();
        for rd in (2..=16).step_by(2) {
            let mut r = c.rope_attrs(4);
            r.rotary_dim = rd;
            r.theta = 5e5;
            c.set_rope(&r);
            assert_eq!(c.rotary_dim(), rd);
            let back = parse(c.to_json()).unwrap();
            assert_eq!(back.rotary_dim(), rd);
            assert_eq!(back.rope_theta, 5e5);
        }
    }

    #[test]
    fn unchanged_config_round_trips_exactly() {
        for v in [
            base(),
            with(
                base(),
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0, "zzz": 1}),
            ),
        ] {
            let c = parse(v.clone()).unwrap();
            assert_eq!(c.to_json(), v);
        }
    }

    #[test]
    fn changed_rope_is_written_in_the_form_it_was_read() {
        // 4.x: rope_scaling with both keys; unknown keys in the dict kept.
        let mut c = parse(with(
            base(),
            "rope_scaling",
            json!({"type": "dynamic", "factor": 2.0, "zzz": 1}),
        ))
        .unwrap();
        c.rope_scaling = RopeScaling::Linear { factor: 8.0 };
        c.vocab_size = 300;
        let j = c.to_json();
        assert_eq!(
            j["rope_scaling"],
            json!({"type": "linear", "rope_type": "linear", "factor": 8.0, "zzz": 1})
        );
        assert_eq!(j["vocab_size"], json!(300));
        assert_eq!(j["bos_token_id"], json!(1));
        let back = parse(j).unwrap();
        assert_eq!(back.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(back.vocab_size, 300);

        // Back to no scaling: null in 4.x.
        let mut c = back;
        c.rope_scaling = RopeScaling::None;
        let j = c.to_json();
        assert_eq!(
            j["rope_scaling"],
            json!({"zzz": 1, "rope_type": "default", "type": "default"})
        );

        // 5.x: rope_parameters.
        let v5 = with(
            without(without(base(), "rope_scaling"), "rope_theta"),
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 10000.0}),
        );
        let mut c = parse(v5).unwrap();
        c.rope_scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 256,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        };
        let j = c.to_json();
        assert!(j.get("rope_scaling").is_none() && j.get("rope_theta").is_none());
        assert_eq!(
            j["rope_parameters"],
            json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                   "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0})
        );
        assert_eq!(parse(j).unwrap(), {
            let mut d = c.clone();
            d.raw = d.to_json();
            d
        });
    }
}
