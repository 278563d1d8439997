//! The graph verifier: arity, ports, dangling edges, weights, types, cycles.

use super::{BinaryOp, DType, Graph, Op};
use crate::{Error, Result};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

/// Checks the graph's invariants; the first violation is the error.
pub fn verify(graph: &Graph) -> Result<()> {
    let fail = |msg: String| Err(Error::Verify(msg));
    for &i in &graph.inputs {
        match graph.g.node_weight(i) {
            Some(n) if matches!(n.op, Op::Input) => {}
            _ => return fail(format!("graph input {} is not an Input node", i.index())),
        }
    }
    for (name, v) in &graph.outputs {
        let ok = graph
            .g
            .node_weight(v.node)
            .is_some_and(|n| v.slot < n.outputs.len());
        if !ok {
            return fail(format!(
                "graph output '{name}' reads a value that does not exist"
            ));
        }
    }
    for n in graph.g.node_indices() {
        let node = graph.node(n);
        let who = || format!("node '{}' ({})", graph.display_name(n), node.op.name());
        let (min, max) = node.op.arity();
        if node.num_inputs > max {
            return fail(format!(
                "{}: has {} inputs, at most {max} allowed",
                who(),
                node.num_inputs
            ));
        }
        if let Op::Split { num_outputs, .. } = node.op {
            if node.outputs.len() != num_outputs {
                return fail(format!(
                    "{}: declares {num_outputs} outputs, has {}",
                    who(),
                    node.outputs.len()
                ));
            }
        } else if node.outputs.len() != node.op.num_outputs() {
            return fail(format!(
                "{}: has {} outputs, the op has {}",
                who(),
                node.outputs.len(),
                node.op.num_outputs()
            ));
        }
        let mut seen = vec![false; node.num_inputs];
        for e in graph.g.edges_directed(n, Direction::Incoming) {
            let w = e.weight();
            if w.dst_slot >= node.num_inputs {
                return fail(format!(
                    "{}: an edge enters port {}, past its {} inputs",
                    who(),
                    w.dst_slot,
                    node.num_inputs
                ));
            }
            if seen[w.dst_slot] {
                return fail(format!("{}: input port {} is fed twice", who(), w.dst_slot));
            }
            seen[w.dst_slot] = true;
            let src = graph.node(e.source());
            if w.src_slot >= src.outputs.len() {
                return fail(format!(
                    "{}: reads output {} of '{}', which has {} outputs",
                    who(),
                    w.src_slot,
                    graph.display_name(e.source()),
                    src.outputs.len()
                ));
            }
        }
        if let Some(missing) = seen.iter().take(min).position(|s| !s) {
            return fail(format!(
                "{}: required input {missing} is not connected",
                who()
            ));
        }
        if node.num_inputs < min {
            return fail(format!(
                "{}: has {} inputs, needs at least {min}",
                who(),
                node.num_inputs
            ));
        }
        if let Op::Weight { name } = &node.op {
            let Some(w) = graph.weights.get(name) else {
                return fail(format!("{}: weight '{name}' is not in the model", who()));
            };
            if let Some(ty) = &node.outputs[0].ty {
                let expect = super::TensorType::fixed(w.dtype, &w.shape);
                if *ty != expect {
                    return fail(format!("{}: typed {ty}, the weight is {expect}", who()));
                }
            }
        }
        // Type checks where both sides are known.
        let ins = graph.inputs_of(n);
        let ty = |i: usize| {
            ins.get(i)
                .copied()
                .flatten()
                .and_then(|v| graph.value_type(v))
        };
        match &node.op {
            Op::Binary(b) if !matches!(b, BinaryOp::Pow) => {
                if let (Some(a), Some(c)) = (ty(0), ty(1)) {
                    if a.dtype != c.dtype {
                        return fail(format!("{}: operand types differ: {a} and {c}", who()));
                    }
                }
            }
            Op::Where => {
                if let Some(c) = ty(0) {
                    if c.dtype != DType::Bool {
                        return fail(format!("{}: the condition is {c}, must be bool", who()));
                    }
                }
            }
            Op::Embedding => {
                if let Some(ids) = ty(1) {
                    if !ids.dtype.is_int() {
                        return fail(format!(
                            "{}: token ids are {ids}, must be an integer type",
                            who()
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    super::print::canonical_order(graph)?;
    // Shapes and types, re-inferred from the inputs and compared.
    super::infer::check(graph)
}
