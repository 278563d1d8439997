//! `lora`: adds a LoRA branch to the chosen projections. Each target
//! `Linear` becomes a `LoraLinear` reading two new trainable f32 weights,
//! named as PEFT names them: A `[rank, in]` (Kaiming-uniform, as PEFT's
//! default init) and B `[out, rank]` (zeros, so the model is unchanged
//! until trained). The base weight is frozen.
//!
//! ```text
//! before:  %5 = Linear(%4, @model.layers.0.self_attn.q_proj.weight) : f32[batch,seq,64]
//! after:   %5 = LoraLinear{rank=8, alpha=16.0}(%4, @model.layers.0.self_attn.q_proj.weight,
//!                 @base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight,
//!                 @base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight) : f32[batch,seq,64]
//! ```
//!
//! Targets are short names (`q k v o gate up down`, or PEFT's `q_proj`, …)
//! mapped to `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`; a
//! projection is found by the weight it reads, `model.layers.N.<module>.weight`.
//! A projection that already is a `LoraLinear` is left alone, so a second
//! run is a no-op and a run with more targets adds only the new ones.
//!
//! [`apply_adapter`] runs the pass with a trained adapter's rank, alpha and
//! targets (an [`LoraAdapter`], as `hf::peft` reads one) and puts its values
//! in the new branches. The names are PEFT's ([`crate::ir::lora`]).

use super::{Pass, Report};
use crate::ir::lora::{
    is_lora_weight, lora_a_name, lora_b_name, projection_of, resolve_target, strip_peft_prefix,
    LoraAdapter,
};
use crate::ir::{
    DType, Graph, LoraAttrs, Op, Output, Patch, PatchValue, Tensor, TensorType, Value, Weight,
};
use crate::{Error, Result};
use petgraph::stable_graph::NodeIndex;
use serde::Deserialize;

fn default_targets() -> Vec<String> {
    ["q", "k", "v", "o"].iter().map(|s| s.to_string()).collect()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    pub targets: Vec<String>,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            targets: default_targets(),
            seed: 0,
        }
    }
}

pub struct Lora {
    options: Options,
}

impl Lora {
    pub fn new(options: Options) -> Self {
        Lora { options }
    }

    fn attrs(&self) -> LoraAttrs {
        LoraAttrs {
            rank: self.options.rank,
            alpha: self.options.alpha,
            rslora: self.options.rslora,
            dropout: self.options.dropout,
        }
    }

