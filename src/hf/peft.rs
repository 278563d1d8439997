//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`,
//! as `PeftModel.save_pretrained` writes them (tensor names
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, without
//! the adapter name), and LongLoRA's `trainable_params` file (the embedding
//! and norm weights it trains besides LoRA).
//!
//! - [`load_adapter`] reads a dir; [`Adapter::lora`] describes it for
//!   `passes::lora::apply_adapter`, which adds the LoRA branches to a graph
//!   and puts the adapter's values in them.
//! - [`save_adapter`] writes a graph's LoRA weights as a PEFT-loadable dir.
//! - [`load_trainable`] / [`save_trainable`] read and write the trainable
//!   non-LoRA weights.
//! - [`merge`] is `lcc merge MODEL --adapter DIR [--trainable FILE]`.

use crate::ir::lora::{
    is_lora_weight, lora_a_name, lora_b_name, projection_of, resolve_target, strip_peft_prefix,
    LoraAdapter,
};
use crate::ir::{Graph, Op, Tensor, TensorData, Weight};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The parts of `adapter_config.json` lcc uses.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// As written (`q_proj`, …).
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub lora_dropout: f32,
    pub base_model_name_or_path: Option<String>,
}

/// A loaded adapter: its config and its tensors (f32) under PEFT names.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub tensors: Vec<(String, Tensor)>,
}

impl Adapter {
    /// The adapter as the `lora` pass applies it.
    pub fn lora(&self) -> LoraAdapter<'_> {
        let c = &self.config;
        LoraAdapter {
            source: &self.dir,
            tensor_file: ADAPTER_WEIGHTS,
            rank: c.r,
            alpha: c.lora_alpha,
            dropout: c.lora_dropout,
            rslora: c.use_rslora,
            targets: &c.target_modules,
            tensors: &self.tensors,
        }
    }
}

fn field<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

