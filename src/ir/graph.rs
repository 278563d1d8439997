//! The graph: a petgraph `StableGraph` whose edges carry ports.

use super::{Op, TensorType, WeightStore};
use crate::{Error, Result};
use petgraph::stable_graph::{EdgeIndex, NodeIndex, StableGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;
use std::collections::HashMap;

/// An edge from output `src_slot` of its source to input `dst_slot` of its
/// target. Operands are read in port order, never in petgraph's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    pub src_slot: usize,
    pub dst_slot: usize,
}

/// One output of a node: the value a later node can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeIndex,
    pub slot: usize,
}

impl Value {
    pub fn new(node: NodeIndex, slot: usize) -> Self {
        Value { node, slot }
    }
}

/// A named output value with its type, when known.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// The value's name in the source format (ONNX value name); not part of
    /// the canonical print, which numbers values itself.
    pub name: String,
    pub ty: Option<TensorType>,
}

#[derive(Clone, Debug)]
pub struct Node {
    /// The node's name in the source format (may be empty).
    pub name: String,
    pub op: Op,
    /// Number of input ports, absent optional inputs included.
    pub num_inputs: usize,
    pub outputs: Vec<Output>,
}

/// The metadata key under which an export lowered to primitives records what
/// a plain LLaMA config.json does not describe (S²-Attn, unmerged LoRA), so
/// that a later save as a Hugging Face dir refuses instead of dropping it.
pub const BEYOND_CONFIG_PROP: &str = "lcc.beyond_config";

/// What of `graph` a plain LLaMA config.json would not describe, one
/// phrase per kind (empty when nothing): shifted sparse attention, LoRA.
pub fn beyond_config(graph: &Graph) -> Vec<String> {
    let mut s2 = 0;
    let mut lora = 0;
    for n in graph.g.node_weights() {
        match &n.op {
            super::Op::Attention(a) if a.pattern != super::AttentionPattern::FullCausal => s2 += 1,
            super::Op::LoraLinear(_) => lora += 1,
            _ => {}
        }
    }
    let mut out = Vec::new();
    if s2 > 0 {
        out.push(format!("shifted sparse attention (S²-Attn) in {s2} layers"));
    }
    if lora > 0 {
        out.push(format!("{lora} unmerged LoRA branches"));
    }
    out
}

/// Where a model came from and what it declares about itself.
#[derive(Clone, Debug, Default)]
pub struct ModelMeta {
    /// `onnx`, `hf`, or `built`.
    pub format: String,
    pub ir_version: Option<i64>,
    /// (domain, version); the default domain is "".
    pub opsets: Vec<(String, i64)>,
    pub producer: Option<String>,
    pub graph_name: Option<String>,
    /// ONNX `metadata_props` and similar key/value pairs.
    pub props: Vec<(String, String)>,
}

impl ModelMeta {
    /// The opset version of the default ONNX domain, if declared.
    pub fn default_opset(&self) -> Option<i64> {
        self.opsets
            .iter()
            .find(|(d, _)| d.is_empty() || d == "ai.onnx")
            .map(|(_, v)| *v)
    }

    pub fn prop(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub g: StableGraph<Node, Edge>,
    /// `Op::Input` nodes, in declaration order.
    pub inputs: Vec<NodeIndex>,
    /// Graph outputs: name and value, in declaration order.
    pub outputs: Vec<(String, Value)>,
    pub weights: WeightStore,
    pub meta: ModelMeta,
    /// The node reading each weight, so that `weight_value` is O(1) and
    /// building a model is linear in its size.
    weight_nodes: WeightNodes,
}

/// Which node reads each weight. Nodes added or removed through `Graph`'s
/// methods keep it current; any other edit of `g` changes the node count or
/// bound it was synced at, and the next lookup rebuilds it in one pass. A hit
/// is always checked against the node it names.
#[derive(Clone, Debug, Default)]
struct WeightNodes {
    map: HashMap<String, NodeIndex>,
    /// `(node_bound, node_count)` of the graph the map describes.
    synced: (usize, usize),
}

impl WeightNodes {
    fn state(g: &StableGraph<Node, Edge>) -> (usize, usize) {
        (g.node_bound(), g.node_count())
    }

    fn sync(&mut self, g: &StableGraph<Node, Edge>) {
        if self.synced != Self::state(g) {
            self.rebuild(g);
        }
    }

    fn rebuild(&mut self, g: &StableGraph<Node, Edge>) {
        self.map.clear();
        for n in g.node_indices() {
            if let Op::Weight { name } = &g[n].op {
                self.map.entry(name.clone()).or_insert(n);
            }
        }
        self.synced = Self::state(g);
    }

