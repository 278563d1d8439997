//! `raise`: finds LLaMA structure in a primitive ONNX graph (a torch export)
//! by graph pattern, not by names, and replaces it with LLaMA-level ops.
//!
//! The pass walks the residual stream from the embedding `Gather`: each
//! decoder layer is two residual blocks (attention, MLP), each matched from
//! its input by early-return helpers, then the final norm and `lm_head`.
//! Every matched block becomes one patch that reads the block's input and
//! replaces the residual `Add`; the primitive debris (shape arithmetic, mask
//! logic, cos/sin tables, reshapes and transposes) is then dead and dropped.
//!
//! ```text
//! before (TorchScript opset 17, one attention block, abridged):
//!   %4 = Pow(%1, 2.0)   %5 = ReduceMean{axes=[-1]}(%4)   %7 = Add(%5, 1e-5)
//!   %8 = Sqrt(%7)   %9 = Div(1.0, %8)   %10 = Mul(%1, %9)
//!   %12 = Mul(@model.model.layers.0.input_layernorm.weight, %10)
//!   %13 = MatMul(%12, @onnx::MatMul_607)    # q, weight stored [in, out]
//!   %28 = Transpose{perm=[0,2,1,3]}(Reshape(%13, …))
//!   %44 = Cos(Concat(Mul(positions, inv_freq), …))  … x·cos + rotate_half(x)·sin
//!   %162 = Mul(MatMul(q, Transpose(repeat_kv(k))), 0.25)
//!   %194 = Softmax{axis=-1}(Add(%162, Where(causal, 0, -3.4e38)))
//!   %261 = MatMul(Reshape(Transpose(MatMul(%194, repeat_kv(v)))), @onnx::MatMul_631)
//!   %262 = Add(%1, %261)
//! after:
//!   %1 = RmsNorm{eps=1e-5}(%0, @model.layers.0.input_layernorm.weight)
//!   %2 = Linear(%1, @model.layers.0.self_attn.q_proj.weight)      # [out, in]
//!   %3 = Rope{heads=4, head_dim=16, theta=10000.0}(%2)
//!   %4 = Linear(%1, @model.layers.0.self_attn.k_proj.weight)
//!   %5 = Rope{heads=2, head_dim=16, theta=10000.0}(%4)
//!   %6 = Linear(%1, @model.layers.0.self_attn.v_proj.weight)
//!   %7 = Attention{heads=4, kv_heads=2, head_dim=16, scale=0.25, pattern=full_causal}(%3, %5, %6)
//!   %8 = Linear(%7, @model.layers.0.self_attn.o_proj.weight)
//!   %9 = Add(%0, %8)
//! ```
//!
//! The MLP block `Mul(Mul(g, Sigmoid(g)), u)` with `g`, `u` MatMuls becomes
//! `Linear(SwiGlu(Linear(x, gate_proj), Linear(x, up_proj)), down_proj)`;
//! the opset-23 fused ops (`RMSNormalization`, `RotaryEmbedding`,
//! `Attention`) are matched the same way. Weights get Hugging Face names from
//! their role and layer index; Linear weights stored `[in, out]` are
//! transposed into a new `[out, in]` weight (a copy). The reconstructed
//! config goes into the `hf.config` property so the graph can be saved as a
//! Hugging Face dir. What does not match stays primitive, with a note.

use super::{Pass, Report};
use crate::ir::{
    AttentionAttrs, AttentionPattern, BinaryOp, DType, Dim, Graph, Op, Output, Patch, PatchValue,
    RopeAttrs, RopeScaling, StructuralConfig, Tensor, TensorType, UnaryOp, Value, Weight,
    WeightData,
};
use crate::{Error, Result};
use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use serde::Deserialize;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Fail, naming the layer and the part, when any block stays primitive
    /// (the raise that runs on demand before a LLaMA-level pass is strict).
    pub strict: bool,
}

pub struct Raise {
    options: Options,
}

impl Raise {
    pub fn new(options: Options) -> Self {
        Raise { options }
    }
}

/// The part of a block a matcher's complaint is about, for error messages.
fn part_of(why: &str) -> &'static str {
    if why.contains("RMSNorm") {
        "norm"
    } else if why.contains("RoPE") || why.contains("inv_freq") {
        "RoPE"
    } else {
        "attention"
    }
}

// --- small graph readers (all early-return) ---------------------------------

fn op(g: &Graph, v: Value) -> &Op {
    &g.node(v.node).op
}

fn input(g: &Graph, n: NodeIndex, port: usize) -> Option<Value> {
    g.inputs_of(n).get(port).copied().flatten()
}

fn out(n: NodeIndex) -> Value {
    Value::new(n, 0)
}

/// Skips float-to-float casts (the exports cast f32 to f32 around norms).
fn strip_casts(g: &Graph, mut v: Value) -> Value {
    while let Op::Cast { to } = op(g, v) {
        if !to.is_float() {
            break;
        }
        match input(g, v.node, 0) {
            Some(src) => v = src,
            None => break,
        }
    }
    v
}

/// Readers of `v`, also through float casts.
fn users(g: &Graph, v: Value) -> Vec<(NodeIndex, usize)> {
    let mut found = Vec::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        for (n, port) in g.uses_of(v) {
            match &g.node(n).op {
                Op::Cast { to } if to.is_float() => stack.push(out(n)),
                _ => found.push((n, port)),
            }
        }
    }
    found
}

