//! The ops the `fuse` pass makes, and what they mean.
//!
//! - [`FusedExpr`] (`Op::Fused`): a chain of elementwise ops as one node
//!   holding a small expression DAG over its inputs. A backend evaluates it
//!   in one pass over memory (the CPU) or generates one kernel from it (CUDA).
//! - [`MergedLinear`] (`Op::MergedLinear`): projections of one input against
//!   the row-concatenation of their weights (`x·[W₁;W₂;…]ᵀ`, one GEMM),
//!   split into one output per projection, each with its own LoRA branch.
//!
//! Each has a reference meaning in plain ops: [`expand`] rewrites a fused
//! node back into the ops it replaced (`Unary`/`Binary`/`Cast`, `Linear`
//! and `Split`, the LoRA products), which is what ONNX export writes and
//! what the backends' tests compare against.

use super::{BinaryOp, DType, Graph, LoraAttrs, NodeIndex, Op, Output, Tensor, UnaryOp, Value};
use crate::{Error, Result};
use std::fmt::Write;

/// One step of a fused expression; operands index earlier steps.
#[derive(Clone, Debug, PartialEq)]
pub enum FusedStep {
    /// The node's input `i`.
    Input(usize),
    /// A float scalar, in the step's dtype.
    Scalar(f64),
    Unary(UnaryOp, usize),
    Binary(BinaryOp, usize, usize),
    /// A cast between float types.
    Cast(usize),
}

/// An elementwise expression DAG: `steps[i]` has dtype `dtypes[i]` (its
/// result is rounded to that dtype, as the unfused op would store it); the
/// last step is the node's output. Inputs broadcast numpy-style.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedExpr {
    pub steps: Vec<FusedStep>,
    pub dtypes: Vec<DType>,
}

/// The unary ops an expression may hold: every float one.
pub fn fusable_unary(op: UnaryOp) -> bool {
    !matches!(op, UnaryOp::Not)
}

/// The binary ops an expression may hold: float arithmetic.
pub fn fusable_binary(op: BinaryOp) -> bool {
    matches!(
        op,
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div
    )
}

impl FusedExpr {
    /// How many inputs the node reads (one past the largest input index).
    pub fn num_inputs(&self) -> usize {
        self.steps
            .iter()
            .filter_map(|s| match s {
                FusedStep::Input(i) => Some(i + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The output's dtype.
    pub fn dtype(&self) -> Option<DType> {
        self.dtypes.last().copied()
    }

    /// Checks that operands point backwards, that every input is read, and
    /// that every step is a float op of a fusable kind.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.steps.is_empty() || self.steps.len() != self.dtypes.len() {
            return Err(format!(
                "a fused expression needs one dtype per step ({} steps, {} dtypes)",
                self.steps.len(),
                self.dtypes.len()
            ));
        }
        let mut seen = vec![false; self.num_inputs()];
        for (i, (s, d)) in self.steps.iter().zip(&self.dtypes).enumerate() {
            if !d.is_float() {
                return Err(format!("step {i} has dtype {d}; fused steps are float"));
            }
            let back = |j: usize| {
                if j < i {
                    Ok(())
                } else {
                    Err(format!("step {i} reads step {j}, which is not before it"))
                }
            };
            match s {
                FusedStep::Input(k) => seen[*k] = true,
                FusedStep::Scalar(_) => {}
                FusedStep::Unary(op, a) => {
                    if !fusable_unary(*op) {
                        return Err(format!("step {i}: {op:?} cannot be fused"));
                    }
                    back(*a)?
                }
                FusedStep::Binary(op, a, b) => {
                    if !fusable_binary(*op) {
                        return Err(format!("step {i}: {op:?} cannot be fused"));
                    }
                    back(*a)?;
                    back(*b)?
                }
                FusedStep::Cast(a) => back(*a)?,
            }
        }
        if let Some(k) = seen.iter().position(|s| !s) {
            return Err(format!("input {k} is not read by any step"));
        }
        Ok(())
    }

    /// The expression as text, e.g. `add(mul(i0,i1),0.5)`; a step read
    /// twice is written out at each use.
    pub fn render(&self) -> String {
        fn go(e: &FusedExpr, i: usize, s: &mut String) {
            match &e.steps[i] {
                FusedStep::Input(k) => {
                    let _ = write!(s, "i{k}");
                }
                FusedStep::Scalar(x) => s.push_str(&super::tensor::format_float(*x)),
                FusedStep::Unary(op, a) => {
                    let _ = write!(s, "{}(", format!("{op:?}").to_lowercase());
                    go(e, *a, s);
                    s.push(')');
                }
                FusedStep::Binary(op, a, b) => {
                    let _ = write!(s, "{}(", format!("{op:?}").to_lowercase());
                    go(e, *a, s);
                    s.push(',');
                    go(e, *b, s);
                    s.push(')');
                }
                FusedStep::Cast(a) => {
                    let _ = write!(s, "cast<{}>(", e.dtypes[i]);
                    go(e, *a, s);
                    s.push(')');
                }
            }
        }
        let mut s = String::new();
        if !self.steps.is_empty() {
            go(self, self.steps.len() - 1, &mut s);
        }
        s
    }
}

/// One projection of a [`MergedLinear`]: its output features, and its LoRA
/// branch if it has one.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedPart {
    pub out_features: usize,
    pub lora: Option<LoraAttrs>,
}

/// Projections of one input merged into one GEMM. Inputs: x `[..., in]`,
/// the row-concatenated weight `[Σ out, in]`, then `lora_A`, `lora_B` of
/// each part with a LoRA branch, in part order. Output `i` is part `i`'s
/// projection `[..., out_i]`: `x·W_iᵀ (+ scale·(x·A_iᵀ)·B_iᵀ)`.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedLinear {
    pub parts: Vec<MergedPart>,
}