fn parse_config(path: &Path, text: &str) -> Result<AdapterConfig> {
    let cfg: Value = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let bad = |msg: String| Error::format(path, msg);
    if let Some(t) = field(&cfg, "peft_type") {
        if t != "LORA" {
            return Err(bad(format!(
                "peft_type is {t}; lcc reads LoRA adapters only (peft_type \"LORA\")"
            )));
        }
    }
    let r = field(&cfg, "r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| {
            bad("field 'r' (the LoRA rank) is missing or not a positive integer".into())
        })? as usize;
    let lora_alpha = match field(&cfg, "lora_alpha") {
        None => 8.0, // PEFT's default
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad(format!("field 'lora_alpha' is not a number: {v}")))?,
    };
    let target_modules = match field(&cfg, "target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("target_modules holds a non-string: {v}")))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "target_modules is the regular expression '{s}'; lcc needs a list of module names (q_proj, k_proj, …)"
            )))
        }
        _ => return Err(bad("field 'target_modules' is missing".into())),
    };
    for t in &target_modules {
        if resolve_target(t).is_none() {
            return Err(bad(format!(
                "target module '{t}' is not a LLaMA projection lcc knows (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"
            )));
        }
    }
    let flag = |key: &str| field(&cfg, key).and_then(Value::as_bool).unwrap_or(false);
    for (key, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if flag(key) {
            return Err(bad(format!(
                "{key} is true; lcc does not support {what} adapters"
            )));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(&cfg, key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!(
                "{key} is set; lcc supports one rank and alpha for every module"
            )));
        }
    }
    if field(&cfg, "layers_to_transform").is_some() {
        return Err(bad(
            "layers_to_transform is set; lcc applies an adapter to every layer".into(),
        ));
    }
    if let Some(b) = field(&cfg, "bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(format!(
                "bias is \"{b}\"; lcc supports bias \"none\" only"
            )));
        }
    }
    Ok(AdapterConfig {
        r,
        lora_alpha,
        target_modules,
        use_rslora: flag("use_rslora"),
        lora_dropout: field(&cfg, "lora_dropout")
            .and_then(Value::as_f64)
            .unwrap_or(0.0) as f32,
        base_model_name_or_path: field(&cfg, "base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Reads a PEFT adapter dir.
pub fn load_adapter(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        return Err(Error::invalid(format!(
            "{} has no {ADAPTER_CONFIG}; a PEFT adapter dir holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (as PeftModel.save_pretrained writes them)",
            dir.display()
        )));
    }
    let text = crate::util::read_text_capped(&cfg_path, crate::util::MAX_TEXT_BYTES)?;
    let config = parse_config(&cfg_path, &text)?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    if !weights.is_file() {
        let bin = dir.join("adapter_model.bin");
        let hint = if bin.is_file() {
            "; it has adapter_model.bin (a torch pickle), which lcc does not read: re-save it with PeftModel.save_pretrained(dir, safe_serialization=True)"
        } else {
            ""
        };
        return Err(Error::invalid(format!(
            "{} has no {ADAPTER_WEIGHTS}{hint}",
            dir.display()
        )));
    }
    let tensors: Vec<(String, Tensor)> = super::read_tensors(&weights)?
        .into_iter()
        .map(|(name, t)| (name.replace(".default.weight", ".weight"), t))
        .collect();
    for (name, t) in &tensors {
        check_finite(t, name, &weights)?;
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        config,
        tensors,
    })
}

/// A NaN or infinite value in a trained tensor would spread through every
/// weight it merges into: refuse it, naming the tensor and the file.
fn check_finite(t: &Tensor, name: &str, file: &Path) -> Result<()> {
    let bad = match &t.data {
        TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
        TensorData::F64(v) => v.iter().position(|x| !x.is_finite()),
        _ => None,
    };
    match bad {
        Some(i) => Err(Error::format(
            file,
            format!(
                "tensor '{name}' holds a non-finite value (element {i}); the run that wrote it diverged — use an earlier checkpoint"
            ),
        )),
        None => Ok(()),
    }
}

/// Writes the graph's LoRA branches as a PEFT adapter dir that
/// `PeftModel.from_pretrained` loads.
pub fn save_adapter(graph: &Graph, dir: &Path) -> Result<()> {
    let mut attrs: Option<crate::ir::LoraAttrs> = None;
    let mut modules: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for n in graph.topo_order()? {
        let Op::LoraLinear(a) = &graph.node(n).op else {
            continue;
        };
        let Some((module, short)) = projection_of(graph, n) else {
            return Err(Error::invalid(format!(
                "node '{}': a LoraLinear whose weight is not named model.layers.N.<projection>.weight cannot be saved as a PEFT adapter",
                graph.display_name(n)
            )));
        };
        match &attrs {
            None => attrs = Some(a.clone()),
            Some(f) if f != a => {
                return Err(Error::invalid(format!(
                    "node '{}': its LoRA (rank {}, alpha {}) differs from the others' (rank {}, alpha {}); lcc writes one rank and alpha per adapter",
                    graph.display_name(n),
                    a.rank,
                    a.alpha,
                    f.rank,
                    f.alpha
                )))
            }
            _ => {}
        }
        let (_, path) = resolve_target(short).expect("projection_of returns known targets");
        let m = path.rsplit('.').next().unwrap_or(path).to_string();
        if !modules.contains(&m) {
            modules.push(m);
        }
        names.push(lora_a_name(&module));
        names.push(lora_b_name(&module));
    }
    let Some(attrs) = attrs else {
        return Err(Error::invalid(format!(
            "the model has no LoRA branches (run the lora pass first); nothing to save to {}",
            dir.display()
        )));
    };
    modules.sort();
    names.sort();
    // As PEFT writes them: an integral alpha as an integer, the dropout's
    // shortest decimal (0.05, not 0.0500000007).
    let alpha = if attrs.alpha.fract() == 0.0 && attrs.alpha.abs() < 1e15 {
        json!(attrs.alpha as i64)
    } else {
        json!(attrs.alpha)
    };
    let dropout: f64 = attrs.dropout.to_string().parse().unwrap_or(0.0);
    let mut weights: Vec<&Weight> = Vec::with_capacity(names.len());
    for name in &names {
        let w = graph.weights.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "LoRA weight '{name}' is not in the model's weights"
            ))
        })?;
        if w.bytes().is_none() {
            return Err(Error::invalid(format!(
                "LoRA weight '{name}' has no data; cannot save {}",
                dir.display()
            )));
        }
        weights.push(w);
    }
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": null,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": attrs.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": attrs.rslora,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    super::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &weights, &[("format", "pt")])?;
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("JSON serializes") + "\n";
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// Loads LongLoRA's trainable_params (a safetensors file of embedding and
/// norm weights, named with or without `base_model.model.`) into the graph,
/// replacing the weights of the same HF name. Returns how many.
pub fn load_trainable(graph: &mut Graph, file: &Path) -> Result<usize> {
    if file.extension().is_some_and(|e| e == "bin") {
        return Err(Error::invalid(format!(
            "{} is a torch pickle; lcc reads safetensors: convert it with python -c \"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in torch.load('{0}').items()}}, 'trainable_params.safetensors')\"",
            file.display()
        )));
    }
    let tensors = super::read_tensors(file)?;
    for (name, t) in &tensors {
        check_finite(t, name, file)?;
    }
    let what = format!("trainable params {}", file.display());
    for (name, t) in &tensors {
        graph
            .weights
            .replace_values(strip_peft_prefix(name), t, true, &what)?;
    }
    Ok(tensors.len())
}

/// Writes the graph's trainable non-LoRA weights (LongLoRA's
/// trainable_params) to one safetensors file under HF names.
pub fn save_trainable(graph: &Graph, file: &Path) -> Result<usize> {
    let weights: Vec<&Weight> = graph
        .weights
        .iter()
        .filter(|w| w.trainable && !is_lora_weight(&w.name))
        .collect();
    super::write_safetensors(file, &weights, &[("format", "pt")])?;
    Ok(weights.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_say_what_is_unsupported() {
        let p = Path::new("adapter_config.json");
        let e = parse_config(p, r#"{"r": 8, "target_modules": "q_proj|v_proj"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("regular expression"), "{e}");
        let e = parse_config(
            p,
            r#"{"r": 8, "target_modules": ["q_proj"], "use_dora": true}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("DoRA"), "{e}");
        let e = parse_config(p, r#"{"target_modules": ["q_proj"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'r'"), "{e}");
        let c = parse_config(
            p,
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_rslora": true}"#,
        )
        .unwrap();
        assert_eq!((c.r, c.lora_alpha, c.use_rslora), (4, 8.0, true));
    }
}
