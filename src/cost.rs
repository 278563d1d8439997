//! The cost model: parameters (total and trainable, split as LongLoRA reports
//! them) and forward FLOPs by part, counted as the LongLoRA paper does.
//!
//! - A matrix product of `[m,k]·[k,n]` costs `2·m·k·n`.
//! - Projections are the attention's q, k, v and o Linear/LoraLinear nodes; a
//!   LoRA branch adds `2·T·in·r + 2·T·r·out` (T tokens) to them. The MLP is
//!   gate, up and down; `lm_head` is the final Linear to the vocabulary.
//! - Attention counts the scores `QKᵀ` and the weighted values `PV`:
//!   `2·2·B·H·L·L·D` for full attention (no causal halving, as the paper).
//!   Shifted sparse attention counts each group's `G×G` block instead, the
//!   last shorter group exactly; the shifted half of the heads likewise, with
//!   its groups where the pattern puts them (without `wrap` they start at
//!   G/2, so the first and last groups are halves).
//! - Elementwise ops, norms, RoPE and softmax are not counted (the paper's
//!   convention: they are a few percent of the total).
//!
//! Works on shape-only models: only types are read, never weight values.

use crate::ir::{AttentionAttrs, AttentionPattern, Dim, Graph, NodeIndex, Op, Value};
use crate::util::group_digits;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Cost {
    pub params: Params,
    pub flops_forward: Flops,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Params {
    pub total: u64,
    pub trainable: Trainable,
}

/// Trainable parameters by kind; a frozen weight counts in none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Trainable {
    pub lora: u64,
    pub embedding: u64,
    pub norm: u64,
    pub other: u64,
}

impl Trainable {
    pub fn total(&self) -> u64 {
        self.lora + self.embedding + self.norm + self.other
    }
}

/// Forward FLOPs by part. `total` also holds matrix products that belong to
/// no part (a Linear whose role the names do not tell).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Flops {
    pub projections: u128,
    pub mlp: u128,
    pub attention: u128,
    pub lm_head: u128,
    pub total: u128,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Projection,
    Mlp,
    LmHead,
    Other,
}

fn role_of(name: &str) -> Option<Role> {
    const PROJ: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
    const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
    if PROJ.iter().any(|p| name.contains(p)) {
        Some(Role::Projection)
    } else if MLP.iter().any(|p| name.contains(p)) {
        Some(Role::Mlp)
    } else if name.contains("lm_head") {
        Some(Role::LmHead)
    } else {
        None
    }
}

/// Sum of the squared sizes of consecutive groups of `group` tokens over
/// `len` tokens, the last one shorter when `group` does not divide `len`.
fn grouped_area(len: u128, group: u128) -> u128 {
    let (full, rest) = (len / group, len % group);
    full * group * group + rest * rest
}

/// Query-key pairs one head of each kind computes, summed over the heads.
fn attention_pairs(at: &AttentionAttrs, seq_len: u128) -> u128 {
    let heads = at.num_heads as u128;
    match &at.pattern {
        AttentionPattern::FullCausal => heads * seq_len * seq_len,
        AttentionPattern::ShiftedSparse { group, wrap } => {
            let g = (group.tokens(usize::try_from(seq_len).unwrap_or(usize::MAX)) as u128)
                .min(seq_len)
                .max(1);
            let shifted_heads = heads / 2;
            let plain = grouped_area(seq_len, g);
            let shifted = if *wrap {
                // Rolled by −G/2, grouped, rolled back: the same group sizes.
                plain
            } else {
                let half = (g / 2).min(seq_len);
                half * half + grouped_area(seq_len - half, g)
            };
            (heads - shifted_heads) * plain + shifted_heads * shifted
        }
    }
}

struct Counter<'a> {
    graph: &'a Graph,
    seq_len: u128,
    batch: u128,
}