/// The single reader of `v` (through casts), if there is exactly one.
fn only_user(g: &Graph, v: Value) -> Option<NodeIndex> {
    match users(g, v).as_slice() {
        [(n, _)] => Some(*n),
        _ => None,
    }
}

/// The value of a constant or a weight, if it has one.
fn const_tensor(g: &Graph, v: Value) -> Option<Tensor> {
    match op(g, strip_casts(g, v)) {
        Op::Constant { value } => Some(value.clone()),
        Op::Weight { name } => g.weights.get(name)?.to_tensor().ok(),
        _ => None,
    }
}

fn scalar(g: &Graph, v: Value) -> Option<f64> {
    let t = const_tensor(g, v)?;
    (t.numel() == 1).then(|| t.to_f64_vec()[0])
}

fn weight_name(g: &Graph, v: Value) -> Option<String> {
    match op(g, v) {
        Op::Weight { name } => Some(name.clone()),
        _ => None,
    }
}

/// For a binary node reading `v` on one port: the value on the other port.
fn other_input(g: &Graph, n: NodeIndex, v: Value) -> Option<Value> {
    let a = input(g, n, 0)?;
    let b = input(g, n, 1)?;
    if strip_casts(g, a) == v {
        Some(b)
    } else if strip_casts(g, b) == v {
        Some(a)
    } else {
        None
    }
}

fn is_binary(g: &Graph, n: NodeIndex, b: BinaryOp) -> bool {
    g.node(n).op == Op::Binary(b)
}

/// Every node `v` depends on, not crossing `stop` nodes (which are included).
fn backward_closure(g: &Graph, v: Value, stop: &HashSet<NodeIndex>) -> HashSet<NodeIndex> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([v.node]);
    while let Some(n) = queue.pop_front() {
        if !seen.insert(n) || stop.contains(&n) {
            continue;
        }
        queue.extend(g.g.neighbors_directed(n, Direction::Incoming));
    }
    seen
}

/// The first node reachable forward from `v` (breadth first) that satisfies `pred`.
fn find_forward(g: &Graph, v: Value, pred: impl Fn(&Op) -> bool) -> Option<NodeIndex> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([v.node]);
    while let Some(n) = queue.pop_front() {
        if !seen.insert(n) {
            continue;
        }
        if n != v.node && pred(&g.node(n).op) {
            return Some(n);
        }
        if seen.len() > 4096 {
            return None;
        }
        queue.extend(g.g.neighbors_directed(n, Direction::Outgoing));
    }
    None
}

// --- matched structure -------------------------------------------------------

/// A projection: `MatMul(x, W)` with W `[in, out]`, or `MatMul(x, Transpose(W))`.
#[derive(Clone, Debug)]
struct Projection {
    matmul: NodeIndex,
    weight: String,
    /// True when the stored weight is `[in, out]` and must be transposed.
    stored_in_out: bool,
    out_features: usize,
}

#[derive(Clone, Debug)]
struct Norm {
    out: Value,
    weight: String,
    eps: f32,
}

#[derive(Clone, Debug)]
struct AttentionBlock {
    input: Value,
    output: Value,
    norm: Norm,
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    rope: RopeAttrs,
}

#[derive(Clone, Debug)]
struct MlpBlock {
    input: Value,
    output: Value,
    norm: Norm,
    gate: Projection,
    up: Projection,
    down: Projection,
}

#[derive(Clone, Debug)]
struct Head {
    input: Value,
    output: Value,
    norm: Norm,
    lm_head: Projection,
}

#[derive(Clone, Debug)]
struct Embed {
    gather: Value,
    ids: Value,
    weight: String,
}

// --- matchers ----------------------------------------------------------------

fn match_embedding(g: &Graph) -> Option<Embed> {
    let ids = out(*g.inputs.first()?);
    users(g, ids).into_iter().find_map(|(n, port)| {
        let Op::Gather { axis: 0 } = g.node(n).op else {
            return None;
        };
        if port != 1 {
            return None;
        }
        let weight = weight_name(g, input(g, n, 0)?)?;
        let w = g.weights.get(&weight)?;
        if w.shape.len() != 2 || !w.dtype.is_float() {
            return None;
        }
        Some(Embed {
            gather: out(n),
            ids,
            weight,
        })
    })
}

/// `Mul(weight, Mul(x, 1/Sqrt(Add(ReduceMean(Pow(x, 2)), eps))))` or
/// `RMSNormalization(x, weight)`, reading `x` (through casts).
fn match_norm(g: &Graph, x: Value) -> Option<Norm> {
    for (n, port) in users(g, x) {
        if port != 0 {
            continue;
        }
        if let Op::RmsNormalization {
            axis: -1, epsilon, ..
        } = g.node(n).op
        {
            let weight = weight_name(g, input(g, n, 1)?)?;
            return Some(Norm {
                out: out(n),
                weight,
                eps: epsilon,
            });
        }
        if let Some(norm) = match_norm_primitive(g, x, n) {
            return Some(norm);
        }
    }
    None
}