    /// Records node `n`, just added to `g` by `Graph`.
    fn added(&mut self, g: &StableGraph<Node, Edge>, n: NodeIndex) {
        let before = (g.node_bound(), g.node_count() - 1);
        let fresh = self.synced == before || self.synced == (before.0 - 1, before.1);
        if !fresh {
            return; // out of sync anyway: the next lookup rebuilds
        }
        if let Op::Weight { name } = &g[n].op {
            self.map.entry(name.clone()).or_insert(n);
        }
        self.synced = Self::state(g);
    }

    /// Records that node `n` (reading `op`) was just removed from `g` by `Graph`.
    fn removed(&mut self, g: &StableGraph<Node, Edge>, n: NodeIndex, op: &Op) {
        if self.synced != (g.node_bound(), g.node_count() + 1) {
            return;
        }
        if let Op::Weight { name } = op {
            if self.map.get(name) == Some(&n) {
                self.map.remove(name);
            }
        }
        self.synced = Self::state(g);
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    pub fn node_mut(&mut self, n: NodeIndex) -> &mut Node {
        &mut self.g[n]
    }

    /// Adds a node reading `inputs` in port order (`None` = absent optional
    /// input). Checks that every input value exists.
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Option<Value>],
        outputs: Vec<Output>,
    ) -> Result<NodeIndex> {
        let name = name.into();
        for (i, v) in inputs.iter().enumerate() {
            if let Some(v) = v {
                let ok = self
                    .g
                    .node_weight(v.node)
                    .is_some_and(|n| v.slot < n.outputs.len());
                if !ok {
                    return Err(Error::Verify(format!(
                        "node '{name}' ({}): input {i} reads a value that does not exist",
                        op.name()
                    )));
                }
            }
        }
        let idx = self.g.add_node(Node {
            name,
            op,
            num_inputs: inputs.len(),
            outputs,
        });
        self.weight_nodes.added(&self.g, idx);
        for (i, v) in inputs.iter().enumerate() {
            if let Some(v) = v {
                self.g.add_edge(
                    v.node,
                    idx,
                    Edge {
                        src_slot: v.slot,
                        dst_slot: i,
                    },
                );
            }
        }
        // Every output gets its type from the inputs' (merged with any the
        // caller recorded); a shape that does not fit the op is refused.
        if self.g[idx].outputs.len() == self.g[idx].op.num_outputs() {
            match super::infer::node_types(self, idx) {
                Ok(tys) => {
                    for (o, t) in self.g[idx].outputs.iter_mut().zip(tys) {
                        o.ty = t;
                    }
                }
                Err(e) => {
                    let op = self.g[idx].op.clone();
                    self.g.remove_node(idx);
                    self.weight_nodes.removed(&self.g, idx, &op);
                    return Err(e);
                }
            }
        }
        Ok(idx)
    }

    /// Infers and stores the type of every value (see [`super::infer`]).
    pub fn infer_types(&mut self) -> Result<()> {
        super::infer::infer_graph(self)
    }