impl Counter<'_> {
    fn fail(&self, n: NodeIndex, msg: impl fmt::Display) -> Error {
        Error::invalid(format!(
            "cost: node '{}' ({}): {msg}",
            self.graph.display_name(n),
            self.graph.node(n).op.name()
        ))
    }

    /// A fixed 2-D weight-like shape read from a value's type.
    fn matrix(&self, n: NodeIndex, v: Option<Value>, what: &str) -> Result<(u128, u128)> {
        let dims = v
            .and_then(|v| self.graph.value_type(v))
            .and_then(|t| t.shape.as_ref())
            .ok_or_else(|| self.fail(n, format!("the type of {what} is unknown")))?;
        match dims.as_slice() {
            [Dim::Fixed(a), Dim::Fixed(b)] => Ok((*a as u128, *b as u128)),
            other => Err(self.fail(
                n,
                format!("{what} must be a fixed 2-D matrix, its type has dims {other:?}"),
            )),
        }
    }

    /// Rows of an activation: every dim but the last, with symbolic dims read
    /// as the batch (`batch…`) or the sequence (anything else).
    fn tokens(&self, x: Option<Value>) -> u128 {
        let dims = x
            .and_then(|v| self.graph.value_type(v))
            .and_then(|t| t.shape.as_ref());
        match dims {
            Some(d) if !d.is_empty() => d[..d.len() - 1].iter().map(|d| self.dim_size(d)).product(),
            _ => self.batch * self.seq_len,
        }
    }

    /// A dim's size with its symbols bound as the batch (`batch…`) or the
    /// sequence (anything else); an unknown dim counts as the sequence.
    fn dim_size(&self, d: &Dim) -> u128 {
        let Some(e) = d.expr() else {
            return self.seq_len;
        };
        let bind = |s: &str| {
            if s.contains("batch") {
                self.batch
            } else {
                self.seq_len
            }
        };
        let bindings: std::collections::BTreeMap<String, usize> = e
            .symbols()
            .map(|s| {
                (
                    s.to_string(),
                    usize::try_from(bind(s)).unwrap_or(usize::MAX),
                )
            })
            .collect();
        e.eval(&bindings)
            .and_then(|v| u128::try_from(v).ok())
            .unwrap_or(self.seq_len)
    }

    /// The role of a Linear-like node: from its weight's name, else its own.
    fn role(&self, n: NodeIndex, weight: Option<Value>) -> Role {
        let wname = weight.and_then(|w| match &self.graph.node(w.node).op {
            Op::Weight { name } => Some(name.as_str()),
            _ => None,
        });
        wname
            .and_then(role_of)
            .or_else(|| role_of(&self.graph.node(n).name))
            .unwrap_or(Role::Other)
    }
}

/// Counts parameters and forward FLOPs for a batch of `batch` sequences of
/// `seq_len` tokens.
pub fn cost(graph: &Graph, seq_len: usize, batch: usize) -> Result<Cost> {
    if seq_len == 0 || batch == 0 {
        return Err(Error::invalid(format!(
            "cost: sequence length and batch must be at least 1 (got seq_len {seq_len}, batch {batch})"
        )));
    }
    let c = Counter {
        graph,
        seq_len: seq_len as u128,
        batch: batch as u128,
    };
    let mut flops = Flops::default();
    let mut lora_weights: HashSet<&str> = HashSet::new();
    let mut embedding_weights: HashSet<&str> = HashSet::new();
    let mut norm_weights: HashSet<&str> = HashSet::new();
    let weight_name = |v: Option<Value>| -> Option<&str> {
        match &graph.node(v?.node).op {
            Op::Weight { name } => Some(name.as_str()),
            _ => None,
        }
    };

    for n in graph.g.node_indices() {
        let node = graph.node(n);
        let ins = graph.inputs_of(n);
        let at = |i: usize| ins.get(i).copied().flatten();
        let (role, f) = match &node.op {
            Op::Linear => {
                let (out, inp) = c.matrix(n, at(1), "the weight (input 1)")?;
                (c.role(n, at(1)), 2 * c.tokens(at(0)) * inp * out)
            }
            Op::LoraLinear(_) => {
                let (out, inp) = c.matrix(n, at(1), "the weight (input 1)")?;
                let (rank, a_in) = c.matrix(n, at(2), "lora_A (input 2)")?;
                let (b_out, b_rank) = c.matrix(n, at(3), "lora_B (input 3)")?;
                if a_in != inp || b_out != out || b_rank != rank {
                    return Err(c.fail(
                        n,
                        format!(
                            "LoRA shapes do not fit: weight [{out},{inp}], lora_A [{rank},{a_in}], lora_B [{b_out},{b_rank}]"
                        ),
                    ));
                }
                lora_weights.extend(weight_name(at(2)));
                lora_weights.extend(weight_name(at(3)));
                let t = c.tokens(at(0));
                let f = 2 * t * inp * out + 2 * t * inp * rank + 2 * t * rank * out;
                (c.role(n, at(1)), f)
            }
            Op::MergedLinear(m) => {
                let (out, inp) = c.matrix(n, at(1), "the merged weight (input 1)")?;
                let t = c.tokens(at(0));
                let mut f = 2 * t * inp * out;
                for (part, ports) in m.parts.iter().zip(m.lora_ports()) {
                    if let (Some(l), Some((pa, pb))) = (&part.lora, ports) {
                        lora_weights.extend(weight_name(at(pa)));
                        lora_weights.extend(weight_name(at(pb)));
                        let r = l.rank as u128;
                        f += 2 * t * inp * r + 2 * t * r * part.out_features as u128;
                    }
                }
                (c.role(n, None), f)
            }
            // An ONNX MatMul by a weight stored [in, out].
            Op::MatMul if weight_name(at(1)).is_some() => {
                let (inp, out) = c.matrix(n, at(1), "the weight (input 1)")?;
                (c.role(n, at(1)), 2 * c.tokens(at(0)) * inp * out)
            }
            Op::Attention(attrs) => {
                let f =
                    2 * 2 * c.batch * attention_pairs(attrs, c.seq_len) * attrs.head_dim as u128;
                flops.attention += f;
                flops.total += f;
                continue;
            }
            Op::Embedding => {
                embedding_weights.extend(weight_name(at(0)));
                continue;
            }
            Op::RmsNorm { .. } | Op::RmsNormalization { .. } => {
                norm_weights.extend(weight_name(at(1)));
                continue;
            }
            // No FLOPs counted: elementwise and data-movement work, the
            // boundary, and training ops (the count is of the forward). Named
            // op by op so that a new LLaMA-level op does not compile until
            // it is counted or listed here.
            Op::Rope(_) | Op::SwiGlu | crate::boundary_ops!() | crate::training_ops!() => continue,
            Op::Fused(_) => continue,
            crate::onnx_elementwise_ops!()
            | crate::onnx_math_ops!()
            | crate::onnx_shape_ops!()
            | Op::RotaryEmbedding { .. }
            | Op::OnnxAttention(_) => continue,
        };
        match role {
            Role::Projection => flops.projections += f,
            Role::Mlp => flops.mlp += f,
            Role::LmHead => flops.lm_head += f,
            Role::Other => {}
        }
        flops.total += f;
    }

    let mut params = Params {
        total: graph.weights.num_params(),
        ..Params::default()
    };
    for w in graph.weights.iter().filter(|w| w.trainable) {
        let n = w.numel() as u64;
        let name = w.name.as_str();
        let t = &mut params.trainable;
        if lora_weights.contains(name) || name.contains("lora_A") || name.contains("lora_B") {
            t.lora += n;
        } else if embedding_weights.contains(name) || name.contains("embed_tokens") {
            t.embedding += n;
        } else if norm_weights.contains(name) || name.contains("norm") {
            t.norm += n;
        } else {
            t.other += n;
        }
    }
    Ok(Cost {
        params,
        flops_forward: flops,
    })
}