impl MergedLinear {
    pub fn num_inputs(&self) -> usize {
        2 + 2 * self.parts.iter().filter(|p| p.lora.is_some()).count()
    }

    /// Each part's first row in the concatenated weight.
    pub fn offsets(&self) -> Vec<usize> {
        let mut at = 0;
        self.parts
            .iter()
            .map(|p| {
                let o = at;
                at += p.out_features;
                o
            })
            .collect()
    }

    pub fn total_out(&self) -> usize {
        self.parts.iter().map(|p| p.out_features).sum()
    }

    /// For each part, the input ports of its `lora_A` and `lora_B`.
    pub fn lora_ports(&self) -> Vec<Option<(usize, usize)>> {
        let mut port = 2;
        self.parts
            .iter()
            .map(|p| {
                p.lora.as_ref().map(|_| {
                    port += 2;
                    (port - 2, port - 1)
                })
            })
            .collect()
    }
}

/// Rewrites the fused node `n` into the plain ops it stands for (its
/// reference meaning); every reader of its outputs reads their replacements.
pub fn expand(graph: &mut Graph, n: NodeIndex) -> Result<()> {
    let node = graph.node(n).clone();
    let ins = graph.inputs_of(n);
    let input = |i: usize| -> Result<Value> {
        ins.get(i).copied().flatten().ok_or_else(|| {
            Error::Verify(format!(
                "node '{}' ({}): input {i} is missing",
                node.name,
                node.op.name()
            ))
        })
    };
    let mut outs: Vec<Value> = Vec::new();
    match &node.op {
        Op::Fused(e) => {
            let mut vals: Vec<Value> = Vec::with_capacity(e.steps.len());
            for (i, (s, &d)) in e.steps.iter().zip(&e.dtypes).enumerate() {
                let name = format!("{}.{i}", node.name);
                let v = match s {
                    FusedStep::Input(k) => input(*k)?,
                    FusedStep::Scalar(x) => graph.add(
                        name,
                        Op::Constant {
                            value: Tensor::scalar_of(d, *x),
                        },
                        &[],
                        None,
                    )?,
                    FusedStep::Unary(op, a) => {
                        graph.add(name, Op::Unary(*op), &[vals[*a]], None)?
                    }
                    FusedStep::Binary(op, a, b) => {
                        graph.add(name, Op::Binary(*op), &[vals[*a], vals[*b]], None)?
                    }
                    FusedStep::Cast(a) => graph.add(name, Op::Cast { to: d }, &[vals[*a]], None)?,
                };
                vals.push(v);
            }
            outs.push(*vals.last().ok_or_else(|| {
                Error::Verify(format!("fused node '{}' has no steps", node.name))
            })?);
        }
        Op::MergedLinear(m) => {
            let x = input(0)?;
            let w = input(1)?;
            let cat = graph.add(format!("{}.merged", node.name), Op::Linear, &[x, w], None)?;
            let parts = m.parts.len();
            let split = graph.add_node(
                format!("{}.split", node.name),
                Op::Split {
                    axis: -1,
                    split: Some(m.parts.iter().map(|p| p.out_features as i64).collect()),
                    num_outputs: parts,
                },
                &[Some(cat)],
                (0..parts)
                    .map(|i| Output {
                        name: format!("{}.split.{i}", node.name),
                        ty: None,
                    })
                    .collect(),
            )?;
            for (i, (part, ports)) in m.parts.iter().zip(m.lora_ports()).enumerate() {
                let base = Value::new(split, i);
                let out = match (&part.lora, ports) {
                    (Some(l), Some((pa, pb))) => {
                        let p = format!("{}.{i}.lora", node.name);
                        let t = graph.add(format!("{p}.a"), Op::Linear, &[x, input(pa)?], None)?;
                        let u = graph.add(format!("{p}.b"), Op::Linear, &[t, input(pb)?], None)?;
                        let dt = graph.value_type(u).map(|t| t.dtype).unwrap_or(DType::F32);
                        let s = graph.add(
                            format!("{p}.scale"),
                            Op::Constant {
                                value: Tensor::scalar_of(dt, l.scale() as f64),
                            },
                            &[],
                            None,
                        )?;
                        let su = graph.add(
                            format!("{p}.mul"),
                            Op::Binary(BinaryOp::Mul),
                            &[u, s],
                            None,
                        )?;
                        graph.add(
                            format!("{p}.add"),
                            Op::Binary(BinaryOp::Add),
                            &[base, su],
                            None,
                        )?
                    }
                    _ => base,
                };
                outs.push(out);
            }
        }
        other => {
            return Err(Error::invalid(format!(
                "node '{}' ({}) is not a fused op",
                node.name,
                other.name()
            )))
        }
    }
    for (slot, new) in outs.into_iter().enumerate() {
        graph.replace_uses(Value::new(n, slot), new);
    }
    graph.remove_dead();
    Ok(())
}

/// Expands every fused node of the graph (see [`expand`]); returns how many.
pub fn expand_all(graph: &mut Graph) -> Result<usize> {
    let fused: Vec<NodeIndex> = graph
        .g
        .node_indices()
        .filter(|&n| graph.node(n).op.is_fused())
        .collect();
    for &n in &fused {
        expand(graph, n)?;
    }
    if !fused.is_empty() {
        graph.infer_types()?;
    }
    Ok(fused.len())
}
