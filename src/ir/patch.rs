//! Rewrites as patches: a small graph of new nodes plus which old values they
//! replace. Applying a patch adds the nodes, rewires every use of a replaced
//! value, drops what became dead, and verifies the result.

use super::{Graph, Op, Output, Value};
use crate::Result;
use petgraph::stable_graph::NodeIndex;

/// A value a patch node reads: one already in the graph, or an output of a
/// node added earlier in the same patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchValue {
    Existing(Value),
    New { node: usize, slot: usize },
}

#[derive(Clone, Debug)]
struct PatchNode {
    name: String,
    op: Op,
    inputs: Vec<Option<PatchValue>>,
    outputs: Vec<Output>,
}

/// A pending rewrite.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    nodes: Vec<PatchNode>,
    replacements: Vec<(Value, PatchValue)>,
}

/// What applying a patch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchStats {
    pub added: usize,
    pub removed: usize,
}

impl Patch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node; returns its first output.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Option<PatchValue>],
        outputs: Vec<Output>,
    ) -> PatchValue {
        self.nodes.push(PatchNode {
            name: name.into(),
            op,
            inputs: inputs.to_vec(),
            outputs,
        });
        PatchValue::New {
            node: self.nodes.len() - 1,
            slot: 0,
        }
    }

    /// Every use of `old` will read `new`.
    pub fn replace(&mut self, old: Value, new: PatchValue) {
        self.replacements.push((old, new));
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.replacements.is_empty()
    }
}

impl Graph {
    /// Applies a patch, removes dead nodes, and verifies the graph.
    pub fn apply(&mut self, patch: Patch) -> Result<PatchStats> {
        let before = self.g.node_count();
        let mut added: Vec<NodeIndex> = Vec::with_capacity(patch.nodes.len());
        let resolve = |pv: PatchValue, added: &[NodeIndex]| -> Value {
            match pv {
                PatchValue::Existing(v) => v,
                PatchValue::New { node, slot } => Value::new(added[node], slot),
            }
        };
        for pn in patch.nodes {
            let ins: Vec<Option<Value>> = pn
                .inputs
                .iter()
                .map(|i| i.map(|v| resolve(v, &added)))
                .collect();
            let idx = self.add_node(pn.name, pn.op, &ins, pn.outputs)?;
            added.push(idx);
        }
        for (old, new) in patch.replacements {
            let new = resolve(new, &added);
            self.replace_uses(old, new);
        }
        let removed = self.remove_dead();
        // Rewired readers may now see differently named (equal) dims.
        self.infer_types()?;
        super::verify(self)?;
        let n_added = added.len();
        debug_assert_eq!(before + n_added - removed, self.g.node_count());
        Ok(PatchStats {
            added: n_added,
            removed,
        })
    }
}