fn match_norm_primitive(g: &Graph, x: Value, pow: NodeIndex) -> Option<Norm> {
    if !is_binary(g, pow, BinaryOp::Pow) || scalar(g, input(g, pow, 1)?)? != 2.0 {
        return None;
    }
    let mean = only_user(g, out(pow))?;
    let Op::Reduce {
        op: crate::ir::ReduceOp::Mean,
        axes,
        keepdims: true,
        ..
    } = &g.node(mean).op
    else {
        return None;
    };
    let last_axis = match axes {
        Some(a) => a.as_slice() == [-1],
        None => input(g, mean, 1)
            .and_then(|v| const_tensor(g, v))
            .is_some_and(|t| t.to_i64_vec() == [-1]),
    };
    if !last_axis {
        return None;
    }
    let add = only_user(g, out(mean))?;
    if !is_binary(g, add, BinaryOp::Add) {
        return None;
    }
    let eps = scalar(g, other_input(g, add, out(mean))?)? as f32;
    let sqrt = only_user(g, out(add))?;
    if g.node(sqrt).op != Op::Unary(UnaryOp::Sqrt) {
        return None;
    }
    let inv = only_user(g, out(sqrt))?;
    let reciprocal = match g.node(inv).op {
        Op::Unary(UnaryOp::Reciprocal) => true,
        Op::Binary(BinaryOp::Div) => {
            strip_casts(g, input(g, inv, 1)?) == out(sqrt) && scalar(g, input(g, inv, 0)?)? == 1.0
        }
        _ => false,
    };
    if !reciprocal {
        return None;
    }
    let scaled = only_user(g, out(inv))?;
    if !is_binary(g, scaled, BinaryOp::Mul)
        || strip_casts(g, other_input(g, scaled, out(inv))?) != x
    {
        return None;
    }
    let times_w = only_user(g, out(scaled))?;
    if !is_binary(g, times_w, BinaryOp::Mul) {
        return None;
    }
    let a = input(g, times_w, 0)?;
    let b = input(g, times_w, 1)?;
    let weight = weight_name(g, a).or_else(|| weight_name(g, b))?;
    Some(Norm {
        out: out(times_w),
        weight,
        eps,
    })
}

/// Projections reading `x`: `MatMul(x, W)` with a 2-D weight.
fn match_projections(g: &Graph, x: Value) -> Vec<Projection> {
    let mut found = Vec::new();
    for (n, port) in users(g, x) {
        if port != 0 || g.node(n).op != Op::MatMul {
            continue;
        }
        let Some(w) = input(g, n, 1) else { continue };
        let (name, stored_in_out) = match op(g, w) {
            Op::Weight { name } => (name.clone(), true),
            Op::Transpose { perm } if perm.as_deref().is_none_or(|p| p == [1, 0]) => {
                match input(g, w.node, 0).and_then(|src| weight_name(g, src)) {
                    Some(name) => (name, false),
                    None => continue,
                }
            }
            _ => continue,
        };
        let Some(weight) = g.weights.get(&name) else {
            continue;
        };
        if weight.shape.len() != 2 || !weight.dtype.is_float() {
            continue;
        }
        let out_features = if stored_in_out {
            weight.shape[1]
        } else {
            weight.shape[0]
        };
        found.push(Projection {
            matmul: n,
            weight: name,
            stored_in_out,
            out_features,
        });
    }
    found.sort_by_key(|p| p.matmul);
    found
}

/// The residual `Add(x, branch)` reading `branch`.
fn match_residual(g: &Graph, x: Value, branch: Value) -> Option<Value> {
    let add = only_user(g, branch)?;
    if !is_binary(g, add, BinaryOp::Add) {
        return None;
    }
    let other = other_input(g, add, branch)?;
    (strip_casts(g, other) == x).then(|| out(add))
}

/// A mask built by comparing positions (Range/LessOrEqual/Where, the dynamo
/// exporter's CumSum/GatherND packed-sequence logic) or by Trilu: it depends
/// only on the input ids' shape and compares or triangulates. Whether it is
/// exactly causal is not proven; padding masks would read an attention_mask
/// input, which these graphs do not have.
fn is_causal_mask(g: &Graph, mask: Value) -> bool {
    let closure = backward_closure(g, mask, &HashSet::new());
    let compares = closure.iter().any(|&n| {
        matches!(
            g.node(n).op,
            Op::Trilu { .. }
                | Op::Binary(
                    BinaryOp::LessOrEqual
                        | BinaryOp::Less
                        | BinaryOp::Greater
                        | BinaryOp::GreaterOrEqual
                )
        )
    });
    // A mask may read the embedding's shape, never a projection's values.
    let reads_activations = closure
        .iter()
        .any(|&n| matches!(g.node(n).op, Op::MatMul | Op::Softmax { .. }));
    compares && !reads_activations
}

/// The projection among `projs` that `v` depends on, if exactly one.
fn source_projection<'p>(
    g: &Graph,
    v: Value,
    projs: &'p [Projection],
    stop: &HashSet<NodeIndex>,
) -> Option<&'p Projection> {
    let closure = backward_closure(g, v, stop);
    let mut hits = projs.iter().filter(|p| closure.contains(&p.matmul));
    let first = hits.next()?;
    hits.next().is_none().then_some(first)
}

/// inv_freq from the cos table: a float constant of decreasing positive values.
fn match_inv_freq(g: &Graph, v: Value, stop: &HashSet<NodeIndex>) -> Option<Vec<f64>> {
    let closure = backward_closure(g, v, stop);
    let mut cos: Vec<NodeIndex> = closure
        .iter()
        .copied()
        .filter(|&n| g.node(n).op == Op::Unary(UnaryOp::Cos))
        .collect();
    cos.sort();
    let cos = *cos.first()?;
    let mut nodes: Vec<NodeIndex> = backward_closure(g, out(cos), &HashSet::new())
        .into_iter()
        .collect();
    nodes.sort();
    nodes.into_iter().find_map(|n| {
        if !matches!(g.node(n).op, Op::Constant { .. } | Op::Weight { .. }) {
            return None;
        }
        let t = const_tensor(g, out(n))?;
        if !t.dtype.is_float() || t.numel() < 2 {
            return None;
        }
        let f = t.to_f64_vec();
        let decreasing = f.windows(2).all(|w| w[1] < w[0]) && f.iter().all(|&x| x > 0.0);
        (decreasing && f[0] <= 1.0 + 1e-6).then_some(f)
    })
}

