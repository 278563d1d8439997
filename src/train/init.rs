//! `lcc init`: a randomly initialised LLaMA (a Hugging Face dir) from a
//! config.json, for pretraining and benchmarks. Initialisation follows
//! transformers' `LlamaPreTrainedModel._init_weights`: every projection and
//! the embedding ~ N(0, initializer_range²) (default 0.02), norms = 1.

use crate::hf::{build_llama, read_config, shape_only_weights};
use crate::ir::{DType, Graph, Tensor, Weight};
use crate::util::SplitMix64;
use crate::{Error, Result};
use std::path::Path;

/// Builds the model of `config` (a config.json file) with random weights
/// from `seed`; `dtype` overrides the config's `torch_dtype`/`dtype`.
pub fn init_model(config: &Path, seed: u64, dtype: Option<DType>) -> Result<Graph> {
    let cfg = read_config(config)?;
    let std = cfg
        .raw
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02);
    if !(std.is_finite() && std >= 0.0) {
        return Err(Error::invalid(format!(
            "{}: initializer_range must be a non-negative number",
            config.display()
        )));
    }
    let shapes = shape_only_weights(&cfg);
    // The weights are built as f32 and encoded once more: 4 + size bytes
    // per parameter at the peak.
    let need: u128 = shapes
        .iter()
        .map(|w| {
            let n = w
                .shape
                .iter()
                .fold(1u128, |a, &d| a.saturating_mul(d as u128));
            n.saturating_mul(4 + dtype.unwrap_or(w.dtype).size() as u128)
        })
        .fold(0u128, u128::saturating_add);
    crate::memory::check(
        need,
        &format!("initialising the model of {}", config.display()),
    )?;
    let mut store = crate::ir::WeightStore::new();
    for w in shapes.iter() {
        let dt = dtype.unwrap_or(w.dtype);
        let n: usize = w.shape.iter().product();
        let values: Vec<f32> = if w.name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if w.name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            normal(n, std, seed, &w.name)
        };
        let mut t = Tensor::f32(w.shape.clone(), values);
        t.dtype = dt;
        store.insert(Weight::from_tensor(w.name.clone(), &t, false));
    }
    let mut graph = build_llama(&cfg, store)?;
    if let Some(dt) = dtype {
        set_config_dtype(&mut graph, dt)?;
    }
    Ok(graph)
}

/// N(0, std²) values by Box–Muller; the stream depends on the seed and the
/// weight's name only.
fn normal(n: usize, std: f64, seed: u64, name: &str) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ crate::ir::tensor::fnv1a(name.as_bytes()));
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1 = 1.0 - rng.next_f64(); // (0, 1]
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos() * std) as f32);
        if out.len() < n {
            out.push((r * t.sin() * std) as f32);
        }
    }
    out
}

/// Records the weights' dtype in the graph's config (`torch_dtype`).
pub fn set_config_dtype(graph: &mut Graph, dt: DType) -> Result<()> {
    let key = crate::ir::CONFIG_PROP;
    let Some(text) = graph.meta.prop(key).map(str::to_string) else {
        return Ok(());
    };
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("the graph's config is not JSON: {e}")))?;
    let name = match dt {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => {
            return Err(Error::invalid(format!(
                "--dtype {other}: weights must be f32, bf16 or f16"
            )))
        }
    };
    if let Some(obj) = v.as_object_mut() {
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), name.into());
        } else {
            obj.insert("torch_dtype".into(), name.into());
        }
    }
    for (k, val) in graph.meta.props.iter_mut() {
        if k == key {
            *val = v.to_string();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_values_have_the_requested_spread() {
        let v = normal(100_000, 0.02, 7, "w");
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 5e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
        assert_eq!(v, normal(100_000, 0.02, 7, "w"));
        assert_ne!(v[..10], normal(10, 0.02, 7, "w2")[..]);
    }

    #[test]
    fn init_builds_the_fixture_shapes_with_unit_norms() {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf/config.json");
        let g = init_model(&cfg, 1, Some(DType::BF16)).unwrap();
        let norm = g.weights.get("model.norm.weight").unwrap();
        assert_eq!(norm.dtype, DType::BF16);
        assert!(norm
            .to_tensor()
            .unwrap()
            .to_f64_vec()
            .iter()
            .all(|&x| x == 1.0));
        let q = g
            .weights
            .get("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(q.shape, vec![64, 64]);
        let vals = q.to_tensor().unwrap().to_f64_vec();
        assert!(vals.iter().any(|&x| x != 0.0));
        assert!(g
            .meta
            .prop(crate::ir::CONFIG_PROP)
            .unwrap()
            .contains("bfloat16"));
    }
}