    /// Adds a single-output node and returns its value.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
        ty: Option<TensorType>,
    ) -> Result<Value> {
        let name = name.into();
        let ins: Vec<Option<Value>> = inputs.iter().copied().map(Some).collect();
        let n = self.add_node(name.clone(), op, &ins, vec![Output { name, ty }])?;
        Ok(Value::new(n, 0))
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: &str, ty: TensorType) -> Value {
        let idx = self.g.add_node(Node {
            name: name.to_string(),
            op: Op::Input,
            num_inputs: 0,
            outputs: vec![Output {
                name: name.to_string(),
                ty: Some(ty),
            }],
        });
        self.weight_nodes.added(&self.g, idx);
        self.inputs.push(idx);
        Value::new(idx, 0)
    }

    /// Adds (or finds) the node that reads weight `name`, which must be in
    /// the store.
    pub fn weight_value(&mut self, name: &str) -> Result<Value> {
        let w = self.weights.get(name).ok_or_else(|| {
            Error::Verify(format!("weight '{name}' is referenced but not present"))
        })?;
        let ty = TensorType::fixed(w.dtype, &w.shape);
        self.weight_nodes.sync(&self.g);
        if let Some(&n) = self.weight_nodes.map.get(name) {
            if matches!(&self.g[n].op, Op::Weight { name: wn } if wn == name) {
                return Ok(Value::new(n, 0));
            }
            // Stale (an edit that kept the counts): rebuild and look again.
            self.weight_nodes.rebuild(&self.g);
            if let Some(&n) = self.weight_nodes.map.get(name) {
                return Ok(Value::new(n, 0));
            }
        }
        let idx = self.g.add_node(Node {
            name: name.to_string(),
            op: Op::Weight {
                name: name.to_string(),
            },
            num_inputs: 0,
            outputs: vec![Output {
                name: name.to_string(),
                ty: Some(ty),
            }],
        });
        self.weight_nodes.added(&self.g, idx);
        Ok(Value::new(idx, 0))
    }

    /// The value feeding each input port of `n`, in port order.
    pub fn inputs_of(&self, n: NodeIndex) -> Vec<Option<Value>> {
        let node = &self.g[n];
        let mut ins = vec![None; node.num_inputs];
        for e in self.g.edges_directed(n, Direction::Incoming) {
            let w = e.weight();
            if w.dst_slot < ins.len() {
                ins[w.dst_slot] = Some(Value::new(e.source(), w.src_slot));
            }
        }
        ins
    }

    /// Every (consumer node, input port) that reads `v`.
    pub fn uses_of(&self, v: Value) -> Vec<(NodeIndex, usize)> {
        let mut uses: Vec<(NodeIndex, usize)> = self
            .g
            .edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().src_slot == v.slot)
            .map(|e| (e.target(), e.weight().dst_slot))
            .collect();
        uses.sort();
        uses
    }

    /// The type of a value, if known.
    pub fn value_type(&self, v: Value) -> Option<&TensorType> {
        self.g
            .node_weight(v.node)
            .and_then(|n| n.outputs.get(v.slot))
            .and_then(|o| o.ty.as_ref())
    }

    /// Makes every reader of `old` (graph outputs included) read `new`.
    pub fn replace_uses(&mut self, old: Value, new: Value) {
        let edges: Vec<EdgeIndex> = self
            .g
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().src_slot == old.slot)
            .map(|e| e.id())
            .collect();
        for e in edges {
            let (_, target) = self.g.edge_endpoints(e).unwrap();
            let w = self.g.remove_edge(e).unwrap();
            self.g.add_edge(
                new.node,
                target,
                Edge {
                    src_slot: new.slot,
                    dst_slot: w.dst_slot,
                },
            );
        }
        for (_, v) in self.outputs.iter_mut() {
            if *v == old {
                *v = new;
            }
        }
    }

    /// Sets input port `port` of `n` to read `v` (replacing what it read).
    pub fn set_input(&mut self, n: NodeIndex, port: usize, v: Option<Value>) {
        let old: Vec<EdgeIndex> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .filter(|e| e.weight().dst_slot == port)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        if let Some(v) = v {
            self.g.add_edge(
                v.node,
                n,
                Edge {
                    src_slot: v.slot,
                    dst_slot: port,
                },
            );
        }
        let node = &mut self.g[n];
        if port >= node.num_inputs {
            node.num_inputs = port + 1;
        }
    }

    /// Removes every node that no graph output depends on (graph inputs
    /// stay). Weights no longer referenced are dropped from the store.
    /// Returns the number of nodes removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = vec![false; self.g.node_bound()];
        let mut stack: Vec<NodeIndex> = self.outputs.iter().map(|(_, v)| v.node).collect();
        stack.extend(self.inputs.iter().copied());
        while let Some(n) = stack.pop() {
            if live[n.index()] {
                continue;
            }
            live[n.index()] = true;
            stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
        }
        let dead: Vec<NodeIndex> = self.g.node_indices().filter(|n| !live[n.index()]).collect();
        for &n in &dead {
            if let Some(node) = self.g.remove_node(n) {
                self.weight_nodes.removed(&self.g, n, &node.op);
            }
        }
        let used: std::collections::HashSet<String> = self
            .g
            .node_weights()
            .filter_map(|n| match &n.op {
                Op::Weight { name } => Some(name.clone()),
                _ => None,
            })
            .collect();
        let unused: Vec<String> = self
            .weights
            .iter()
            .filter(|w| !used.contains(&w.name))
            .map(|w| w.name.clone())
            .collect();
        for name in unused {
            self.weights.remove(&name);
        }
        dead.len()
    }

    /// Number of nodes by op name (weights, inputs and constants excluded).
    pub fn op_histogram(&self) -> std::collections::BTreeMap<String, usize> {
        let mut h = std::collections::BTreeMap::new();
        for n in self.g.node_weights() {
            if matches!(n.op, Op::Input | Op::Weight { .. }) {
                continue;
            }
            *h.entry(n.op.name().to_string()).or_insert(0) += 1;
        }
        h
    }

    /// A name to use in errors for node `n`: its own name, else its op and index.
    pub fn display_name(&self, n: NodeIndex) -> String {
        let node = &self.g[n];
        if node.name.is_empty() {
            format!("{}#{}", node.op.name(), n.index())
        } else {
            node.name.clone()
        }
    }

    /// A deterministic topological order (see `print` for the rule).
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        super::print::canonical_order(self)
    }
}