/// Rounds to 6 significant digits (theta and factors are round numbers; the
/// inverse frequencies carry f32 noise).
fn round_sig(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let mag = 10f64.powi(5 - x.abs().log10().floor() as i32);
    (x * mag).round() / mag
}

/// Theta and linear scaling from inv_freq[i] = theta^(-2i/d) / factor (`inv` has at least 2 values).
fn rope_from_inv_freq(inv: &[f64], heads: usize, head_dim: usize) -> Option<RopeAttrs> {
    let rotary_dim = 2 * inv.len();
    // The widest ratio keeps the f32 noise from being raised to a high power.
    let last = inv.len() - 1;
    let ratio = inv[last] / inv[0];
    let theta = round_sig(ratio.powf(-(rotary_dim as f64) / (2.0 * last as f64)));
    let factor = round_sig(1.0 / inv[0]);
    let scaling = if (factor - 1.0).abs() < 1e-6 {
        RopeScaling::None
    } else {
        RopeScaling::Linear { factor }
    };
    // Every frequency must follow the formula, else this is another scaling.
    let ok = inv.iter().enumerate().all(|(i, &x)| {
        let want = theta.powf(-(2.0 * i as f64) / rotary_dim as f64) / factor;
        (x - want).abs() <= 1e-5 * want.max(1e-30) + 1e-9
    });
    ok.then_some(RopeAttrs {
        num_heads: heads,
        head_dim,
        rotary_dim,
        theta,
        scaling,
    })
}

fn match_attention_block(g: &Graph, x: Value) -> std::result::Result<AttentionBlock, String> {
    let norm = match_norm(g, x).ok_or("no RMSNorm reads the residual stream")?;
    let projs = match_projections(g, norm.out);
    if projs.len() != 3 {
        return Err(format!(
            "expected 3 projections (q, k, v) after the norm, found {}",
            projs.len()
        ));
    }
    let core = find_forward(g, out(projs[0].matmul), |o| {
        matches!(o, Op::Softmax { axis: -1 } | Op::OnnxAttention(_))
    })
    .ok_or("no Softmax or Attention after the projections")?;
    let mut stop: HashSet<NodeIndex> = projs.iter().map(|p| p.matmul).collect();
    stop.insert(norm.out.node);
    let (q_in, k_in, v_in, core_out, scale, mask) = match &g.node(core).op {
        Op::OnnxAttention(a) => {
            let q_in = input(g, core, 0).ok_or("Attention without q")?;
            let k_in = input(g, core, 1).ok_or("Attention without k")?;
            let v_in = input(g, core, 2).ok_or("Attention without v")?;
            if a.softcap != 0.0 || a.num_outputs != 1 {
                return Err("Attention with softcap or present outputs".into());
            }
            (
                q_in,
                k_in,
                v_in,
                out(core),
                a.scale.map(f64::from),
                a.is_causal || input(g, core, 3).is_some_and(|m| is_causal_mask(g, m)),
            )
        }
        _ => {
            // Softmax(Add(Mul-or-Div(MatMul(q, kᵀ), c), mask)) then MatMul(·, v).
            let pv = only_user(g, out(core)).ok_or("Softmax read more than once")?;
            if g.node(pv).op != Op::MatMul {
                return Err("Softmax not followed by MatMul(·, v)".into());
            }
            let v_in = input(g, pv, 1).ok_or("MatMul without v")?;
            let mut scale = 1.0f64;
            let mut mask = false;
            let mut cur = input(g, core, 0).ok_or("Softmax without input")?;
            let qk = loop {
                cur = strip_casts(g, cur);
                let n = cur.node;
                match &g.node(n).op {
                    Op::MatMul => break n,
                    Op::Binary(BinaryOp::Add) => {
                        let (a, b) = (input(g, n, 0).ok_or("Add")?, input(g, n, 1).ok_or("Add")?);
                        let a_qk = !backward_closure(g, a, &stop).is_disjoint(&stop);
                        let b_qk = !backward_closure(g, b, &stop).is_disjoint(&stop);
                        if a_qk == b_qk {
                            return Err("scores Add without a mask operand".into());
                        }
                        let (scores, m) = if a_qk { (a, b) } else { (b, a) };
                        mask |= is_causal_mask(g, m);
                        cur = scores;
                    }
                    Op::Binary(op @ (BinaryOp::Mul | BinaryOp::Div)) => {
                        let (a, b) = (input(g, n, 0).ok_or("Mul")?, input(g, n, 1).ok_or("Mul")?);
                        let (c, rest) = match (scalar(g, a), scalar(g, b)) {
                            (_, Some(c)) => (c, a),
                            (Some(c), None) if *op == BinaryOp::Mul => (c, b),
                            _ => return Err("scores scaled by a non-constant".into()),
                        };
                        scale = if *op == BinaryOp::Mul {
                            scale * c
                        } else {
                            scale / c
                        };
                        cur = rest;
                    }
                    other => return Err(format!("unexpected {} before Softmax", other.name())),
                }
            };
            let q_in = input(g, qk, 0).ok_or("MatMul without q")?;
            let k_in = input(g, qk, 1).ok_or("MatMul without k")?;
            (q_in, k_in, v_in, out(pv), Some(scale), mask)
        }
    };
    if !mask {
        return Err("attention without a causal mask".into());
    }
    let q = source_projection(g, q_in, &projs, &stop).ok_or("q reads no single projection")?;
    let k = source_projection(g, k_in, &projs, &stop).ok_or("k reads no single projection")?;
    let v = source_projection(g, v_in, &projs, &stop).ok_or("v reads no single projection")?;
    if q.matmul == k.matmul || k.matmul == v.matmul || q.matmul == v.matmul {
        return Err("q, k, v do not read three different projections".into());
    }
    let inv = match_inv_freq(g, q_in, &stop).ok_or("no RoPE (cos table with inv_freq) on q")?;
    match_inv_freq(g, k_in, &stop).ok_or("no RoPE on k")?;
    let head_dim = 2 * inv.len();
    if q.out_features % head_dim != 0 || k.out_features % head_dim != 0 {
        return Err(format!(
            "projection widths {} / {} are not multiples of head_dim {head_dim}",
            q.out_features, k.out_features
        ));
    }
    let heads = q.out_features / head_dim;
    let kv_heads = k.out_features / head_dim;
    let rope = rope_from_inv_freq(&inv, heads, head_dim)
        .ok_or("inv_freq follows neither the default nor the linear RoPE formula")?;
    let scale = scale.unwrap_or((head_dim as f64).powf(-0.5)) as f32;
    // o_proj: the first projection-shaped MatMul after the attention core.
    let o_node = find_forward(g, core_out, |o| *o == Op::MatMul).ok_or("no o_proj")?;
    let o_in = input(g, o_node, 0).ok_or("o_proj without input")?;
    let o = match_projections(g, o_in)
        .into_iter()
        .find(|p| p.matmul == o_node)
        .ok_or("o_proj MatMul has no weight")?;
    let output = match_residual(g, x, out(o.matmul)).ok_or("no residual Add after o_proj")?;
    Ok(AttentionBlock {
        input: x,
        output,
        norm,
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        o,
        heads,
        kv_heads,
        head_dim,
        scale,
        rope,
    })
}

