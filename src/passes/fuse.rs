//! `fuse`: kernel fusion, run after `autodiff` (on the training graph) or on
//! an inference graph.
//!
//! - **Projections** (`projections: true`): frozen projections of one input
//!   (q/k/v of a layer, gate/up of its MLP) become one `MergedLinear`: one
//!   GEMM against their weights concatenated along the rows. The
//!   concatenation is a `Concat` of the weights in the graph, which a
//!   backend computes once when it compiles the graph (frozen weights do not
//!   change); the checkpoint keeps the separate weights. LoRA branches stay
//!   separate and trainable: each part keeps its own `lora_A`/`lora_B`.
//! - **Elementwise chains** (`elementwise: true`): connected float `Unary`,
//!   `Binary` (+ − × ÷), float-to-float `Cast` and scalar constants whose
//!   intermediate values have no other reader become one `Fused` node
//!   holding the expression (the backward's sums of gradient
//!   contributions, scalings, residual adds next to other elementwise
//!   work). A lone op stays as it is.
//!
//! ```text
//! before:  %q = Linear(%x, @q)            after:  %w = Concat{axis=0}(@q, @k, @v)
//!          %k = Linear(%x, @k)                    %q, %k, %v = MergedLinear{parts=[64,64,64]}(%x, %w)
//!          %v = Linear(%x, @v)
//!          %s = Add(%a, %b)                       %t = Fused{expr=mul(add(i0,i1),0.5)}(%a, %b)
//!          %t = Mul(%s, 0.5)
//! ```
//!
//! Every fused node means what its expansion into the original ops means
//! ([`crate::ir::expand`]); ONNX export writes that expansion.

use super::{Pass, Report};
use crate::ir::{
    fusable_binary, fusable_unary, DType, FusedExpr, FusedStep, Graph, MergedLinear, MergedPart,
    NodeIndex, Op, Output, Patch, PatchValue, Value,
};
use crate::Result;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Merge frozen projections of one input into one GEMM.
    #[serde(default = "yes")]
    pub projections: bool,
    /// Fuse chains of elementwise ops into one node.
    #[serde(default = "yes")]
    pub elementwise: bool,
}

fn yes() -> bool {
    true
}

impl Default for Options {
    fn default() -> Self {
        Options {
            projections: true,
            elementwise: true,
        }
    }
}

pub struct Fuse {
    options: Options,
}

impl Fuse {
    pub fn new(options: Options) -> Self {
        Fuse { options }
    }
}

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let mut report = Report::default();
        let fail = |e: crate::Error| crate::Error::invalid(format!("pass 'fuse': {e}"));
        if self.options.projections {
            let (patch, groups, parts) = merge_projections(graph)?;
            if groups > 0 {
                let stats = graph.apply(patch).map_err(fail)?;
                report.matched += groups;
                report.nodes_added += stats.added;
                report.nodes_removed += stats.removed;
                report.notes.push(format!(
                    "merged {parts} projections into {groups} GEMMs (weights concatenated when a backend compiles the graph)"
                ));
            }
        }
        if self.options.elementwise {
            let (patch, chains, ops) = fuse_elementwise(graph)?;
            if chains > 0 {
                let stats = graph.apply(patch).map_err(fail)?;
                report.matched += chains;
                report.nodes_added += stats.added;
                report.nodes_removed += stats.removed;
                report.notes.push(format!(
                    "fused {ops} elementwise ops into {chains} expressions"
                ));
            }
        }
        Ok(report)
    }
}

/// A projection that may join a merge: `Linear` or `LoraLinear` without bias
/// or dropout, reading `x` by a frozen 2-D weight.
struct Candidate {
    node: NodeIndex,
    weight: Value,
    dtype: DType,
    out_f: u64,
    in_f: u64,
    lora: Option<(crate::ir::LoraAttrs, Value, Value)>,
}

fn candidate(graph: &Graph, n: NodeIndex) -> Option<(Value, Candidate)> {
    let node = graph.node(n);
    let ins = graph.inputs_of(n);
    let lora = match &node.op {
        Op::Linear if ins.len() == 2 => None,
        Op::LoraLinear(l) if ins.len() == 4 && l.dropout == 0.0 => {
            Some((l.clone(), ins[2]?, ins[3]?))
        }
        _ => return None,
    };
    let (x, w) = (ins[0]?, ins[1]?);
    let Op::Weight { name } = &graph.node(w.node).op else {
        return None;
    };
    let stored = graph.weights.get(name)?;
    if stored.trainable || stored.shape.len() != 2 {
        return None;
    }
    Some((
        x,
        Candidate {
            node: n,
            weight: w,
            dtype: stored.dtype,
            out_f: stored.shape[0] as u64,
            in_f: stored.shape[1] as u64,
            lora,
        },
    ))
}

