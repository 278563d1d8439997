//! `cse`: common subexpression elimination. Nodes with the same op (all
//! attributes included) reading the same values compute the same thing; the
//! first in canonical order stays and every use of the others reads it.
//! Constants with equal type and bytes merge likewise, and so do nodes reading
//! the same weight. Graph inputs never merge.
//!
//! ```text
//! before:  %0 = Neg(%x)              after:  %0 = Neg(%x)
//!          %1 = Neg(%x)                      %1 = Add(%0, %0)
//!          %2 = Add(%0, %1)
//! ```
//!
//! Merged inputs make their readers equal in turn, so one run in canonical
//! (topological) order reaches the fixed point; a second run changes nothing.

use super::{Pass, Report};
use crate::ir::{Graph, Op, Patch, PatchValue, Value};
use crate::Result;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

pub struct CommonSubexpressionElimination;

impl CommonSubexpressionElimination {
    pub fn new(_options: Options) -> Self {
        CommonSubexpressionElimination
    }
}

/// What makes two nodes the same computation, apart from their inputs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum OpKey {
    /// Constants compare by dtype, shape and exact bytes (so -0.0 ≠ 0.0 and
    /// NaN payloads count).
    Constant {
        dtype: String,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
    /// Every other op: its full `Debug` form, which lists all attributes
    /// with round-trippable floats.
    Other(String),
}

fn op_key(op: &Op) -> OpKey {
    match op {
        Op::Constant { value } => OpKey::Constant {
            dtype: value.dtype.to_string(),
            shape: value.shape.clone(),
            bytes: value.to_le_bytes(),
        },
        other => OpKey::Other(format!("{other:?}")),
    }
}

impl Pass for CommonSubexpressionElimination {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let order = graph.topo_order()?;
        // Each merged value → the value that stays.
        let mut merged: HashMap<Value, Value> = HashMap::new();
        let mut seen: HashMap<
            (OpKey, Vec<Option<Value>>, usize),
            petgraph::stable_graph::NodeIndex,
        > = HashMap::new();
        let mut patch = Patch::new();
        let mut report = Report::default();
        for n in order {
            let node = graph.node(n);
            if matches!(node.op, Op::Input) {
                continue;
            }
            let ins: Vec<Option<Value>> = graph
                .inputs_of(n)
                .into_iter()
                .map(|v| v.map(|v| merged.get(&v).copied().unwrap_or(v)))
                .collect();
            let key = (op_key(&node.op), ins, node.outputs.len());
            match seen.get(&key) {
                None => {
                    seen.insert(key, n);
                }
                Some(&keep) => {
                    report.matched += 1;
                    for slot in 0..node.outputs.len() {
                        let (old, new) = (Value::new(n, slot), Value::new(keep, slot));
                        merged.insert(old, new);
                        patch.replace(old, PatchValue::Existing(new));
                    }
                }
            }
        }
        if !patch.is_empty() {
            let stats = graph
                .apply(patch)
                .map_err(|e| crate::Error::invalid(format!("pass 'cse': {e}")))?;
            report.nodes_removed = stats.removed;
        }
        Ok(report)
    }
}