fn match_mlp_block(g: &Graph, x: Value) -> std::result::Result<MlpBlock, String> {
    let norm = match_norm(g, x).ok_or("no RMSNorm reads the residual stream")?;
    let projs = match_projections(g, norm.out);
    if projs.len() != 2 {
        return Err(format!(
            "expected 2 projections (gate, up) after the norm, found {}",
            projs.len()
        ));
    }
    // silu(g) = Mul(g, Sigmoid(g)); then Mul(silu, up).
    let is_gate = |p: &Projection| {
        users(g, out(p.matmul))
            .iter()
            .any(|(n, _)| g.node(*n).op == Op::Unary(UnaryOp::Sigmoid))
    };
    let (gate, up) = match (is_gate(&projs[0]), is_gate(&projs[1])) {
        (true, false) => (&projs[0], &projs[1]),
        (false, true) => (&projs[1], &projs[0]),
        _ => return Err("no single gate projection feeding a Sigmoid".into()),
    };
    let gate_out = out(gate.matmul);
    let sig = users(g, gate_out)
        .into_iter()
        .find(|(n, _)| g.node(*n).op == Op::Unary(UnaryOp::Sigmoid))
        .map(|(n, _)| n)
        .ok_or("no Sigmoid")?;
    let silu = only_user(g, out(sig)).ok_or("Sigmoid read more than once")?;
    if !is_binary(g, silu, BinaryOp::Mul) || other_input(g, silu, out(sig)) != Some(gate_out) {
        return Err("Sigmoid not multiplied by its own input (silu)".into());
    }
    let glu = only_user(g, out(silu)).ok_or("silu read more than once")?;
    if !is_binary(g, glu, BinaryOp::Mul)
        || other_input(g, glu, out(silu)).map(|v| strip_casts(g, v)) != Some(out(up.matmul))
    {
        return Err("silu(gate) not multiplied by up".into());
    }
    let down = match_projections(g, out(glu))
        .into_iter()
        .next()
        .ok_or("no down projection")?;
    let output = match_residual(g, x, out(down.matmul)).ok_or("no residual Add after down")?;
    Ok(MlpBlock {
        input: x,
        output,
        norm,
        gate: gate.clone(),
        up: up.clone(),
        down,
    })
}

fn match_head(g: &Graph, x: Value) -> std::result::Result<Head, String> {
    let norm = match_norm(g, x).ok_or("no final RMSNorm")?;
    let projs = match_projections(g, norm.out);
    let [lm_head] = projs.as_slice() else {
        return Err(format!(
            "expected 1 lm_head projection, found {}",
            projs.len()
        ));
    };
    let output = out(lm_head.matmul);
    if !g.outputs.iter().any(|(_, v)| *v == output) {
        return Err("lm_head is not a graph output".into());
    }
    Ok(Head {
        input: x,
        output,
        norm,
        lm_head: lm_head.clone(),
    })
}

// --- rewriting ---------------------------------------------------------------