/// The merged node's name: the members' common dotted prefix and their
/// last components, e.g. `model.layers.0.self_attn.q_proj+k_proj+v_proj`.
fn merged_name(names: &[&str]) -> String {
    let split: Vec<Vec<&str>> = names.iter().map(|n| n.split('.').collect()).collect();
    let mut common = 0;
    while split
        .iter()
        .all(|s| s.len() > common + 1 && s[common] == split[0][common])
    {
        common += 1;
    }
    let prefix = split[0][..common].join(".");
    let rest: Vec<String> = split.iter().map(|s| s[common..].join(".")).collect();
    if prefix.is_empty() {
        rest.join("+")
    } else {
        format!("{prefix}.{}", rest.join("+"))
    }
}

fn merge_projections(graph: &Graph) -> Result<(Patch, usize, usize)> {
    let order = graph.topo_order()?;
    // Readers of each value, in canonical order, grouped by weight dtype
    // and in-features.
    let mut groups: Vec<((Value, DType, u64), Vec<Candidate>)> = Vec::new();
    let mut index: HashMap<(Value, DType, u64), usize> = HashMap::new();
    for &n in &order {
        if let Some((x, c)) = candidate(graph, n) {
            let key = (x, c.dtype, c.in_f);
            let i = *index.entry(key).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(c);
        }
    }
    let mut patch = Patch::new();
    let (mut merged, mut parts) = (0, 0);
    for ((x, _, _), members) in groups {
        if members.len() < 2 {
            continue;
        }
        let names: Vec<&str> = members
            .iter()
            .map(|c| graph.node(c.node).name.as_str())
            .collect();
        let name = merged_name(&names);
        let weights: Vec<Option<PatchValue>> = members
            .iter()
            .map(|c| Some(PatchValue::Existing(c.weight)))
            .collect();
        let cat = patch.add(
            format!("{name}.weight"),
            Op::Concat { axis: 0 },
            &weights,
            vec![Output {
                name: format!("{name}.weight"),
                ty: None,
            }],
        );
        let mut ins = vec![Some(PatchValue::Existing(x)), Some(cat)];
        let mut mparts = Vec::with_capacity(members.len());
        for c in &members {
            mparts.push(MergedPart {
                out_features: c.out_f as usize,
                lora: c.lora.as_ref().map(|(l, _, _)| l.clone()),
            });
            if let Some((_, a, b)) = &c.lora {
                ins.push(Some(PatchValue::Existing(*a)));
                ins.push(Some(PatchValue::Existing(*b)));
            }
        }
        let outputs: Vec<Output> = members
            .iter()
            .map(|c| graph.node(c.node).outputs[0].clone())
            .collect();
        let PatchValue::New { node, .. } = patch.add(
            name,
            Op::MergedLinear(MergedLinear { parts: mparts }),
            &ins,
            outputs,
        ) else {
            unreachable!("Patch::add returns a new value");
        };
        for (slot, c) in members.iter().enumerate() {
            patch.replace(Value::new(c.node, 0), PatchValue::New { node, slot });
        }
        merged += 1;
        parts += members.len();
    }
    Ok((patch, merged, parts))
}

/// The dtype of a value when it is float.
fn float_type(graph: &Graph, v: Value) -> Option<DType> {
    graph
        .value_type(v)
        .map(|t| t.dtype)
        .filter(|d| d.is_float())
}

/// Whether `n` is an elementwise op an expression may hold.
fn fusable(graph: &Graph, n: NodeIndex) -> bool {
    let node = graph.node(n);
    if node.outputs.len() != 1 {
        return false;
    }
    let Some(out) = float_type(graph, Value::new(n, 0)) else {
        return false;
    };
    let ins = graph.inputs_of(n);
    let in_types: Option<Vec<DType>> = ins
        .iter()
        .map(|v| v.and_then(|v| float_type(graph, v)))
        .collect();
    let Some(in_types) = in_types else {
        return false;
    };
    let held64 = |d: DType| d == DType::F64;
    match &node.op {
        Op::Unary(u) => fusable_unary(*u) && in_types == [out],
        Op::Binary(b) => fusable_binary(*b) && in_types == [out, out],
        Op::Cast { to } => in_types.len() == 1 && *to == out && held64(in_types[0]) == held64(out),
        _ => false,
    }
}