    /// The requested targets as (short name, module path), checked.
    fn targets(&self) -> Result<Vec<(&'static str, &'static str)>> {
        let o = &self.options;
        if o.rank == 0 {
            return Err(Error::invalid(
                "pass 'lora': option rank must be at least 1",
            ));
        }
        if !o.alpha.is_finite() {
            return Err(Error::invalid(format!(
                "pass 'lora': option alpha must be a finite number, got {}",
                o.alpha
            )));
        }
        if !(0.0..1.0).contains(&o.dropout) {
            return Err(Error::invalid(format!(
                "pass 'lora': option dropout must be in [0, 1), got {}",
                o.dropout
            )));
        }
        if o.targets.is_empty() {
            return Err(Error::invalid(
                "pass 'lora': option targets is empty; name some of q, k, v, o, gate, up, down",
            ));
        }
        let mut out: Vec<(&'static str, &'static str)> = Vec::new();
        for t in &o.targets {
            let r = resolve_target(t).ok_or_else(|| {
                Error::invalid(format!(
                    "pass 'lora': unknown target '{t}'; allowed: q, k, v, o, gate, up, down (or q_proj, …)"
                ))
            })?;
            if !out.contains(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// torch's `kaiming_uniform_(w, a=√5)` on a `[rows, fan_in]` tensor (PEFT's
/// and nn.Linear's init): gain = √(2/(1+a²)), bound = √3·gain/√fan_in, which
/// is 1/√fan_in. The stream depends on `seed` and the weight's name only, so
/// a weight's values do not depend on which other targets were chosen.
pub fn kaiming_uniform(rows: usize, fan_in: usize, seed: u64, name: &str) -> Tensor {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in.max(1) as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    let mut rng = crate::util::SplitMix64::new(seed ^ crate::ir::tensor::fnv1a(name.as_bytes()));
    let data = (0..rows * fan_in)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Tensor::f32(vec![rows, fan_in], data)
}

impl Pass for Lora {
    fn needs_llama_level(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "lora"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let targets = self.targets()?;
        let rank = self.options.rank;
        let mut found = vec![false; targets.len()];
        let mut already = 0usize;
        let mut matches: Vec<(NodeIndex, String)> = Vec::new();
        for n in graph.topo_order()? {
            let Some((module, short)) = projection_of(graph, n) else {
                continue;
            };
            let Some(i) = targets.iter().position(|(s, _)| *s == short) else {
                continue;
            };
            found[i] = true;
            if matches!(graph.node(n).op, Op::LoraLinear(_)) {
                already += 1;
            } else {
                matches.push((n, module));
            }
        }
        if let Some(i) = found.iter().position(|f| !f) {
            let (short, module) = targets[i];
            return Err(Error::invalid(format!(
                "pass 'lora': target '{short}' ({module}) matches no projection in the model: no Linear reads a weight named model.layers.N.{module}.weight; drop it from targets"
            )));
        }

        let mut patch = Patch::new();
        let mut params_added = 0i64;
        let attrs = self.attrs();
        for (n, module) in &matches {
            let ins = graph.inputs_of(*n);
            let (x, w) = match (
                ins.first().copied().flatten(),
                ins.get(1).copied().flatten(),
            ) {
                (Some(x), Some(w)) => (x, w),
                _ => {
                    return Err(Error::invalid(format!(
                        "pass 'lora': node '{}' has no input or weight",
                        graph.display_name(*n)
                    )))
                }
            };
            let w_name = format!("{module}.weight");
            let (out_f, in_f) = match graph.weights.get(&w_name).map(|w| w.shape.as_slice()) {
                Some(&[o, i]) => (o, i),
                other => {
                    return Err(Error::invalid(format!(
                        "pass 'lora': node '{}': weight '{w_name}' must be 2-D [out, in], got {other:?}",
                        graph.display_name(*n)
                    )))
                }
            };
            if rank > in_f.min(out_f) {
                return Err(Error::invalid(format!(
                    "pass 'lora': rank {rank} is larger than the projection '{module}' ([{out_f}, {in_f}]): a rank above {} adds parameters and no expressiveness; lower lora.rank",
                    in_f.min(out_f)
                )));
            }
            let a_name = lora_a_name(module);
            let b_name = lora_b_name(module);
            let a = kaiming_uniform(rank, in_f, self.options.seed, &a_name);
            let b = Tensor::zeros(DType::F32, vec![out_f, rank]);
            graph.weights.insert(Weight::from_tensor(&a_name, &a, true));
            graph.weights.insert(Weight::from_tensor(&b_name, &b, true));
            if let Some(w) = graph.weights.get_mut(&w_name) {
                w.trainable = false;
            }
            params_added += (rank * (in_f + out_f)) as i64;
            let weight_node = |p: &mut Patch, name: &str, shape: &[usize]| {
                p.add(
                    name,
                    Op::Weight {
                        name: name.to_string(),
                    },
                    &[],
                    vec![Output {
                        name: name.to_string(),
                        ty: Some(TensorType::fixed(DType::F32, shape)),
                    }],
                )
            };
            let a_v = weight_node(&mut patch, &a_name, &[rank, in_f]);
            let b_v = weight_node(&mut patch, &b_name, &[out_f, rank]);
            let mut inputs = vec![
                Some(PatchValue::Existing(x)),
                Some(PatchValue::Existing(w)),
                Some(a_v),
                Some(b_v),
            ];
            if let Some(bias) = ins.get(2).copied().flatten() {
                inputs.push(Some(PatchValue::Existing(bias)));
            }
            let node = graph.node(*n);
            let y = patch.add(
                node.name.clone(),
                Op::LoraLinear(attrs.clone()),
                &inputs,
                node.outputs.clone(),
            );
            patch.replace(Value::new(*n, 0), y);
        }
        let stats = if patch.is_empty() {
            Default::default()
        } else {
            graph.apply(patch)?
        };
        let mut report = Report {
            matched: matches.len(),
            nodes_added: stats.added,
            nodes_removed: stats.removed,
            params_added,
            ..Default::default()
        };
        if already > 0 {
            report.notes.push(format!(
                "{already} target projections already are LoraLinear (left alone)"
            ));
        }
        if !matches.is_empty() {
            let names: Vec<&str> = targets.iter().map(|(s, _)| *s).collect();
            report.notes.push(format!(
                "rank {rank}, alpha {}, scale {}{} on {} ({} projections); their base weights are frozen",
                self.options.alpha,
                attrs.scale(),
                if attrs.rslora { " (rsLoRA)" } else { "" },
                names.join(", "),
                matches.len()
            ));
        }
        Ok(report)
    }
}

/// Adds the adapter's LoRA branches to `graph` (this pass with the
/// adapter's rank, alpha and targets) and sets A and B to its tensors.
/// Other tensors in the adapter (PEFT `modules_to_save`, e.g. embeddings)
/// replace the model's weights of the same name.
pub fn apply_adapter(graph: &mut Graph, adapter: &LoraAdapter) -> Result<Report> {
    let what = format!("adapter {}", adapter.source.display());
    let options = Options {
        rank: adapter.rank,
        alpha: adapter.alpha,
        dropout: adapter.dropout,
        rslora: adapter.rslora,
        targets: adapter.targets.to_vec(),
        seed: 0,
    };
    let mut report = Lora::new(options)
        .run(graph)
        .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    report.pass = "lora".into();
    let expected: Vec<String> = graph
        .weights
        .iter()
        .filter(|w| is_lora_weight(&w.name))
        .map(|w| w.name.clone())
        .collect();
    let given: std::collections::HashSet<&str> =
        adapter.tensors.iter().map(|(n, _)| n.as_str()).collect();
    // Only the branches of this adapter's targets need values from it.
    let targets: Vec<&str> = adapter
        .targets
        .iter()
        .filter_map(|t| resolve_target(t).map(|(_, m)| m))
        .collect();
    for name in &expected {
        let ours = targets
            .iter()
            .any(|m| name.contains(&format!(".{m}.lora_")));
        if ours && !given.contains(name.as_str()) {
            return Err(Error::invalid(format!(
                "{what}: {} has no tensor '{name}' (the config targets this projection)",
                adapter.tensor_file
            )));
        }
    }
    let mut replaced = 0usize;
    for (name, t) in adapter.tensors {
        if is_lora_weight(name) {
            if !graph.weights.contains(name) {
                return Err(Error::invalid(format!(
                    "{what}: tensor '{name}' belongs to no LoRA branch of the model (is the adapter for another model, or are its target_modules wrong?)"
                )));
            }
            // This pass made A and B f32; they stay f32 whatever the file
            // held (readers decode f16/bf16 to f32 values).
            graph.weights.replace_values(name, t, true, &what)?;
        } else {
            graph
                .weights
                .replace_values(strip_peft_prefix(name), t, true, &what)?;
            replaced += 1;
        }
    }
    report.notes.push(format!(
        "loaded {} LoRA tensors from {}{}",
        adapter.tensors.len() - replaced,
        adapter.source.display(),
        if replaced > 0 {
            format!(", and {replaced} other weights (modules_to_save)")
        } else {
            String::new()
        }
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_bound_is_one_over_sqrt_fan_in() {
        let t = kaiming_uniform(8, 64, 0, "a");
        let v = t.as_f32().unwrap();
        assert!(v.iter().all(|x| x.abs() < 0.125), "bound 1/√64");
        let again = kaiming_uniform(8, 64, 0, "a");
        assert_eq!(t, again);
        assert_ne!(t, kaiming_uniform(8, 64, 1, "a"));
        assert_ne!(t, kaiming_uniform(8, 64, 0, "b"));
    }
}