/// Builds the patches: new weights are put in the store first (patches can
/// only reference weights that exist).
struct Rewriter<'a> {
    g: &'a mut Graph,
    batch: Dim,
    seq: Dim,
    transposed: usize,
    added: usize,
}

impl Rewriter<'_> {
    fn act(&self, width: usize) -> Option<TensorType> {
        Some(TensorType::new(
            DType::F32,
            vec![
                self.batch.clone(),
                self.seq.clone(),
                Dim::Fixed(width as u64),
            ],
        ))
    }

    /// Stores `old` under the Hugging Face name `new` (transposed when it is
    /// an `[in, out]` MatMul weight) and returns a patch node reading it.
    fn weight(
        &mut self,
        p: &mut Patch,
        old: &str,
        new: &str,
        transpose: bool,
    ) -> Result<PatchValue> {
        let w = self
            .g
            .weights
            .get(old)
            .ok_or_else(|| Error::invalid(format!("pass 'raise': weight '{old}' vanished")))?
            .clone();
        if new != old && self.g.weights.contains(new) {
            return Err(Error::invalid(format!(
                "pass 'raise': cannot name weight '{old}' '{new}': that name is taken"
            )));
        }
        let stored = if transpose {
            self.transposed += 1;
            transpose_2d(&w, new)?
        } else {
            Weight {
                name: new.to_string(),
                ..w
            }
        };
        let ty = TensorType::fixed(stored.dtype, &stored.shape);
        self.g.weights.insert(stored);
        Ok(p.add(
            new,
            Op::Weight {
                name: new.to_string(),
            },
            &[],
            vec![Output {
                name: new.to_string(),
                ty: Some(ty),
            }],
        ))
    }

    fn node(
        &self,
        p: &mut Patch,
        name: &str,
        op: Op,
        ins: &[PatchValue],
        width: usize,
    ) -> PatchValue {
        let ins: Vec<Option<PatchValue>> = ins.iter().copied().map(Some).collect();
        p.add(
            name,
            op,
            &ins,
            vec![Output {
                name: name.to_string(),
                ty: self.act(width),
            }],
        )
    }

    fn norm(
        &mut self,
        p: &mut Patch,
        x: PatchValue,
        norm: &Norm,
        module: &str,
        hidden: usize,
    ) -> Result<PatchValue> {
        let w = self.weight(p, &norm.weight, &format!("{module}.weight"), false)?;
        Ok(self.node(p, module, Op::RmsNorm { eps: norm.eps }, &[x, w], hidden))
    }

    fn linear(
        &mut self,
        p: &mut Patch,
        x: PatchValue,
        proj: &Projection,
        module: &str,
    ) -> Result<PatchValue> {
        let w = self.weight(
            p,
            &proj.weight,
            &format!("{module}.weight"),
            proj.stored_in_out,
        )?;
        Ok(self.node(p, module, Op::Linear, &[x, w], proj.out_features))
    }

    fn attention(&mut self, b: &AttentionBlock, layer: usize, hidden: usize) -> Result<()> {
        let mut p = Patch::new();
        let x = PatchValue::Existing(b.input);
        let pre = format!("model.layers.{layer}");
        let attn = format!("{pre}.self_attn");
        let n = self.norm(
            &mut p,
            x,
            &b.norm,
            &format!("{pre}.input_layernorm"),
            hidden,
        )?;
        let q = self.linear(&mut p, n, &b.q, &format!("{attn}.q_proj"))?;
        let rope = |heads| {
            Op::Rope(RopeAttrs {
                num_heads: heads,
                ..b.rope.clone()
            })
        };
        let q = self.node(
            &mut p,
            &format!("{attn}.rope_q"),
            rope(b.heads),
            &[q],
            b.q.out_features,
        );
        let k = self.linear(&mut p, n, &b.k, &format!("{attn}.k_proj"))?;
        let k = self.node(
            &mut p,
            &format!("{attn}.rope_k"),
            rope(b.kv_heads),
            &[k],
            b.k.out_features,
        );
        let v = self.linear(&mut p, n, &b.v, &format!("{attn}.v_proj"))?;
        let a = self.node(
            &mut p,
            &attn,
            Op::Attention(AttentionAttrs {
                num_heads: b.heads,
                num_kv_heads: b.kv_heads,
                head_dim: b.head_dim,
                scale: b.scale,
                pattern: AttentionPattern::FullCausal,
            }),
            &[q, k, v],
            b.heads * b.head_dim,
        );
        let o = self.linear(&mut p, a, &b.o, &format!("{attn}.o_proj"))?;
        let h = self.node(
            &mut p,
            &format!("{pre}.attn_residual"),
            Op::Binary(BinaryOp::Add),
            &[x, o],
            hidden,
        );
        p.replace(b.output, h);
        self.added += self.g.apply(p)?.added;
        Ok(())
    }

    fn mlp(&mut self, b: &MlpBlock, layer: usize, hidden: usize) -> Result<()> {
        let mut p = Patch::new();
        let x = PatchValue::Existing(b.input);
        let pre = format!("model.layers.{layer}");
        let mlp = format!("{pre}.mlp");
        let n = self.norm(
            &mut p,
            x,
            &b.norm,
            &format!("{pre}.post_attention_layernorm"),
            hidden,
        )?;
        let gate = self.linear(&mut p, n, &b.gate, &format!("{mlp}.gate_proj"))?;
        let up = self.linear(&mut p, n, &b.up, &format!("{mlp}.up_proj"))?;
        let s = self.node(
            &mut p,
            &format!("{mlp}.act"),
            Op::SwiGlu,
            &[gate, up],
            b.gate.out_features,
        );
        let d = self.linear(&mut p, s, &b.down, &format!("{mlp}.down_proj"))?;
        let h = self.node(
            &mut p,
            &format!("{pre}.mlp_residual"),
            Op::Binary(BinaryOp::Add),
            &[x, d],
            hidden,
        );
        p.replace(b.output, h);
        self.added += self.g.apply(p)?.added;
        Ok(())
    }

    fn head(&mut self, b: &Head, hidden: usize) -> Result<()> {
        let mut p = Patch::new();
        let n = self.norm(
            &mut p,
            PatchValue::Existing(b.input),
            &b.norm,
            "model.norm",
            hidden,
        )?;
        let logits = self.linear(&mut p, n, &b.lm_head, "lm_head")?;
        p.replace(b.output, logits);
        self.added += self.g.apply(p)?.added;
        Ok(())
    }

    fn embedding(&mut self, e: &Embed, hidden: usize) -> Result<()> {
        let mut p = Patch::new();
        let w = self.weight(&mut p, &e.weight, "model.embed_tokens.weight", false)?;
        let h = self.node(
            &mut p,
            "model.embed_tokens",
            Op::Embedding,
            &[w, PatchValue::Existing(e.ids)],
            hidden,
        );
        p.replace(e.gather, h);
        self.added += self.g.apply(p)?.added;
        Ok(())
    }
}

