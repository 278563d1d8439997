//! The canonical text form of a graph.
//!
//! Order: a depth-first post-order from the graph outputs (in declaration
//! order), visiting each node's operands in port order; then whatever no
//! output reaches, rooted in name order. The order depends only on the
//! graph's structure, not on the order in which nodes were inserted, so two
//! equal graphs built differently print the same text. Values are numbered
//! `%0, %1, …` in that order; graph inputs keep their names and weights are
//! written `@name`.
//!
//! ```text
//! graph {
//!   input %input_ids: i64[batch,seq]
//!   weight @model.embed_tokens.weight: f32[256,64]
//!   %0 = Embedding(@model.embed_tokens.weight, %input_ids) : f32[batch,seq,64]
//!   output logits = %0
//! }
//! ```

use super::{Graph, Op, Value};
use crate::{Error, Result};
use petgraph::stable_graph::NodeIndex;
use petgraph::visit::NodeIndexable;
use std::collections::HashMap;
use std::fmt::Write;

/// The canonical node order; fails on a cycle, naming a node on it.
pub fn canonical_order(graph: &Graph) -> Result<Vec<NodeIndex>> {
    const WHITE: u8 = 0;
    const GRAY: u8 = 1;
    const BLACK: u8 = 2;
    let mut color = vec![WHITE; graph.g.node_bound()];
    let mut order = Vec::with_capacity(graph.g.node_count());

    let visit = |root: NodeIndex, color: &mut Vec<u8>, order: &mut Vec<NodeIndex>| -> Result<()> {
        if color[root.index()] != WHITE {
            return Ok(());
        }
        // Explicit stack: (node, operands not yet visited, reversed).
        let mut stack: Vec<(NodeIndex, Vec<NodeIndex>)> = Vec::new();
        let operands = |n: NodeIndex| -> Vec<NodeIndex> {
            let mut ins: Vec<NodeIndex> = graph
                .inputs_of(n)
                .into_iter()
                .flatten()
                .map(|v| v.node)
                .collect();
            ins.reverse();
            ins
        };
        color[root.index()] = GRAY;
        stack.push((root, operands(root)));
        while let Some((n, pending)) = stack.last_mut() {
            let n = *n;
            if let Some(next) = pending.pop() {
                match color[next.index()] {
                    WHITE => {
                        color[next.index()] = GRAY;
                        let ops = operands(next);
                        stack.push((next, ops));
                    }
                    GRAY => {
                        return Err(Error::Verify(format!(
                            "the graph has a cycle through node '{}' ({})",
                            graph.display_name(next),
                            graph.node(next).op.name()
                        )));
                    }
                    _ => {}
                }
            } else {
                color[n.index()] = BLACK;
                order.push(n);
                stack.pop();
            }
        }
        Ok(())
    };

    for (_, v) in &graph.outputs {
        visit(v.node, &mut color, &mut order)?;
    }
    for &i in &graph.inputs {
        visit(i, &mut color, &mut order)?;
    }
    let mut rest: Vec<NodeIndex> = graph
        .g
        .node_indices()
        .filter(|n| color[n.index()] == WHITE)
        .collect();
    rest.sort_by(|a, b| {
        let (na, nb) = (graph.node(*a), graph.node(*b));
        (na.op.name(), &na.name, a.index()).cmp(&(nb.op.name(), &nb.name, b.index()))
    });
    for n in rest {
        visit(n, &mut color, &mut order)?;
    }
    Ok(order)
}

/// The canonical text. Fails only on a cycle.
pub fn print(graph: &Graph) -> Result<String> {
    let order = canonical_order(graph)?;
    let mut names: HashMap<Value, String> = HashMap::new();
    let mut next = 0usize;
    for &n in &order {
        let node = graph.node(n);
        match &node.op {
            Op::Input => {
                names.insert(Value::new(n, 0), format!("%{}", node.outputs[0].name));
            }
            Op::Weight { name } => {
                names.insert(Value::new(n, 0), format!("@{name}"));
            }
            _ => {
                for slot in 0..node.outputs.len() {
                    names.insert(Value::new(n, slot), format!("%{next}"));
                    next += 1;
                }
            }
        }
    }

    let mut out = String::from("graph {\n");
    for &i in &graph.inputs {
        let node = graph.node(i);
        let ty = node.outputs[0]
            .ty
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_else(|| "?".into());
        let _ = writeln!(out, "  input %{}: {ty}", node.outputs[0].name);
    }
    let mut weights: Vec<_> = graph.weights.iter().collect();
    weights.sort_by(|a, b| a.name.cmp(&b.name));
    for w in weights {
        let _ = writeln!(
            out,
            "  weight @{}: {}{}",
            w.name,
            super::TensorType::fixed(w.dtype, &w.shape),
            if w.trainable { " trainable" } else { "" }
        );
    }
    for &n in &order {
        let node = graph.node(n);
        if matches!(node.op, Op::Input | Op::Weight { .. }) {
            continue;
        }
        out.push_str("  ");
        let outs: Vec<&str> = (0..node.outputs.len())
            .map(|s| names[&Value::new(n, s)].as_str())
            .collect();
        out.push_str(&outs.join(", "));
        out.push_str(" = ");
        out.push_str(node.op.name());
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            out.push('{');
            for (i, (k, v)) in attrs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{k}={v}");
            }
            out.push('}');
        }
        out.push('(');
        let ins: Vec<String> = graph
            .inputs_of(n)
            .into_iter()
            .map(|v| match v {
                Some(v) => names
                    .get(&v)
                    .cloned()
                    .unwrap_or_else(|| "<dangling>".into()),
                None => "_".into(),
            })
            .collect();
        out.push_str(&ins.join(", "));
        out.push(')');
        let tys: Vec<String> = node
            .outputs
            .iter()
            .map(|o| {
                o.ty.as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "?".into())
            })
            .collect();
        let _ = write!(out, " : {}", tys.join(", "));
        out.push('\n');
    }
    for (name, v) in &graph.outputs {
        let ty = graph
            .value_type(*v)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "?".into());
        let _ = writeln!(
            out,
            "  output {name} = {} : {ty}",
            names.get(v).cloned().unwrap_or_else(|| "<dangling>".into())
        );
    }
    out.push_str("}\n");
    Ok(out)
}
