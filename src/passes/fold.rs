//! `fold`: constant folding. Every node whose inputs are all constants is
//! evaluated with the CPU kernels and replaced by a `Constant`; `Shape` (and
//! `Size`) of a value whose type is fully fixed folds even when the value
//! itself is computed. Weights stay weights, and a result larger than
//! `max_bytes` stays computed. Small frozen weights (at most
//! `weight_elements` values) are read as constants, since ONNX exporters
//! store shape constants as initializers.
//!
//! ```text
//! before:  %0 = Constant{dtype=f32, shape=[], value=[1.0]}()
//!          %1 = Constant{dtype=f32, shape=[], value=[2.0]}()
//!          %2 = Add(%0, %1) : f32[]
//!          %3 = Shape(%x) : i64[2]            # %x: f32[2,3]
//! after:   %0 = Constant{dtype=f32, shape=[], value=[3.0]}() : f32[]
//!          %1 = Constant{dtype=i64, shape=[2], value=[2, 3]}() : i64[2]
//! ```
//!
//! A second run finds only constants and changes nothing.

use super::{Pass, Report};
use crate::ir::{Graph, Op, Output, Patch, Tensor, TensorType, Value};
use crate::runtime::eval_op;
use crate::Result;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Largest folded constant, in bytes of its logical dtype; larger
    /// results stay computed so that folding never bloats a graph.
    pub max_bytes: usize,
    /// Frozen weights (not trainable, with values) of at most this many
    /// elements are read as constants: ONNX exporters store shape and index
    /// constants as small initializers. The weights themselves stay.
    pub weight_elements: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_bytes: 1 << 20,
            weight_elements: 16,
        }
    }
}

pub struct ConstantFolding {
    options: Options,
}

impl ConstantFolding {
    pub fn new(options: Options) -> Self {
        ConstantFolding { options }
    }
}

/// The dims of a type (`None` for a symbolic one), or `None` when the rank
/// is unknown.
fn type_dims(ty: Option<&TensorType>) -> Option<Vec<Option<usize>>> {
    Some(
        ty?.shape
            .as_ref()?
            .iter()
            .map(|d| d.fixed().and_then(|n| usize::try_from(n).ok()))
            .collect(),
    )
}

/// `Shape`/`Size` of a value known only by its type: `Shape` folds when the
/// dims it selects are fixed (`Shape{start=2}` of `f32[batch,seq,64]` is
/// `[64]`), `Size` when all are.
fn fold_from_type(op: &Op, dims: &[Option<usize>]) -> Option<Tensor> {
    match op {
        Op::Shape { start, end } => {
            let r = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let s = clamp(start.unwrap_or(0));
            let e = clamp(end.unwrap_or(r));
            let vals: Vec<i64> = if s < e {
                dims[s..e]
                    .iter()
                    .map(|d| d.map(|d| d as i64))
                    .collect::<Option<_>>()?
            } else {
                Vec::new()
            };
            Some(Tensor::i64(vec![vals.len()], vals))
        }
        Op::Size => Some(Tensor::scalar_i64(
            dims.iter()
                .map(|d| d.map(|d| d as i64))
                .product::<Option<i64>>()?,
        )),
        _ => None,
    }
}

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let order = graph.topo_order()?;
        // Known constant values: existing constants and what this run folded.
        let mut known: HashMap<Value, Tensor> = HashMap::new();
        let mut patch = Patch::new();
        let mut report = Report::default();
        let mut too_big = 0usize;
        let mut failed: Vec<String> = Vec::new();
        for n in order {
            let node = graph.node(n);
            match &node.op {
                Op::Input => continue,
                Op::Weight { name } => {
                    let small = graph
                        .weights
                        .get(name)
                        .filter(|w| !w.trainable && w.numel() <= self.options.weight_elements);
                    if let Some(t) = small.and_then(|w| w.to_tensor().ok()) {
                        known.insert(Value::new(n, 0), t);
                    }
                    continue;
                }
                Op::Constant { value } => {
                    known.insert(Value::new(n, 0), value.clone());
                    continue;
                }
                _ => {}
            }
            let ins = graph.inputs_of(n);
            let all_known = ins.iter().flatten().all(|v| known.contains_key(v));
            let outs: Vec<Tensor> = if all_known {
                let args: Vec<Option<&Tensor>> =
                    ins.iter().map(|v| v.as_ref().map(|v| &known[v])).collect();
                match eval_op(&node.op, &args) {
                    Ok(t) if t.len() >= node.outputs.len() => t,
                    Ok(_) => continue,
                    Err(e) => {
                        // Left for the runtime to report with its context.
                        failed.push(format!(
                            "{} ({}): {e}",
                            graph.display_name(n),
                            node.op.name()
                        ));
                        continue;
                    }
                }
            } else {
                let from_type = ins
                    .first()
                    .copied()
                    .flatten()
                    .and_then(|v| type_dims(graph.value_type(v)))
                    .and_then(|dims| fold_from_type(&node.op, &dims));
                match from_type {
                    Some(t) => vec![t],
                    None => continue,
                }
            };
            let fits = outs
                .iter()
                .take(node.outputs.len())
                .all(|t| t.numel().saturating_mul(t.dtype.size()) <= self.options.max_bytes);
            if !fits {
                too_big += 1;
                continue;
            }
            report.matched += 1;
            let multi = node.outputs.len() > 1;
            let mut new_nodes = Vec::new();
            for (slot, t) in outs.into_iter().take(node.outputs.len()).enumerate() {
                let out = &node.outputs[slot];
                let name = if multi {
                    format!("{}:{slot}", node.name)
                } else {
                    node.name.clone()
                };
                let pv = patch.add(
                    name,
                    Op::Constant { value: t.clone() },
                    &[],
                    vec![Output {
                        name: out.name.clone(),
                        ty: Some(TensorType::fixed(t.dtype, &t.shape)),
                    }],
                );
                new_nodes.push((Value::new(n, slot), pv, t));
            }
            for (old, pv, t) in new_nodes {
                patch.replace(old, pv);
                known.insert(old, t);
            }
        }
        if too_big > 0 {
            report.notes.push(format!(
                "{too_big} constant computations left in the graph: their results exceed {} bytes (option max_bytes)",
                self.options.max_bytes
            ));
        }
        if !failed.is_empty() {
            report.notes.push(format!(
                "{} nodes with constant inputs could not be evaluated and stay: {}",
                failed.len(),
                failed.join("; ")
            ));
        }
        if !patch.is_empty() {
            let stats = graph
                .apply(patch)
                .map_err(|e| crate::Error::invalid(format!("pass 'fold': {e}")))?;
            report.nodes_added = stats.added;
            report.nodes_removed = stats.removed;
        }
        Ok(report)
    }
}