/// A copy of a 2-D weight, transposed, under a new name.
fn transpose_2d(w: &Weight, name: &str) -> Result<Weight> {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let size = w.dtype.size();
    let bytes = w.bytes().ok_or_else(|| {
        Error::invalid(format!(
            "pass 'raise': weight '{}' has no data to transpose ({})",
            w.name,
            w.source()
        ))
    })?;
    let mut outb = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * size;
            let dst = (c * rows + r) * size;
            outb[dst..dst + size].copy_from_slice(&bytes[src..src + size]);
        }
    }
    Ok(Weight {
        name: name.to_string(),
        dtype: w.dtype,
        shape: vec![cols, rows],
        data: WeightData::Owned(Arc::new(outb)),
        trainable: w.trainable,
    })
}

/// What the walk along the residual stream found.
#[derive(Default)]
struct Plan {
    embed: Option<Embed>,
    layers: Vec<(AttentionBlock, Option<MlpBlock>)>,
    head: Option<Head>,
    notes: Vec<String>,
    /// The layer whose attention did not match and the matcher's reason:
    /// where the walk along the residual stream stopped.
    stopped_at: Option<(usize, String)>,
    /// Why the last layer's MLP, or the final norm and lm_head, did not match.
    mlp_failure: Option<String>,
    head_failure: Option<String>,
}

impl Plan {
    /// What stays primitive, naming the layer and the part (attention,
    /// RoPE, MLP, norm); `None` when the whole model matched.
    fn incomplete(&self) -> Option<String> {
        let norm_or = |why: &str, part: &'static str| {
            if why.contains("RMSNorm") {
                "norm"
            } else {
                part
            }
        };
        let stopped = self.stopped_at.as_ref().map(|(layer, why)| {
            format!("layer {layer}: the {} did not match ({why})", part_of(why))
        });
        if self.embed.is_none() {
            return Some(
                "no embedding found (a Gather of a [vocab, hidden] weight by input_ids)".into(),
            );
        }
        if self.layers.is_empty() {
            return Some(stopped.unwrap_or_else(|| "no decoder layer found".into()));
        }
        if let Some(why) = &self.mlp_failure {
            return Some(format!(
                "layer {}: the {} did not match ({why})",
                self.layers.len() - 1,
                norm_or(why, "MLP")
            ));
        }
        if let Some(why) = &self.head_failure {
            let head = if why.contains("RMSNorm") {
                "final norm"
            } else {
                "lm_head"
            };
            return Some(match stopped {
                Some(s) => format!(
                    "{s}; after {} layers the {head} did not match either ({why})",
                    self.layers.len()
                ),
                None => format!(
                    "after {} layers, the {head} did not match ({why})",
                    self.layers.len()
                ),
            });
        }
        None
    }
}

fn plan(g: &Graph) -> Plan {
    let mut plan = Plan::default();
    let Some(embed) = match_embedding(g) else {
        plan.notes.push(
            "no embedding Gather(weight [vocab, hidden], input_ids) found: the graph is left as it is"
                .into(),
        );
        return plan;
    };
    let mut x = embed.gather;
    plan.embed = Some(embed);
    loop {
        let layer = plan.layers.len();
        let attn = match match_attention_block(g, x) {
            Ok(a) => a,
            Err(why) => {
                if layer == 0 {
                    plan.notes
                        .push(format!("layer 0 attention not matched: {why}"));
                }
                plan.stopped_at = Some((layer, why));
                break;
            }
        };
        x = attn.output;
        match match_mlp_block(g, x) {
            Ok(m) => {
                x = m.output;
                plan.layers.push((attn, Some(m)));
            }
            Err(why) => {
                plan.notes.push(format!(
                    "layer {layer} MLP not matched, left primitive: {why}"
                ));
                plan.mlp_failure = Some(why);
                plan.layers.push((attn, None));
                return plan;
            }
        }
    }
    match match_head(g, x) {
        Ok(h) => plan.head = Some(h),
        Err(why) => {
            plan.notes.push(format!(
                "after {} layers: final norm and lm_head not matched, left primitive: {why}",
                plan.layers.len()
            ));
            plan.head_failure = Some(why);
        }
    }
    plan
}