/// A float scalar constant, as an expression step of dtype `want`.
fn scalar(graph: &Graph, v: Value, want: DType) -> Option<f64> {
    match &graph.node(v.node).op {
        Op::Constant { value } if value.numel() == 1 && value.dtype == want => {
            value.to_f64_vec().first().copied()
        }
        _ => None,
    }
}

/// Builds the expression of the chain rooted at `root`.
struct ChainBuilder<'g> {
    graph: &'g Graph,
    outputs: HashSet<Value>,
    steps: Vec<FusedStep>,
    dtypes: Vec<DType>,
    inputs: Vec<Value>,
    absorbed: Vec<NodeIndex>,
}

impl ChainBuilder<'_> {
    /// Whether the producer of `v` joins the chain: a fusable op whose only
    /// reader is the chain.
    fn joins(&self, v: Value) -> bool {
        fusable(self.graph, v.node)
            && !self.outputs.contains(&v)
            && self.graph.uses_of(v).len() == 1
    }

    fn step(&mut self, s: FusedStep, d: DType) -> usize {
        self.steps.push(s);
        self.dtypes.push(d);
        self.steps.len() - 1
    }

    /// The step computing `v` (an operand of a node in the chain, of dtype `d`).
    fn operand(&mut self, v: Value, d: DType) -> usize {
        if let Some(x) = scalar(self.graph, v, d) {
            return self.step(FusedStep::Scalar(x), d);
        }
        if self.joins(v) {
            return self.node(v.node);
        }
        let k = match self.inputs.iter().position(|&i| i == v) {
            Some(k) => k,
            None => {
                self.inputs.push(v);
                self.inputs.len() - 1
            }
        };
        self.step(FusedStep::Input(k), d)
    }

    fn node(&mut self, n: NodeIndex) -> usize {
        self.absorbed.push(n);
        let graph = self.graph;
        let ins: Vec<Value> = graph.inputs_of(n).into_iter().flatten().collect();
        let out = float_type(graph, Value::new(n, 0)).unwrap_or(DType::F32);
        let in_d = |i: usize| float_type(graph, ins[i]).unwrap_or(out);
        match &graph.node(n).op {
            Op::Unary(u) => {
                let a = self.operand(ins[0], in_d(0));
                self.step(FusedStep::Unary(*u, a), out)
            }
            Op::Binary(b) => {
                let a = self.operand(ins[0], in_d(0));
                let c = self.operand(ins[1], in_d(1));
                self.step(FusedStep::Binary(*b, a, c), out)
            }
            _ => {
                let a = self.operand(ins[0], in_d(0));
                self.step(FusedStep::Cast(a), out)
            }
        }
    }
}

fn fuse_elementwise(graph: &Graph) -> Result<(Patch, usize, usize)> {
    let order = graph.topo_order()?;
    let outputs: HashSet<Value> = graph.outputs.iter().map(|(_, v)| *v).collect();
    let mut done: HashSet<NodeIndex> = HashSet::new();
    let mut patch = Patch::new();
    let (mut chains, mut ops) = (0, 0);
    // Roots last to first: a chain's root is a fusable node whose value some
    // non-chain reader (or a graph output, or several readers) needs.
    for &n in order.iter().rev() {
        if done.contains(&n) || !fusable(graph, n) {
            continue;
        }
        let mut b = ChainBuilder {
            graph,
            outputs: outputs.clone(),
            steps: Vec::new(),
            dtypes: Vec::new(),
            inputs: Vec::new(),
            absorbed: Vec::new(),
        };
        b.node(n);
        done.extend(b.absorbed.iter().copied());
        if b.absorbed.len() < 2 || b.inputs.is_empty() {
            continue;
        }
        let expr = FusedExpr {
            steps: b.steps,
            dtypes: b.dtypes,
        };
        let ins: Vec<Option<PatchValue>> = b
            .inputs
            .iter()
            .map(|&v| Some(PatchValue::Existing(v)))
            .collect();
        let node = graph.node(n);
        let fused = patch.add(
            node.name.clone(),
            Op::Fused(expr),
            &ins,
            vec![node.outputs[0].clone()],
        );
        patch.replace(Value::new(n, 0), fused);
        chains += 1;
        ops += b.absorbed.len();
    }
    Ok((patch, chains, ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_names() {
        assert_eq!(
            merged_name(&[
                "m.l.0.attn.q_proj",
                "m.l.0.attn.k_proj",
                "m.l.0.attn.v_proj"
            ]),
            "m.l.0.attn.q_proj+k_proj+v_proj"
        );
        assert_eq!(merged_name(&["a", "b"]), "a+b");
    }
}