/// FLOPs with an SI prefix (`1.23 TFLOPs`).
fn si(flops: u128) -> String {
    let units = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    let x = flops as f64;
    for (scale, p) in units {
        if x >= scale {
            return format!("{:.2} {p}FLOPs", x / scale);
        }
    }
    format!("{flops} FLOPs")
}

fn percent(part: u128, whole: u128) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

/// The text table of `lcc inspect --cost`.
pub fn render(cost: &Cost) -> String {
    cost.to_string()
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.params;
        let t = &p.trainable;
        let trainable = t.total();
        writeln!(f, "parameters")?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, n: u64, of: u64| {
            writeln!(
                f,
                "  {name:<20} {:>17}  {:>6}",
                group_digits(n),
                percent(n.into(), of.into())
            )
        };
        row(f, "total", p.total, p.total)?;
        row(f, "trainable", trainable, p.total)?;
        row(f, "  lora", t.lora, p.total)?;
        row(f, "  embedding", t.embedding, p.total)?;
        row(f, "  norm", t.norm, p.total)?;
        row(f, "  other", t.other, p.total)?;
        let fl = &self.flops_forward;
        writeln!(f, "forward FLOPs")?;
        let frow = |f: &mut fmt::Formatter<'_>, name: &str, n: u128| {
            writeln!(
                f,
                "  {name:<20} {:>25}  {:>14}  {:>6}",
                crate::util::group_digits_u128(n),
                si(n),
                percent(n, fl.total)
            )
        };
        frow(f, "projections", fl.projections)?;
        frow(f, "mlp", fl.mlp)?;
        frow(f, "attention", fl.attention)?;
        frow(f, "lm_head", fl.lm_head)?;
        frow(f, "total", fl.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::GroupSize;

    fn attrs(pattern: AttentionPattern) -> AttentionAttrs {
        AttentionAttrs {
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 8,
            scale: 1.0,
            pattern,
        }
    }

    #[test]
    fn grouped_areas_count_the_last_group_exactly() {
        assert_eq!(grouped_area(16, 4), 64);
        assert_eq!(grouped_area(10, 4), 16 + 16 + 4);
        // Without wrap, the shifted heads see [0,2), [2,6), [6,10), [10,14), [14,16).
        let ss = attrs(AttentionPattern::ShiftedSparse {
            group: GroupSize::Tokens(4),
            wrap: false,
        });
        assert_eq!(attention_pairs(&ss, 16), 2 * 64 + 2 * (4 + 3 * 16 + 4));
        let wrapped = attrs(AttentionPattern::ShiftedSparse {
            group: GroupSize::Tokens(4),
            wrap: true,
        });
        assert_eq!(attention_pairs(&wrapped, 16), 4 * 64);
        assert_eq!(
            attention_pairs(&attrs(AttentionPattern::FullCausal), 16),
            4 * 256
        );
    }
}
