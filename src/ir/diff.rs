//! Semantic differences between two graphs, for `lcc diff-graph`.
//!
//! Nodes are matched in two rounds. First by structure: each node gets a
//! hash of its op name and the structure hashes of its operands (weights by
//! name, inputs by name), attributes left out, so a node whose attributes
//! changed still finds its partner, and so does everything downstream of it.
//! Then, among what is left, by node name and op. Matched nodes whose
//! attributes differ are "changed"; the rest are added or removed.

use super::{Graph, NodeIndex, Op};
use crate::Result;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeRef {
    pub op: String,
    pub name: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AttrChange {
    pub attr: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeChange {
    pub op: String,
    pub name: String,
    pub attrs: Vec<AttrChange>,
    /// The operands differ (the node was rewired).
    pub rewired: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightChange {
    pub name: String,
    pub before: String,
    pub after: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightRef {
    pub name: String,
    pub ty: String,
    pub params: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GraphDiff {
    pub nodes_added: Vec<NodeRef>,
    pub nodes_removed: Vec<NodeRef>,
    pub nodes_changed: Vec<NodeChange>,
    pub weights_added: Vec<WeightRef>,
    pub weights_removed: Vec<WeightRef>,
    /// Same name, different dtype, shape or trainability.
    pub weights_changed: Vec<WeightChange>,
    pub params_before: u64,
    pub params_after: u64,
    pub inputs_changed: Vec<String>,
    pub outputs_changed: Vec<String>,
}

impl GraphDiff {
    pub fn is_empty(&self) -> bool {
        self.nodes_added.is_empty()
            && self.nodes_removed.is_empty()
            && self.nodes_changed.is_empty()
            && self.weights_added.is_empty()
            && self.weights_removed.is_empty()
            && self.weights_changed.is_empty()
            && self.inputs_changed.is_empty()
            && self.outputs_changed.is_empty()
    }
}

fn fnv(h: u64, s: &str) -> u64 {
    let mut h = h;
    for b in s.bytes().chain(std::iter::once(0xff)) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Structure hashes (attributes excluded) in canonical order.
fn structure_hashes(graph: &Graph) -> Result<Vec<(NodeIndex, u64)>> {
    let order = graph.topo_order()?;
    let mut hash: HashMap<NodeIndex, u64> = HashMap::new();
    let mut out = Vec::with_capacity(order.len());
    for n in order {
        let node = graph.node(n);
        let mut h = fnv(0xcbf29ce484222325, node.op.name());
        match &node.op {
            Op::Input => h = fnv(h, &node.outputs[0].name),
            Op::Weight { name } => h = fnv(h, name),
            _ => {}
        }
        for v in graph.inputs_of(n) {
            match v {
                Some(v) => {
                    h = fnv(h, &hash[&v.node].to_string());
                    h = fnv(h, &v.slot.to_string());
                }
                None => h = fnv(h, "_"),
            }
        }
        hash.insert(n, h);
        out.push((n, h));
    }
    Ok(out)
}

fn node_ref(g: &Graph, n: NodeIndex) -> NodeRef {
    NodeRef {
        op: g.node(n).op.name().to_string(),
        name: g.display_name(n),
    }
}

fn attr_changes(a: &Op, b: &Op) -> Vec<AttrChange> {
    let aa: BTreeMap<&str, String> = a.attrs().into_iter().collect();
    let bb: BTreeMap<&str, String> = b.attrs().into_iter().collect();
    let mut keys: Vec<&str> = aa.keys().chain(bb.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| aa.get(k) != bb.get(k))
        .map(|k| AttrChange {
            attr: k.to_string(),
            before: aa.get(k).cloned(),
            after: bb.get(k).cloned(),
        })
        .collect()
}

/// Compares two graphs.
pub fn diff(a: &Graph, b: &Graph) -> Result<GraphDiff> {
    let ha = structure_hashes(a)?;
    let hb = structure_hashes(b)?;
    let mut by_hash: HashMap<u64, Vec<NodeIndex>> = HashMap::new();
    for &(n, h) in hb.iter().rev() {
        by_hash.entry(h).or_default().push(n);
    }
    let mut pairs: Vec<(NodeIndex, NodeIndex, bool)> = Vec::new();
    let mut unmatched_a = Vec::new();
    let mut matched_b = std::collections::HashSet::new();
    for &(n, h) in &ha {
        match by_hash.get_mut(&h).and_then(|v| v.pop()) {
            Some(m) => {
                matched_b.insert(m);
                pairs.push((n, m, false));
            }
            None => unmatched_a.push(n),
        }
    }
    let mut rest_b: Vec<NodeIndex> = hb
        .iter()
        .map(|&(n, _)| n)
        .filter(|n| !matched_b.contains(n))
        .collect();
    let mut removed = Vec::new();
    for n in unmatched_a {
        let na = a.node(n);
        let found = rest_b.iter().position(|&m| {
            let nb = b.node(m);
            !na.name.is_empty() && nb.name == na.name && nb.op.name() == na.op.name()
        });
        match found {
            Some(i) => pairs.push((n, rest_b.remove(i), true)),
            None => removed.push(n),
        }
    }
    let is_boundary = |op: &Op| matches!(op, Op::Input | Op::Weight { .. });
    let mut d = GraphDiff {
        params_before: a.weights.num_params(),
        params_after: b.weights.num_params(),
        ..Default::default()
    };
    for n in removed {
        if !is_boundary(&a.node(n).op) {
            d.nodes_removed.push(node_ref(a, n));
        }
    }
    for m in rest_b {
        if !is_boundary(&b.node(m).op) {
            d.nodes_added.push(node_ref(b, m));
        }
    }
    for (n, m, rewired) in pairs {
        let attrs = attr_changes(&a.node(n).op, &b.node(m).op);
        if (!attrs.is_empty() || rewired) && !is_boundary(&a.node(n).op) {
            d.nodes_changed.push(NodeChange {
                op: b.node(m).op.name().to_string(),
                name: b.display_name(m),
                attrs,
                rewired,
            });
        }
    }
    let wty = |w: &super::Weight| {
        format!(
            "{}{}",
            super::TensorType::fixed(w.dtype, &w.shape),
            if w.trainable { " trainable" } else { "" }
        )
    };
    for w in a.weights.iter() {
        match b.weights.get(&w.name) {
            None => d.weights_removed.push(WeightRef {
                name: w.name.clone(),
                ty: wty(w),
                params: w.numel() as u64,
            }),
            Some(v) if wty(v) != wty(w) => d.weights_changed.push(WeightChange {
                name: w.name.clone(),
                before: wty(w),
                after: wty(v),
            }),
            _ => {}
        }
    }
    for w in b.weights.iter() {
        if !a.weights.contains(&w.name) {
            d.weights_added.push(WeightRef {
                name: w.name.clone(),
                ty: wty(w),
                params: w.numel() as u64,
            });
        }
    }
    let io = |g: &Graph| -> (Vec<String>, Vec<String>) {
        let ins = g
            .inputs
            .iter()
            .map(|&n| {
                let o = &g.node(n).outputs[0];
                format!(
                    "{}: {}",
                    o.name,
                    o.ty.as_ref()
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into())
                )
            })
            .collect();
        let outs = g
            .outputs
            .iter()
            .map(|(name, v)| {
                format!(
                    "{name}: {}",
                    g.value_type(*v)
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into())
                )
            })
            .collect();
        (ins, outs)
    };
    let (ia, oa) = io(a);
    let (ib, ob) = io(b);
    for x in &ia {
        if !ib.contains(x) {
            d.inputs_changed.push(format!("- {x}"));
        }
    }
    for x in &ib {
        if !ia.contains(x) {
            d.inputs_changed.push(format!("+ {x}"));
        }
    }
    for x in &oa {
        if !ob.contains(x) {
            d.outputs_changed.push(format!("- {x}"));
        }
    }
    for x in &ob {
        if !oa.contains(x) {
            d.outputs_changed.push(format!("+ {x}"));
        }
    }
    d.nodes_changed.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(d)
}

impl std::fmt::Display for GraphDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn histogram(nodes: &[NodeRef]) -> String {
            let mut h: BTreeMap<&str, usize> = BTreeMap::new();
            for n in nodes {
                *h.entry(&n.op).or_insert(0) += 1;
            }
            h.iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
        if self.is_empty() {
            return writeln!(f, "graphs are equal");
        }
        writeln!(
            f,
            "nodes:   +{} added, -{} removed, ~{} changed",
            self.nodes_added.len(),
            self.nodes_removed.len(),
            self.nodes_changed.len()
        )?;
        if !self.nodes_added.is_empty() {
            writeln!(f, "  added:   {}", histogram(&self.nodes_added))?;
        }
        if !self.nodes_removed.is_empty() {
            writeln!(f, "  removed: {}", histogram(&self.nodes_removed))?;
        }
        const SHOW: usize = 20;
        for c in self.nodes_changed.iter().take(SHOW) {
            let attrs: Vec<String> = c
                .attrs
                .iter()
                .map(|a| {
                    format!(
                        "{}: {} → {}",
                        a.attr,
                        a.before.as_deref().unwrap_or("(unset)"),
                        a.after.as_deref().unwrap_or("(unset)")
                    )
                })
                .collect();
            let mut what = attrs.join(", ");
            if c.rewired {
                if !what.is_empty() {
                    what.push_str("; ");
                }
                what.push_str("operands rewired");
            }
            writeln!(f, "  ~ {} '{}': {}", c.op, c.name, what)?;
        }
        if self.nodes_changed.len() > SHOW {
            writeln!(
                f,
                "  … and {} more changed nodes",
                self.nodes_changed.len() - SHOW
            )?;
        }
        writeln!(
            f,
            "weights: +{} added, -{} removed, ~{} changed",
            self.weights_added.len(),
            self.weights_removed.len(),
            self.weights_changed.len()
        )?;
        for w in self.weights_added.iter().take(SHOW) {
            writeln!(f, "  + {}: {}", w.name, w.ty)?;
        }
        if self.weights_added.len() > SHOW {
            writeln!(f, "  … and {} more added", self.weights_added.len() - SHOW)?;
        }
        for w in self.weights_removed.iter().take(SHOW) {
            writeln!(f, "  - {}: {}", w.name, w.ty)?;
        }
        if self.weights_removed.len() > SHOW {
            writeln!(
                f,
                "  … and {} more removed",
                self.weights_removed.len() - SHOW
            )?;
        }
        for w in self.weights_changed.iter().take(SHOW) {
            writeln!(f, "  ~ {}: {} → {}", w.name, w.before, w.after)?;
        }
        for x in &self.inputs_changed {
            writeln!(f, "input  {x}")?;
        }
        for x in &self.outputs_changed {
            writeln!(f, "output {x}")?;
        }
        let delta = self.params_after as i128 - self.params_before as i128;
        writeln!(
            f,
            "parameters: {} → {} ({}{})",
            crate::util::group_digits(self.params_before),
            crate::util::group_digits(self.params_after),
            if delta >= 0 { "+" } else { "-" },
            crate::util::group_digits(delta.unsigned_abs() as u64)
        )
    }
}
