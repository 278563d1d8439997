//! The execution schedule: which nodes run, in which order, and when each
//! value can be freed.

use crate::ir::{Graph, NodeIndex, Op, Value};
use crate::Result;
use petgraph::visit::NodeIndexable;
use std::collections::HashMap;

/// `last_use` of a value that must survive the run (a graph output).
pub const LIVE_TO_END: usize = usize::MAX;

/// A run order with the liveness of every value in it.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The nodes to run: the canonical topological order
    /// ([`Graph::topo_order`]) restricted to the nodes some graph output
    /// depends on, plus every graph input (so that inputs are always
    /// validated, used or not).
    pub order: Vec<NodeIndex>,
    /// For each value produced in `order`, the step after which it is dead:
    /// the step of its last reader, its own producer's step when nothing
    /// reads it, or [`LIVE_TO_END`] for graph outputs.
    pub last_use: HashMap<Value, usize>,
    frees: Vec<Vec<Value>>,
}

impl Schedule {
    pub fn new(graph: &Graph) -> Result<Schedule> {
        Schedule::with_precomputed(graph, &std::collections::HashSet::new())
    }

    /// The schedule of a run in which the nodes of `precomputed` are already
    /// computed (at compile time): what only they read is not run.
    pub fn with_precomputed(
        graph: &Graph,
        precomputed: &std::collections::HashSet<NodeIndex>,
    ) -> Result<Schedule> {
        let full = graph.topo_order()?;
        let mut needed = vec![false; graph.g.node_bound()];
        let mut stack: Vec<NodeIndex> = graph.outputs.iter().map(|(_, v)| v.node).collect();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut needed[n.index()], true) || precomputed.contains(&n) {
                continue;
            }
            stack.extend(graph.inputs_of(n).into_iter().flatten().map(|v| v.node));
        }
        let order: Vec<NodeIndex> = full
            .into_iter()
            .filter(|n| needed[n.index()] || matches!(graph.node(*n).op, Op::Input))
            .collect();

        let mut last_use: HashMap<Value, usize> = HashMap::new();
        for (step, &n) in order.iter().enumerate() {
            for slot in 0..graph.node(n).outputs.len() {
                last_use.insert(Value::new(n, slot), step);
            }
            for v in graph.inputs_of(n).into_iter().flatten() {
                // Steps only grow, so the latest reader wins.
                last_use.insert(v, step);
            }
        }
        for (_, v) in &graph.outputs {
            last_use.insert(*v, LIVE_TO_END);
        }
        let mut frees = vec![Vec::new(); order.len()];
        for (&v, &step) in &last_use {
            if step != LIVE_TO_END {
                frees[step].push(v);
            }
        }
        for f in &mut frees {
            f.sort();
        }
        Ok(Schedule {
            order,
            last_use,
            frees,
        })
    }

    /// The values that are dead once step `step` has run.
    pub fn frees_at(&self, step: usize) -> &[Value] {
        self.frees.get(step).map(|v| &v[..]).unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, TensorType, UnaryOp};

    #[test]
    fn last_uses_and_dead_nodes() {
        let mut g = Graph::new();
        let ty = TensorType::fixed(DType::F32, &[2]);
        let x = g.add_input("x", ty.clone());
        let unused = g.add_input("unused", ty.clone());
        let a = g.add("a", Op::Unary(UnaryOp::Neg), &[x], None).unwrap();
        let b = g
            .add("b", Op::Binary(BinaryOp::Add), &[a, x], None)
            .unwrap();
        let c = g.add("c", Op::Unary(UnaryOp::Exp), &[b], None).unwrap();
        let _dead = g.add("dead", Op::Unary(UnaryOp::Exp), &[c], None).unwrap();
        g.outputs.push(("out".into(), c));
        g.outputs.push(("b_out".into(), b));
        let s = Schedule::new(&g).unwrap();
        let names: Vec<&str> = s.order.iter().map(|&n| g.node(n).name.as_str()).collect();
        assert_eq!(names, vec!["x", "a", "b", "c", "unused"]);
        let step = |name: &str| names.iter().position(|&n| n == name).unwrap();
        assert_eq!(s.last_use[&x], step("b"));
        assert_eq!(s.last_use[&a], step("b"));
        assert_eq!(s.last_use[&b], LIVE_TO_END);
        assert_eq!(s.last_use[&c], LIVE_TO_END);
        assert_eq!(s.last_use[&unused], step("unused"));
        assert_eq!(s.frees_at(step("b")), &[x, a]);
        assert!(s.frees_at(step("c")).is_empty());
        assert_eq!(s.frees_at(step("unused")), &[unused]);
    }
}