fn structural_config(plan: &Plan, g: &Graph) -> Option<StructuralConfig> {
    let embed = plan.embed.as_ref()?;
    let (attn, mlp) = plan.layers.first()?;
    let mlp = mlp.as_ref()?;
    let head = plan.head.as_ref()?;
    let vocab = g.weights.get(&embed.weight)?.shape[0];
    let hidden = g.weights.get(&embed.weight)?.shape[1];
    Some(StructuralConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: mlp.gate.out_features,
        num_hidden_layers: plan.layers.len(),
        num_attention_heads: attn.heads,
        num_key_value_heads: attn.kv_heads,
        head_dim: attn.head_dim,
        // f32 eps printed as f64 carries noise (1e-5 → 9.99999974e-6).
        rms_norm_eps: round_sig(attn.norm.eps as f64),
        rope_theta: attn.rope.theta,
        linear_rope_factor: match attn.rope.scaling {
            RopeScaling::Linear { factor } => Some(factor),
            _ => None,
        },
        tie_word_embeddings: head.lm_head.weight == embed.weight,
    })
}

impl Pass for Raise {
    fn name(&self) -> &'static str {
        "raise"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let mut report = Report::default();
        if graph.g.node_weights().any(|n| n.op.is_llama_level()) {
            report
                .notes
                .push("the graph already has LLaMA-level ops: nothing to raise".into());
            return Ok(report);
        }
        let plan = plan(graph);
        if self.options.strict {
            if let Some(what) = plan.incomplete() {
                return Err(Error::invalid(format!(
                    "pass 'raise': the graph is not a LLaMA that lcc recognises: {what}"
                )));
            }
        }
        report.notes.extend(plan.notes.iter().cloned());
        let Some(embed) = plan.embed.clone() else {
            return Ok(report);
        };
        let hidden = graph
            .weights
            .get(&embed.weight)
            .map(|w| w.shape[1])
            .unwrap_or(0);
        let ids_ty = graph.value_type(embed.ids).cloned();
        let (batch, seq) = match ids_ty.as_ref().and_then(|t| t.shape.as_deref()) {
            Some([b, s]) => (b.clone(), s.clone()),
            _ => (Dim::sym("batch"), Dim::sym("seq")),
        };
        let config = structural_config(&plan, graph);
        let before = graph.g.node_count();
        let mut rw = Rewriter {
            g: graph,
            batch,
            seq,
            transposed: 0,
            added: 0,
        };
        // Later blocks first: each patch reads the (old) output of the block
        // before it, which stays alive until that block is replaced in turn.
        if let Some(h) = &plan.head {
            rw.head(h, hidden)?;
            report.matched += 2;
        }
        for (layer, (attn, mlp)) in plan.layers.iter().enumerate().rev() {
            if let Some(m) = mlp {
                rw.mlp(m, layer, hidden)?;
                report.matched += 5;
            }
            rw.attention(attn, layer, hidden)?;
            report.matched += 7;
        }
        if !plan.layers.is_empty() {
            rw.embedding(&embed, hidden)?;
            report.matched += 1;
        }
        let transposed = rw.transposed;
        report.nodes_added = rw.added;
        graph.remove_dead();
        let after = graph.g.node_count();
        report.nodes_removed = (before + report.nodes_added).saturating_sub(after);
        if transposed > 0 {
            report.notes.push(format!(
                "{transposed} Linear weights were stored [in, out] and were transposed into [out, in] copies"
            ));
        }
        if let Some(cfg) = config {
            let recorded = cfg.record_in(graph);
            report.notes.push(match recorded.max_position_embeddings {
                Some(n) => format!(
                    "raised {} layers; hf.config reconstructed, max_position_embeddings {n} from the model's own hf.config metadata (written by lcc; kept: {})",
                    plan.layers.len(),
                    recorded.kept.join(", ")
                ),
                None => format!(
                    "raised {} layers; hf.config reconstructed; the export records no max_position_embeddings (torch computes cos/sin from the positions), so passes that need the original context ask for pi.original_max_position_embeddings",
                    plan.layers.len()
                ),
            });
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv_freq(theta: f64, dim: usize, factor: f64) -> Vec<f64> {
        (0..dim / 2)
            .map(|i| (theta.powf(-(2.0 * i as f64) / dim as f64) / factor) as f32 as f64)
            .collect()
    }

    #[test]
    fn theta_and_linear_factor_come_back_from_f32_inv_freq() {
        let r = rope_from_inv_freq(&inv_freq(10000.0, 16, 1.0), 4, 16).unwrap();
        assert_eq!((r.theta, r.rotary_dim), (10000.0, 16));
        assert_eq!(r.scaling, RopeScaling::None);
        let r = rope_from_inv_freq(&inv_freq(500000.0, 128, 8.0), 32, 128).unwrap();
        assert_eq!(r.theta, 500000.0);
        assert_eq!(r.scaling, RopeScaling::Linear { factor: 8.0 });
        // Frequencies scaled unevenly (llama3/yarn-like) are refused, not guessed.
        let mut uneven = inv_freq(10000.0, 16, 1.0);
        uneven[7] /= 4.0;
        assert!(rope_from_inv_freq(&uneven, 4, 16).is_none());
    }
}
