//! `merge-lora`: folds every LoRA branch into its base weight,
//! W' = W + scale·B·A (computed in f32, stored in W's dtype, as PEFT's
//! `merge_and_unload`), turns the `LoraLinear` back into a `Linear`, and
//! drops A and B. The merged weight is a new in-memory weight under the
//! base weight's Hugging Face name; the mapped original is not touched.
//!
//! ```text
//! before:  %5 = LoraLinear{rank=8, alpha=16.0}(%4, @model.layers.0.self_attn.q_proj.weight,
//!                 @base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight,
//!                 @base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight)
//! after:   %5 = Linear(%4, @model.layers.0.self_attn.q_proj.weight)
//! ```
//!
//! A graph without `LoraLinear` is left as it is.

use super::{Pass, Report};
use crate::ir::{Graph, Op, Patch, PatchValue, Tensor, TensorData, Value, Weight};
use crate::{Error, Result};
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

pub struct MergeLora;

impl MergeLora {
    pub fn new(_options: Options) -> Self {
        MergeLora
    }
}

/// The name of the weight a node reads on `port`, if it is a weight.
fn weight_on(graph: &Graph, ins: &[Option<Value>], port: usize) -> Option<String> {
    let v = ins.get(port).copied().flatten()?;
    match &graph.node(v.node).op {
        Op::Weight { name } => Some(name.clone()),
        _ => None,
    }
}

fn f32_values(graph: &Graph, name: &str, node: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let w = graph.weights.get(name).ok_or_else(|| {
        Error::invalid(format!(
            "pass 'merge-lora': node '{node}': weight '{name}' is not in the model"
        ))
    })?;
    let t = w
        .to_tensor()
        .map_err(|e| Error::invalid(format!("pass 'merge-lora': node '{node}': {e}")))?;
    let v = match t.data {
        TensorData::F32(v) => v,
        TensorData::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        _ => {
            return Err(Error::invalid(format!(
                "pass 'merge-lora': node '{node}': weight '{name}' is {}, not a float type",
                w.dtype
            )))
        }
    };
    Ok((v, w.shape.clone()))
}

impl Pass for MergeLora {
    fn needs_llama_level(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "merge-lora"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let lora_nodes: Vec<_> = graph
            .topo_order()?
            .into_iter()
            .filter(|&n| matches!(graph.node(n).op, Op::LoraLinear(_)))
            .collect();
        let mut report = Report::default();
        if lora_nodes.is_empty() {
            report
                .notes
                .push("no LoraLinear in the model: nothing to merge".into());
            return Ok(report);
        }
        let params_before = graph.weights.num_params() as i64;
        let mut patch = Patch::new();
        for &n in &lora_nodes {
            let display = graph.display_name(n);
            let Op::LoraLinear(attrs) = graph.node(n).op.clone() else {
                continue;
            };
            let ins = graph.inputs_of(n);
            let names: Vec<Option<String>> = (1..4).map(|p| weight_on(graph, &ins, p)).collect();
            let (Some(w_name), Some(a_name), Some(b_name)) =
                (names[0].clone(), names[1].clone(), names[2].clone())
            else {
                return Err(Error::invalid(format!(
                    "pass 'merge-lora': node '{display}': the base weight, lora_A and lora_B must be weights of the model to be merged"
                )));
            };
            let (mut w, w_shape) = f32_values(graph, &w_name, &display)?;
            let (a, a_shape) = f32_values(graph, &a_name, &display)?;
            let (b, b_shape) = f32_values(graph, &b_name, &display)?;
            let (out_f, in_f) = match *w_shape.as_slice() {
                [o, i] => (o, i),
                _ => {
                    return Err(Error::invalid(format!(
                        "pass 'merge-lora': node '{display}': weight '{w_name}' is not 2-D: {w_shape:?}"
                    )))
                }
            };
            let rank = a_shape.first().copied().unwrap_or(0);
            if a_shape != [rank, in_f] || b_shape != [out_f, rank] {
                return Err(Error::invalid(format!(
                    "pass 'merge-lora': node '{display}': lora_A {a_shape:?} and lora_B {b_shape:?} do not fit weight {w_shape:?} (expected [r, {in_f}] and [{out_f}, r])"
                )));
            }
            let scale = attrs.scale();
            for o in 0..out_f {
                let b_row = &b[o * rank..(o + 1) * rank];
                let w_row = &mut w[o * in_f..(o + 1) * in_f];
                for (i, wv) in w_row.iter_mut().enumerate() {
                    let mut acc = 0f32;
                    for (r, bv) in b_row.iter().enumerate() {
                        acc += bv * a[r * in_f + i];
                    }
                    *wv += scale * acc;
                }
            }
            let base = graph.weights.get(&w_name).expect("checked above");
            let (dtype, trainable) = (base.dtype, base.trainable);
            let data = match dtype {
                crate::ir::DType::F64 => TensorData::F64(w.iter().map(|&x| x as f64).collect()),
                _ => TensorData::F32(w),
            };
            let t = Tensor {
                dtype,
                shape: w_shape,
                data,
            };
            graph
                .weights
                .insert(Weight::from_tensor(&w_name, &t, trainable));

            let mut inputs: Vec<Option<PatchValue>> = ins[..2]
                .iter()
                .map(|v| v.map(PatchValue::Existing))
                .collect();
            if let Some(bias) = ins.get(4).copied().flatten() {
                inputs.push(Some(PatchValue::Existing(bias)));
            }
            let node = graph.node(n);
            let y = patch.add(node.name.clone(), Op::Linear, &inputs, node.outputs.clone());
            patch.replace(Value::new(n, 0), y);
        }
        let stats = graph.apply(patch)?;
        report.matched = lora_nodes.len();
        report.nodes_added = stats.added;
        report.nodes_removed = stats.removed;
        report.params_added = graph.weights.num_params() as i64 - params_before;
        report.notes.push(format!(
            "merged {} LoRA branches into their base weights",
            lora_nodes.len()
        ));
        Ok(report)
    }
}
