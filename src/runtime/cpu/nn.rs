//! Neural-network kernels on the CPU: the ONNX ops with real arithmetic
//! (Softmax, Reduce*, RMSNormalization, RotaryEmbedding, Attention) and the
//! LLaMA-level ops (Embedding, RmsNorm, Rope, Attention, Linear, SwiGlu).
//!
//! f32/f16/bf16 tensors compute in f32 (f16/bf16 results are rounded to
//! their storage precision), f64 tensors in f64. Sums that feed a
//! normalisation (softmax denominators, mean of squares, ReduceSum/Mean)
//! accumulate in f64. Work is split over rows with rayon, each row computed
//! by one task in a fixed order, so results never depend on scheduling.
//!
//! Attention (both forms) runs one tiled kernel, [`flash_attention`]: for a
//! block of queries it walks key blocks with an online softmax, so memory is
//! O(block·head_dim) per task instead of O(seq²), and causal masks skip the
//! key blocks no query of the block can see.

use super::linalg::{finish, gemm_strided, output_numel, MatRef, Real};
use crate::ir::{
    AttentionAttrs, AttentionPattern, DType, GroupSize, OnnxAttentionAttrs, ReduceOp, RopeAttrs,
    Tensor, TensorData,
};
use rayon::prelude::*;
use std::sync::Arc;

/// Below this many elements per task, rayon's overhead outweighs the split.
const MIN_TASK_ELEMS: usize = 1 << 13;

/// Rows per rayon task for rows of `row_len` elements.
fn min_rows(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

fn norm_axis(axis: i64, rank: usize, op: &str) -> Result<usize, String> {
    super::layout::norm_axis(axis, rank, &format!("{op} axis"))
}

fn float_kind_error(op: &str, what: &str, t: &Tensor) -> String {
    format!("{op} needs a float {what}, got {}", t.dtype)
}

/// The result dtype of combining two float tensors (as torch promotes).
fn promote(a: DType, b: DType) -> DType {
    if a == b {
        a
    } else if a == DType::F64 || b == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn same_data_kind(a: &Tensor, b: &Tensor) -> bool {
    std::mem::discriminant(&a.data) == std::mem::discriminant(&b.data)
}

// ---------------------------------------------------------------------------
// Softmax

/// ONNX (opset ≥ 13) `Softmax` / `LogSoftmax` over one axis, stabilised by
/// subtracting the row maximum.
///
/// A row that is all `-inf` yields NaN (as onnxruntime and torch do: the
/// maximum is `-inf` and `-inf - -inf` is NaN); callers that need zeros for
/// fully masked rows (attention) handle them before the softmax.
pub fn softmax(x: &Tensor, axis: i64, log: bool) -> Result<Tensor, String> {
    let op = if log { "LogSoftmax" } else { "Softmax" };
    let ax = norm_axis(axis, x.rank(), op)?;
    let len = x.shape[ax];
    let inner: usize = x.shape[ax + 1..].iter().product();
    match &x.data {
        TensorData::F32(v) => Ok(finish(
            x.dtype,
            x.shape.clone(),
            softmax_impl(v, len, inner, log),
        )),
        TensorData::F64(v) => Ok(finish(
            x.dtype,
            x.shape.clone(),
            softmax_impl(v, len, inner, log),
        )),
        _ => Err(float_kind_error(op, "input", x)),
    }
}

fn softmax_impl<T: Real>(x: &[T], len: usize, inner: usize, log: bool) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    let block = len * inner;
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .with_min_len(min_rows(block))
        .for_each(|(o, xb)| {
            if inner == 1 {
                softmax_row(xb, o, log);
            } else {
                let mut col = vec![T::ZERO; len];
                let mut res = vec![T::ZERO; len];
                for t in 0..inner {
                    for (c, v) in col.iter_mut().enumerate() {
                        *v = xb[c * inner + t];
                    }
                    softmax_row(&col, &mut res, log);
                    for (c, v) in res.iter().enumerate() {
                        o[c * inner + t] = *v;
                    }
                }
            }
        });
    out
}

fn softmax_row<T: Real>(x: &[T], out: &mut [T], log: bool) {
    let max = x.iter().fold(T::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        let e = (v - max).exp();
        *o = e;
        sum += e.to_f64();
    }
    if log {
        let lse = T::from_f64(sum.ln());
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v - max - lse;
        }
    } else {
        let s = T::from_f64(sum);
        for o in out.iter_mut() {
            *o = *o / s;
        }
    }
}

// ---------------------------------------------------------------------------
// Reductions

/// ONNX `ReduceMean/Sum/Max/Min` (attribute and input forms alike).
///
/// `axes` absent or empty reduces every axis, unless `noop_with_empty_axes`,
/// which returns the input unchanged. Empty reductions give the identity:
/// Sum 0, Mean NaN (0/0) for floats and 0 for integers, Max the type's lowest
/// value (`-inf`), Min its highest (`+inf`), as ONNX 18+ specifies.
pub fn reduce(
    x: &Tensor,
    op: ReduceOp,
    axes: Option<&[i64]>,
    keepdims: bool,
    noop_with_empty_axes: bool,
) -> Result<Tensor, String> {
    let name = match op {
        ReduceOp::Mean => "ReduceMean",
        ReduceOp::Sum => "ReduceSum",
        ReduceOp::Max => "ReduceMax",
        ReduceOp::Min => "ReduceMin",
    };
    let rank = x.rank();
    let mut reduced = vec![false; rank];
    match axes.filter(|a| !a.is_empty()) {
        None if noop_with_empty_axes => return Ok(x.clone()),
        None => reduced.fill(true),
        Some(list) => {
            for &a in list {
                let ax = norm_axis(a, rank, name)?;
                if reduced[ax] {
                    return Err(format!("{name} axes {list:?} name axis {ax} twice"));
                }
                reduced[ax] = true;
            }
        }
    }
    let mut out_shape = Vec::with_capacity(rank);
    for (d, &r) in reduced.iter().enumerate() {
        if !r {
            out_shape.push(x.shape[d]);
        } else if keepdims {
            out_shape.push(1);
        }
    }
    let plan = ReducePlan::new(&x.shape, &reduced);
    let data = match &x.data {
        TensorData::F32(v) => {
            let mut out = reduce_float(v, op, &plan);
            super::linalg::round_to_storage(x.dtype, &mut out);
            TensorData::F32(out)
        }
        TensorData::F64(v) => TensorData::F64(reduce_float(v, op, &plan)),
        TensorData::I64(v) => TensorData::I64(reduce_int(v, op, &plan, x.dtype)),
        TensorData::Bool(v) => {
            // Opset 20+: Max is "any", Min is "all" (empty: false / true).
            let (init, max) = match op {
                ReduceOp::Max => (false, true),
                ReduceOp::Min => (true, false),
                _ => return Err(format!("{name} does not take bool inputs")),
            };
            let mut acc = vec![init; plan.out_n];
            plan.for_each(v, |o, b| {
                acc[o] = if max { acc[o] || b } else { acc[o] && b }
            });
            TensorData::Bool(acc)
        }
    };
    Ok(Tensor {
        dtype: x.dtype,
        shape: out_shape,
        data,
    })
}

/// How input elements map to output elements of a reduction.
struct ReducePlan {
    out_n: usize,
    red_n: usize,
    /// The reduced axes are exactly the trailing ones: each output reduces
    /// one contiguous run of `red_n` inputs.
    trailing: bool,
    shape: Vec<usize>,
    /// For every input axis, the output stride (0 for reduced axes).
    out_strides: Vec<usize>,
}

impl ReducePlan {
    fn new(shape: &[usize], reduced: &[bool]) -> Self {
        let mut out_strides = vec![0; shape.len()];
        let mut s = 1;
        for d in (0..shape.len()).rev() {
            if !reduced[d] {
                out_strides[d] = s;
                s *= shape[d];
            }
        }
        let out_n = s;
        let red_n = shape
            .iter()
            .zip(reduced)
            .filter(|(_, &r)| r)
            .map(|(&d, _)| d)
            .product();
        let first_reduced = reduced.iter().position(|&r| r).unwrap_or(shape.len());
        let trailing = reduced[first_reduced..].iter().all(|&r| r);
        ReducePlan {
            out_n,
            red_n,
            trailing,
            shape: shape.to_vec(),
            out_strides,
        }
    }

    /// Calls `f(out_index, value)` for every input in row-major order.
    fn for_each<T: Copy>(&self, x: &[T], mut f: impl FnMut(usize, T)) {
        let rank = self.shape.len();
        let mut idx = vec![0usize; rank];
        let mut o = 0usize;
        for &v in x {
            f(o, v);
            for d in (0..rank).rev() {
                idx[d] += 1;
                o += self.out_strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                o -= self.out_strides[d] * idx[d];
                idx[d] = 0;
            }
        }
    }
}

fn reduce_float<T: Real>(x: &[T], op: ReduceOp, plan: &ReducePlan) -> Vec<T> {
    let red_n = plan.red_n;
    let fold_run = |run: &[T]| -> T {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                let s: f64 = run.iter().map(|v| v.to_f64()).sum();
                if op == ReduceOp::Mean {
                    T::from_f64(s / red_n as f64)
                } else {
                    T::from_f64(s)
                }
            }
            ReduceOp::Max => run.iter().fold(T::NEG_INFINITY, |m, &v| {
                if v.is_nan() || m.is_nan() {
                    v + m
                } else {
                    m.max(v)
                }
            }),
            ReduceOp::Min => run.iter().fold(T::INFINITY, |m, &v| {
                if v.is_nan() || m.is_nan() {
                    v + m
                } else {
                    m.min(v)
                }
            }),
        }
    };
    if plan.trailing && red_n > 0 {
        let mut out = vec![T::ZERO; plan.out_n];
        out.par_iter_mut()
            .zip(x.par_chunks(red_n))
            .with_min_len(min_rows(red_n))
            .for_each(|(o, run)| *o = fold_run(run));
        return out;
    }
    match op {
        ReduceOp::Sum | ReduceOp::Mean => {
            let mut acc = vec![0f64; plan.out_n];
            plan.for_each(x, |o, v| acc[o] += v.to_f64());
            let div = if op == ReduceOp::Mean {
                red_n as f64
            } else {
                1.0
            };
            acc.into_iter().map(|s| T::from_f64(s / div)).collect()
        }
        ReduceOp::Max | ReduceOp::Min => {
            let init = if op == ReduceOp::Max {
                T::NEG_INFINITY
            } else {
                T::INFINITY
            };
            let mut acc = vec![init; plan.out_n];
            plan.for_each(x, |o, v| {
                let m = acc[o];
                acc[o] = if v.is_nan() || m.is_nan() {
                    v + m
                } else if op == ReduceOp::Max {
                    m.max(v)
                } else {
                    m.min(v)
                };
            });
            acc
        }
    }
}

/// The (lowest, highest) value of an integer dtype held as i64.
fn int_range(dtype: DType) -> (i64, i64) {
    match dtype {
        DType::I32 => (i32::MIN as i64, i32::MAX as i64),
        DType::I8 => (i8::MIN as i64, i8::MAX as i64),
        DType::U8 => (0, u8::MAX as i64),
        _ => (i64::MIN, i64::MAX),
    }
}

fn reduce_int(x: &[i64], op: ReduceOp, plan: &ReducePlan, dtype: DType) -> Vec<i64> {
    let (lo, hi) = int_range(dtype);
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => 0,
        ReduceOp::Max => lo,
        ReduceOp::Min => hi,
    };
    let mut acc = vec![init; plan.out_n];
    plan.for_each(x, |o, v| {
        acc[o] = match op {
            ReduceOp::Sum | ReduceOp::Mean => acc[o].wrapping_add(v),
            ReduceOp::Max => acc[o].max(v),
            ReduceOp::Min => acc[o].min(v),
        }
    });
    if op == ReduceOp::Mean && plan.red_n > 0 {
        // numpy's mean, cast back to the integer type, truncates.
        for a in acc.iter_mut() {
            *a /= plan.red_n as i64;
        }
    }
    acc
}

// ---------------------------------------------------------------------------
// RMS normalisation

/// ONNX opset-23 `RMSNormalization`: normalise over axes `[axis, rank)`,
/// `y = x / sqrt(mean(x²) + epsilon) · scale`, with `scale` broadcast to x.
///
/// `stash_type` 1 (f32) and 11 (f64) are accepted; the mean of squares is
/// always accumulated in f64 and the rest computed in the input's compute
/// type (f32, or f64 for f64 inputs).
pub fn rms_normalization(
    x: &Tensor,
    scale: &Tensor,
    axis: i64,
    epsilon: f32,
    stash_type: i64,
) -> Result<Tensor, String> {
    const OP: &str = "RMSNormalization";
    if stash_type != 1 && stash_type != 11 {
        return Err(format!(
            "{OP} stash_type {stash_type} is not supported (lcc computes in f32, stash_type 1, or f64, 11)"
        ));
    }
    let ax = norm_axis(axis, x.rank(), OP)?;
    let row: usize = x.shape[ax..].iter().product();
    let ok = super::layout::broadcast_shapes(&x.shape, &scale.shape).is_ok_and(|s| s == x.shape);
    if !ok {
        return Err(format!(
            "{OP} scale of shape {:?} does not broadcast to the input's shape {:?}",
            scale.shape, x.shape
        ));
    }
    if !same_data_kind(x, scale) {
        return Err(format!(
            "{OP} input ({}) and scale ({}) have different types",
            x.dtype, scale.dtype
        ));
    }
    // Scale offsets split into an outer part (per row) and an inner part (per
    // position in the row): the offset is linear in the multi-index.
    let strides = super::linalg::broadcast_strides(&scale.shape, &x.shape);
    let offsets = |dims: &[usize], strides: &[usize]| -> Vec<usize> {
        let n: usize = dims.iter().product();
        let mut offs = Vec::with_capacity(n);
        let mut idx = vec![0usize; dims.len()];
        for _ in 0..n {
            offs.push(idx.iter().zip(strides).map(|(i, s)| i * s).sum());
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        offs
    };
    let outer = offsets(&x.shape[..ax], &strides[..ax]);
    let inner = offsets(&x.shape[ax..], &strides[ax..]);
    fn run<T: Real>(
        x: &[T],
        w: &[T],
        row: usize,
        eps: f32,
        outer: &[usize],
        inner: &[usize],
    ) -> Vec<T> {
        let mut out = vec![T::ZERO; x.len()];
        if row == 0 {
            return out;
        }
        out.par_chunks_mut(row)
            .zip(x.par_chunks(row))
            .enumerate()
            .with_min_len(min_rows(row))
            .for_each(|(r, (o, xr))| {
                let ss: f64 = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum();
                let mean = T::from_f64(ss / row as f64);
                let inv = T::ONE / (mean + T::from_f64(eps as f64)).sqrt();
                let base = outer[r];
                for ((o, &v), &io) in o.iter_mut().zip(xr).zip(inner) {
                    *o = v * inv * w[base + io];
                }
            });
        out
    }
    let eps = epsilon;
    match (&x.data, &scale.data) {
        (TensorData::F32(v), TensorData::F32(w)) => Ok(finish(
            x.dtype,
            x.shape.clone(),
            run(v, w, row, eps, &outer, &inner),
        )),
        (TensorData::F64(v), TensorData::F64(w)) => Ok(finish(
            x.dtype,
            x.shape.clone(),
            run(v, w, row, eps, &outer, &inner),
        )),
        _ => Err(float_kind_error(OP, "input", x)),
    }
}

// ---------------------------------------------------------------------------
// ONNX RotaryEmbedding

/// ONNX opset-23 `RotaryEmbedding`.
///
/// `x` is `[batch, num_heads, seq, head_size]`, or `[batch, seq, hidden]` with
/// the `num_heads` attribute. With `position_ids` (`[batch, seq]`) the caches
/// are `[max_position, rotary_dim/2]` and rows are picked by position;
/// without, they are `[batch, seq, rotary_dim/2]`. Caches (and position ids)
/// of batch 1 are broadcast over the batch, as torch's opset-23 exporter
/// relies on (onnxruntime rejects this; torch accepts it).
/// `rotary_embedding_dim` 0 rotates the whole head; channels past it pass
/// through. `interleaved` pairs channels (0,1), (2,3)…; otherwise (i, i+d/2).
pub fn rotary_embedding(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    position_ids: Option<&Tensor>,
    interleaved: bool,
    num_heads: Option<i64>,
    rotary_embedding_dim: i64,
) -> Result<Tensor, String> {
    const OP: &str = "RotaryEmbedding";
    // (batch, seq, heads, head_size, x is [b, h, s, d])
    let (batch, seq, heads, head, bhsd) = match *x.shape.as_slice() {
        [b, h, s, d] => (b, s, h, d, true),
        [b, s, hidden] => {
            let h = match num_heads {
                Some(h) if h > 0 => h as usize,
                _ => {
                    return Err(format!(
                        "{OP} with a 3-D input [batch, seq, hidden] needs the num_heads attribute"
                    ))
                }
            };
            if hidden % h != 0 {
                return Err(format!(
                    "{OP} hidden size {hidden} is not a multiple of num_heads {h}"
                ));
            }
            (b, s, h, hidden / h, false)
        }
        _ => {
            return Err(format!(
                "{OP} input must be 3-D or 4-D, got shape {:?}",
                x.shape
            ))
        }
    };
    let rot = if rotary_embedding_dim <= 0 {
        head
    } else {
        rotary_embedding_dim as usize
    };
    if rot > head || rot % 2 != 0 {
        return Err(format!(
            "{OP} rotary_embedding_dim {rot} must be even and at most the head size {head}"
        ));
    }
    let half = rot / 2;
    if cos.shape != sin.shape {
        return Err(format!(
            "{OP} cos cache {:?} and sin cache {:?} differ in shape",
            cos.shape, sin.shape
        ));
    }
    if cos.shape.last() != Some(&half) {
        return Err(format!(
            "{OP} caches must end in rotary_embedding_dim/2 = {half}, got {:?}",
            cos.shape
        ));
    }
    // Row of the caches for (b, s).
    let cache_rows: Vec<usize> = match position_ids {
        Some(p) => {
            let ids = p
                .as_i64()
                .ok_or_else(|| format!("{OP} position_ids must be integers, got {}", p.dtype))?;
            let pb = match *p.shape.as_slice() {
                [pb, ps] if ps == seq && (pb == batch || pb == 1) => pb,
                _ => {
                    return Err(format!(
                        "{OP} position_ids of shape {:?} do not match [batch={batch}, seq={seq}]",
                        p.shape
                    ))
                }
            };
            if cos.rank() != 2 {
                return Err(format!(
                    "{OP} with position_ids needs caches of shape [max_position, {half}], got {:?}",
                    cos.shape
                ));
            }
            let max_pos = cos.shape[0];
            let mut rows = Vec::with_capacity(batch * seq);
            for b in 0..batch {
                for s in 0..seq {
                    let id = ids[if pb == 1 { s } else { b * seq + s }];
                    if id < 0 || id as usize >= max_pos {
                        return Err(format!(
                            "{OP} position id {id} is outside the caches' {max_pos} positions"
                        ));
                    }
                    rows.push(id as usize);
                }
            }
            rows
        }
        None => {
            let cb = match *cos.shape.as_slice() {
                [cb, cs, _] if cs == seq && (cb == batch || cb == 1) => cb,
                _ => {
                    return Err(format!(
                        "{OP} without position_ids needs caches of shape [batch={batch} (or 1), seq={seq}, {half}], got {:?}",
                        cos.shape
                    ))
                }
            };
            (0..batch * seq)
                .map(|r| if cb == 1 { r % seq } else { r })
                .collect()
        }
    };
    if !same_data_kind(x, cos) || !same_data_kind(x, sin) {
        return Err(format!(
            "{OP} input ({}) and caches ({}) have different types",
            x.dtype, cos.dtype
        ));
    }
    let geom = RotaryGeom {
        seq,
        heads,
        head,
        half,
        bhsd,
        interleaved,
    };
    match (&x.data, &cos.data, &sin.data) {
        (TensorData::F32(v), TensorData::F32(c), TensorData::F32(s)) => Ok(finish(
            x.dtype,
            x.shape.clone(),
            rotary_impl(v, c, s, &cache_rows, &geom),
        )),
        (TensorData::F64(v), TensorData::F64(c), TensorData::F64(s)) => Ok(finish(
            x.dtype,
            x.shape.clone(),
            rotary_impl(v, c, s, &cache_rows, &geom),
        )),
        _ => Err(float_kind_error(OP, "input", x)),
    }
}

struct RotaryGeom {
    seq: usize,
    heads: usize,
    head: usize,
    half: usize,
    bhsd: bool,
    interleaved: bool,
}

fn rotary_impl<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    cache_rows: &[usize],
    g: &RotaryGeom,
) -> Vec<T> {
    let mut out = x.to_vec();
    if g.head == 0 {
        return out;
    }
    out.par_chunks_mut(g.head)
        .enumerate()
        .with_min_len(min_rows(g.head))
        .for_each(|(r, o)| {
            let (b, s) = if g.bhsd {
                (r / (g.heads * g.seq), r % g.seq)
            } else {
                (r / (g.heads * g.seq), (r / g.heads) % g.seq)
            };
            let cr = cache_rows[b * g.seq + s] * g.half;
            let (c, sn) = (&cos[cr..cr + g.half], &sin[cr..cr + g.half]);
            for i in 0..g.half {
                let (a, bi) = if g.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + g.half)
                };
                let (x1, x2) = (o[a], o[bi]);
                o[a] = c[i] * x1 - sn[i] * x2;
                o[bi] = sn[i] * x1 + c[i] * x2;
            }
        });
    out
}

// ---------------------------------------------------------------------------
// Attention kernel

/// Where the heads of a q/k/v/output tensor lie: element (b, h, row, c) is
/// at `b*batch + h*head + row*row + c`.
#[derive(Clone, Copy, Debug)]
struct HeadLayout {
    batch: usize,
    head: usize,
    row: usize,
}

impl HeadLayout {
    /// `[batch, seq, heads*dim]`.
    fn bshd(seq: usize, heads: usize, dim: usize) -> Self {
        HeadLayout {
            batch: seq * heads * dim,
            head: dim,
            row: heads * dim,
        }
    }

    /// `[batch, heads, seq, dim]`.
    fn bhsd(seq: usize, heads: usize, dim: usize) -> Self {
        HeadLayout {
            batch: heads * seq * dim,
            head: seq * dim,
            row: dim,
        }
    }

    fn at(&self, b: usize, h: usize) -> usize {
        b * self.batch + h * self.head
    }
}

/// An additive bias indexed (batch, head, query, key) through strides (0 on
/// broadcast dims); keys at or past `keys` are masked (`-inf`).
struct Bias<'a, T> {
    data: &'a [T],
    strides: [usize; 4],
    keys: usize,
}

struct AttnProblem<'a, T> {
    q: &'a [T],
    q_layout: HeadLayout,
    k: &'a [T],
    k_layout: HeadLayout,
    v: &'a [T],
    v_layout: HeadLayout,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    v_head_dim: usize,
    scale: T,
    /// `softcap·tanh(s/softcap)` on the scaled scores when positive.
    softcap: T,
    /// Query i sees key j only when `j <= i + offset`.
    causal_offset: Option<usize>,
    bias: Option<Bias<'a, T>>,
}

const BLOCK_Q: usize = 128;
const BLOCK_K: usize = 128;

/// Where the log-sum-exp of each query row goes: row (b, h, i) is at
/// `b*batch + h*head + i` (the `[batch, heads, seq]` layout, or a window of
/// it for a sub-problem).
#[derive(Clone, Copy, Debug)]
struct LseLayout {
    batch: usize,
    head: usize,
}

/// One block of query rows, attended: the normalised output rows, and the
/// running max `m` and sum `l` of each row's softmax (over scaled scores).
struct AttendedBlock<T> {
    out: Vec<T>,
    m: Vec<T>,
    l: Vec<T>,
}

/// Tiled attention with an online softmax. Query head h reads key/value head
/// `h / (q_heads / kv_heads)` (GQA). Rows whose every key is masked give 0
/// (as the ONNX reference does). Writes into `out` through `out_layout`, and,
/// when asked, `m + ln(l)` of each row (the training backward's log-sum-exp)
/// into `lse` through its layout; that costs nothing extra, the kernel keeps
/// m and l anyway.
fn flash_attention<T: Real>(
    p: &AttnProblem<'_, T>,
    out: &mut [T],
    out_layout: HeadLayout,
    mut lse: Option<(&mut [T], LseLayout)>,
) {
    let q_blocks = p.q_len.div_ceil(BLOCK_Q);
    let tasks: Vec<(usize, usize, usize)> = (0..p.batch)
        .flat_map(|b| (0..p.q_heads).flat_map(move |h| (0..q_blocks).map(move |qb| (b, h, qb))))
        .collect();
    let blocks: Vec<AttendedBlock<T>> = tasks
        .par_iter()
        .map(|&(b, h, qb)| attend_block(p, b, h, qb))
        .collect();
    let vd = p.v_head_dim;
    for (&(b, h, qb), block) in tasks.iter().zip(&blocks) {
        let base = out_layout.at(b, h);
        for (r, row) in block.out.chunks(vd.max(1)).enumerate() {
            let i = qb * BLOCK_Q + r;
            let o = base + i * out_layout.row;
            out[o..o + vd].copy_from_slice(row);
        }
        if let Some((lse, layout)) = lse.as_mut() {
            let base = b * layout.batch + h * layout.head + qb * BLOCK_Q;
            for (r, (&m, &l)) in block.m.iter().zip(&block.l).enumerate() {
                lse[base + r] = m + l.ln();
            }
        }
    }
}

fn attend_block<T: Real>(
    p: &AttnProblem<'_, T>,
    b: usize,
    h: usize,
    qb: usize,
) -> AttendedBlock<T> {
    let i0 = qb * BLOCK_Q;
    let rows = BLOCK_Q.min(p.q_len - i0);
    let kvh = h / (p.q_heads / p.kv_heads);
    let (d, vd) = (p.head_dim, p.v_head_dim);
    let mut acc = vec![T::ZERO; rows * vd];
    let mut m = vec![T::NEG_INFINITY; rows];
    let mut l = vec![T::ZERO; rows];
    let mut s = vec![T::ZERO; rows * BLOCK_K];
    let q_view = MatRef {
        data: p.q,
        offset: p.q_layout.at(b, h) + i0 * p.q_layout.row,
        row_stride: p.q_layout.row,
        col_stride: 1,
    };
    // Keys past the last query's causal frontier are never seen.
    let kv_end = match p.causal_offset {
        Some(off) => p.kv_len.min(i0 + rows + off),
        None => p.kv_len,
    };
    let mut j0 = 0;
    while j0 < kv_end {
        let cols = BLOCK_K.min(kv_end - j0);
        let k_view = MatRef {
            data: p.k,
            offset: p.k_layout.at(b, kvh) + j0 * p.k_layout.row,
            row_stride: p.k_layout.row,
            col_stride: 1,
        };
        gemm_strided(
            rows,
            cols,
            d,
            &mut s,
            BLOCK_K,
            false,
            q_view,
            k_view.t(),
            p.scale,
            false,
        );
        for r in 0..rows {
            let i = i0 + r;
            let srow = &mut s[r * BLOCK_K..r * BLOCK_K + cols];
            if p.softcap > T::ZERO {
                for x in srow.iter_mut() {
                    *x = p.softcap * (*x / p.softcap).tanh();
                }
            }
            if let Some(bias) = &p.bias {
                let base = b * bias.strides[0] + h * bias.strides[1] + i * bias.strides[2];
                for (c, x) in srow.iter_mut().enumerate() {
                    let j = j0 + c;
                    *x += if j < bias.keys {
                        bias.data[base + j * bias.strides[3]]
                    } else {
                        T::NEG_INFINITY
                    };
                }
            }
            if let Some(off) = p.causal_offset {
                // Keys j > i + off are masked.
                let first_masked = (i + off + 1).saturating_sub(j0);
                if first_masked < cols {
                    srow[first_masked..].fill(T::NEG_INFINITY);
                }
            }
            let tile_max = T::max_of(srow);
            let m_new = m[r].max(tile_max);
            if m_new == T::NEG_INFINITY {
                // Nothing visible yet in this row: these keys weigh nothing.
                srow.fill(T::ZERO);
                continue;
            }
            let alpha = (m[r] - m_new).exp();
            let sum = T::exp_sub_sum(srow, m_new);
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            if alpha != T::ONE {
                for a in &mut acc[r * vd..(r + 1) * vd] {
                    *a *= alpha;
                }
            }
        }
        let v_view = MatRef {
            data: p.v,
            offset: p.v_layout.at(b, kvh) + j0 * p.v_layout.row,
            row_stride: p.v_layout.row,
            col_stride: 1,
        };
        let p_view = MatRef::row_major(&s, 0, BLOCK_K);
        gemm_strided(
            rows,
            vd,
            cols,
            &mut acc,
            vd,
            true,
            p_view,
            v_view,
            T::ONE,
            false,
        );
        j0 += cols;
    }
    for r in 0..rows {
        let row = &mut acc[r * vd..(r + 1) * vd];
        if l[r] > T::ZERO {
            let inv = T::ONE / l[r];
            for a in row.iter_mut() {
                *a *= inv;
            }
        } else if !l[r].is_nan() {
            row.fill(T::ZERO);
        }
    }
    AttendedBlock { out: acc, m, l }
}

// ---------------------------------------------------------------------------
// ONNX Attention

/// ONNX opset-23 `Attention`, following `onnx/reference/ops/op_attention.py`.
///
/// Q/K/V are `[batch, heads, seq, head]`, or `[batch, seq, heads*head]` with
/// the `q_num_heads`/`kv_num_heads` attributes. past_key/past_value
/// (`[batch, kv_heads, past, head]`) are prepended to K/V. `attn_mask` is
/// bool (true = attend) or float (added to the scores), broadcastable to
/// `[batch, q_heads, q_seq, total_seq]`; a last dim shorter than total_seq is
/// padded with masked keys (as the reference does). `is_causal` aligns the
/// causal frontier bottom-right when a past is given (query i sees keys
/// `j <= i + past_len`) and top-left otherwise. Softcap is applied to the
/// scaled scores before the mask. Fully masked rows give 0.
///
/// Returns `[Y, present_key, present_value]` (presents are 4-D); the caller
/// keeps as many as the node has outputs. `qk_matmul_output_mode` ≠ 0 is
/// rejected; `softmax_precision` is accepted (the softmax always runs in f32
/// or f64).
pub fn onnx_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    past_key: Option<&Tensor>,
    past_value: Option<&Tensor>,
    attrs: &OnnxAttentionAttrs,
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "Attention";
    if attrs.qk_matmul_output_mode != 0 {
        return Err(format!(
            "{OP} qk_matmul_output_mode {} is not supported by lcc (only 0, no extra output)",
            attrs.qk_matmul_output_mode
        ));
    }
    if past_key.is_some() != past_value.is_some() {
        return Err(format!("{OP} needs past_key and past_value together"));
    }
    for (t, name) in [(k, "K"), (v, "V")] {
        if !same_data_kind(q, t) {
            return Err(format!(
                "{OP} Q ({}) and {name} ({}) have different types",
                q.dtype, t.dtype
            ));
        }
    }
    for (t, name) in [(past_key, "past_key"), (past_value, "past_value")] {
        if let Some(t) = t {
            if !same_data_kind(q, t) {
                return Err(format!(
                    "{OP} Q ({}) and {name} ({}) have different types",
                    q.dtype, t.dtype
                ));
            }
        }
    }
    if q.rank() != k.rank() || q.rank() != v.rank() {
        return Err(format!(
            "{OP} Q, K and V must have the same rank, got {:?}, {:?}, {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    // (batch, heads, seq, dim) of each, and whether the inputs are 3-D.
    let (qd, kd, vd, three_d) = match q.rank() {
        4 => {
            let d4 = |t: &Tensor| (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
            (d4(q), d4(k), d4(v), false)
        }
        3 => {
            let (qh, kvh) = match (attrs.q_num_heads, attrs.kv_num_heads) {
                (Some(a), Some(b)) if a > 0 && b > 0 => (a as usize, b as usize),
                _ => {
                    return Err(format!(
                        "{OP} with 3-D inputs needs the q_num_heads and kv_num_heads attributes"
                    ))
                }
            };
            let d3 = |t: &Tensor, h: usize, name: &str| {
                if t.shape[2] % h != 0 {
                    Err(format!(
                        "{OP} {name} hidden size {} is not a multiple of {h} heads",
                        t.shape[2]
                    ))
                } else {
                    Ok((t.shape[0], h, t.shape[1], t.shape[2] / h))
                }
            };
            (d3(q, qh, "Q")?, d3(k, kvh, "K")?, d3(v, kvh, "V")?, true)
        }
        _ => {
            return Err(format!(
                "{OP} Q must be 3-D or 4-D, got shape {:?}",
                q.shape
            ))
        }
    };
    let (batch, q_heads, q_len, head_dim) = qd;
    let (kv_heads, new_kv, v_head_dim) = (kd.1, kd.2, vd.3);
    if kd.0 != batch || vd.0 != batch || vd.1 != kv_heads || vd.2 != new_kv || kd.3 != head_dim {
        return Err(format!(
            "{OP} shapes do not agree: Q {:?}, K {:?}, V {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(format!(
            "{OP} q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})"
        ));
    }
    let past_len = match (past_key, past_value) {
        (Some(pk), Some(pv)) => {
            let ok = pk.rank() == 4
                && pv.rank() == 4
                && pk.shape[0] == batch
                && pk.shape[1] == kv_heads
                && pk.shape[3] == head_dim
                && pv.shape[0] == batch
                && pv.shape[1] == kv_heads
                && pv.shape[2] == pk.shape[2]
                && pv.shape[3] == v_head_dim;
            if !ok {
                return Err(format!(
                    "{OP} past_key {:?} / past_value {:?} do not match [batch={batch}, kv_heads={kv_heads}, past, {head_dim}/{v_head_dim}]",
                    pk.shape, pv.shape
                ));
            }
            pk.shape[2]
        }
        _ => 0,
    };
    let kv_len = past_len + new_kv;
    let scale = attrs.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    let mask_shape = match mask {
        None => None,
        Some(m) => {
            if m.rank() == 0 || m.rank() > 4 {
                return Err(format!(
                    "{OP} attn_mask must have rank 1 to 4, got shape {:?}",
                    m.shape
                ));
            }
            let mut s4 = [1usize; 4];
            s4[4 - m.rank()..].copy_from_slice(&m.shape);
            let ok = (s4[0] == 1 || s4[0] == batch)
                && (s4[1] == 1 || s4[1] == q_heads)
                && (s4[2] == 1 || s4[2] == q_len)
                && s4[3] <= kv_len;
            if !ok {
                return Err(format!(
                    "{OP} attn_mask of shape {:?} does not broadcast to [batch={batch}, heads={q_heads}, q_seq={q_len}, total_seq={kv_len}]",
                    m.shape
                ));
            }
            Some(s4)
        }
    };
    let geom = OnnxAttnGeom {
        batch,
        q_heads,
        kv_heads,
        q_len,
        new_kv,
        past_len,
        head_dim,
        v_head_dim,
        three_d,
    };
    let dtype = q.dtype;
    let causal = attrs.is_causal.then_some(past_len);
    match &q.data {
        TensorData::F32(_) => onnx_attention_typed::<f32>(
            q,
            k,
            v,
            mask,
            mask_shape,
            past_key,
            past_value,
            &geom,
            scale,
            attrs.softcap,
            causal,
        ),
        TensorData::F64(_) => onnx_attention_typed::<f64>(
            q,
            k,
            v,
            mask,
            mask_shape,
            past_key,
            past_value,
            &geom,
            scale,
            attrs.softcap,
            causal,
        ),
        _ => Err(format!("{OP} needs float inputs, got {dtype}")),
    }
}

struct OnnxAttnGeom {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    q_len: usize,
    new_kv: usize,
    past_len: usize,
    head_dim: usize,
    v_head_dim: usize,
    three_d: bool,
}

/// `past ++ new` along the sequence axis, as `[batch, heads, past+new, dim]`;
/// `new` is in `new_layout`.
#[allow(clippy::too_many_arguments)]
fn present<T: Real>(
    past: Option<&[T]>,
    new: &[T],
    new_layout: HeadLayout,
    batch: usize,
    heads: usize,
    past_len: usize,
    new_len: usize,
    dim: usize,
) -> Vec<T> {
    let total = past_len + new_len;
    let mut out = Vec::with_capacity(batch * heads * total * dim);
    for b in 0..batch {
        for h in 0..heads {
            if let Some(p) = past {
                let o = (b * heads + h) * past_len * dim;
                out.extend_from_slice(&p[o..o + past_len * dim]);
            }
            for s in 0..new_len {
                let o = new_layout.at(b, h) + s * new_layout.row;
                out.extend_from_slice(&new[o..o + dim]);
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn onnx_attention_typed<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    mask_shape: Option<[usize; 4]>,
    past_key: Option<&Tensor>,
    past_value: Option<&Tensor>,
    g: &OnnxAttnGeom,
    scale: f32,
    softcap: f32,
    causal: Option<usize>,
) -> Result<Vec<Tensor>, String> {
    fn data<T: Real>(t: &Tensor) -> &[T] {
        T::slice(&t.data).unwrap_or(&[])
    }
    let layout = |seq, heads, dim| {
        if g.three_d {
            HeadLayout::bshd(seq, heads, dim)
        } else {
            HeadLayout::bhsd(seq, heads, dim)
        }
    };
    let kv_len = g.past_len + g.new_kv;
    let pk = present(
        past_key.map(data::<T>),
        data(k),
        layout(g.new_kv, g.kv_heads, g.head_dim),
        g.batch,
        g.kv_heads,
        g.past_len,
        g.new_kv,
        g.head_dim,
    );
    let pv = present(
        past_value.map(data::<T>),
        data(v),
        layout(g.new_kv, g.kv_heads, g.v_head_dim),
        g.batch,
        g.kv_heads,
        g.past_len,
        g.new_kv,
        g.v_head_dim,
    );
    // The mask as an additive bias in the compute type.
    let bias_data: Option<Vec<T>> = match mask {
        None => None,
        Some(m) => Some(match &m.data {
            TensorData::Bool(b) => b
                .iter()
                .map(|&a| if a { T::ZERO } else { T::NEG_INFINITY })
                .collect(),
            d => match T::slice(d) {
                Some(s) => s.to_vec(),
                None => {
                    return Err(format!(
                        "Attention attn_mask must be bool or have Q's type, got {}",
                        m.dtype
                    ))
                }
            },
        }),
    };
    let bias = match (&bias_data, mask_shape) {
        (Some(d), Some(s4)) => {
            let mut strides = [0usize; 4];
            let mut st = 1;
            for ax in (0..4).rev() {
                strides[ax] = if s4[ax] == 1 && ax < 3 { 0 } else { st };
                st *= s4[ax];
            }
            Some(Bias {
                data: d.as_slice(),
                strides,
                keys: s4[3],
            })
        }
        _ => None,
    };
    let problem = AttnProblem {
        q: data(q),
        q_layout: layout(g.q_len, g.q_heads, g.head_dim),
        k: &pk,
        k_layout: HeadLayout::bhsd(kv_len, g.kv_heads, g.head_dim),
        v: &pv,
        v_layout: HeadLayout::bhsd(kv_len, g.kv_heads, g.v_head_dim),
        batch: g.batch,
        q_heads: g.q_heads,
        kv_heads: g.kv_heads,
        q_len: g.q_len,
        kv_len,
        head_dim: g.head_dim,
        v_head_dim: g.v_head_dim,
        scale: T::from_f64(scale as f64),
        softcap: T::from_f64(softcap.max(0.0) as f64),
        causal_offset: causal,
        bias,
    };
    let out_len = output_numel(
        &[g.batch, g.q_heads, g.q_len, g.v_head_dim],
        std::mem::size_of::<T>(),
        "Attention output",
    )?;
    let mut y = vec![T::ZERO; out_len];
    let out_layout = layout(g.q_len, g.q_heads, g.v_head_dim);
    flash_attention(&problem, &mut y, out_layout, None);
    let y_shape = if g.three_d {
        vec![g.batch, g.q_len, g.q_heads * g.v_head_dim]
    } else {
        vec![g.batch, g.q_heads, g.q_len, g.v_head_dim]
    };
    Ok(vec![
        finish(q.dtype, y_shape, y),
        finish(k.dtype, vec![g.batch, g.kv_heads, kv_len, g.head_dim], pk),
        finish(v.dtype, vec![g.batch, g.kv_heads, kv_len, g.v_head_dim], pv),
    ])
}

// ---------------------------------------------------------------------------
// LLaMA-level ops

/// Token embedding: rows of `weight` `[vocab, hidden]` picked by `ids` (any
/// integer type, any shape) → `ids.shape ++ [hidden]`.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "Embedding";
    let (vocab, hidden) = match *weight.shape.as_slice() {
        [v, h] => (v, h),
        _ => {
            return Err(format!(
                "{OP} weight must be 2-D [vocab, hidden], got {:?}",
                weight.shape
            ))
        }
    };
    let id_vals = ids
        .as_i64()
        .ok_or_else(|| format!("{OP} ids must be integers, got {}", ids.dtype))?;
    let mut shape = ids.shape.clone();
    shape.push(hidden);
    output_numel(&shape, weight.dtype.size().max(4), "Embedding output")?;
    for &id in id_vals {
        if id < 0 || id as usize >= vocab {
            return Err(format!(
                "{OP} token id {id} is outside the vocabulary (size {vocab}); check the tokenizer matches the model"
            ));
        }
    }
    fn gather<T: Real>(w: &[T], ids: &[i64], hidden: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let o = id as usize * hidden;
            out.extend_from_slice(&w[o..o + hidden]);
        }
        out
    }
    let data = match &weight.data {
        TensorData::F32(w) => TensorData::F32(gather(w, id_vals, hidden)),
        TensorData::F64(w) => TensorData::F64(gather(w, id_vals, hidden)),
        _ => return Err(float_kind_error(OP, "weight", weight)),
    };
    Ok(Tensor {
        dtype: weight.dtype,
        shape,
        data,
    })
}

/// LLaMA RMSNorm as transformers computes it: in f32,
/// `h = x · 1/sqrt(mean(x², last axis) + eps)`, then `weight · h.to(x.dtype)`.
/// The result has the promoted dtype of x and weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor, String> {
    const OP: &str = "RmsNorm";
    let hidden = match x.shape.last() {
        Some(&h) => h,
        None => return Err(format!("{OP} input must have rank >= 1")),
    };
    if weight.numel() != hidden || weight.rank() != 1 {
        return Err(format!(
            "{OP} weight of shape {:?} does not match the hidden size {hidden} of input {:?}",
            weight.shape, x.shape
        ));
    }
    if !same_data_kind(x, weight) {
        return Err(format!(
            "{OP} input ({}) and weight ({}) have different types",
            x.dtype, weight.dtype
        ));
    }
    let out_dtype = promote(x.dtype, weight.dtype);
    fn run<T: Real>(x: &[T], w: &[T], hidden: usize, eps: f32, in_dtype: DType) -> Vec<T> {
        let mut out = T::zeroed(x.len());
        if hidden == 0 {
            return out;
        }
        out.par_chunks_mut(hidden)
            .zip(x.par_chunks(hidden))
            .with_min_len(min_rows(hidden))
            .for_each(|(o, xr)| {
                let ss: f64 = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum();
                let var = T::from_f64(ss / hidden as f64);
                let inv = T::ONE / (var + T::from_f64(eps as f64)).sqrt();
                for ((o, &v), &wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = wv * T::round_one(in_dtype, v * inv);
                }
            });
        out
    }
    match (&x.data, &weight.data) {
        (TensorData::F32(v), TensorData::F32(w)) => Ok(finish(
            out_dtype,
            x.shape.clone(),
            run(v, w, hidden, eps, x.dtype),
        )),
        (TensorData::F64(v), TensorData::F64(w)) => Ok(finish(
            out_dtype,
            x.shape.clone(),
            run(v, w, hidden, eps, x.dtype),
        )),
        _ => Err(float_kind_error(OP, "input", x)),
    }
}

/// LLaMA RoPE (transformers' `apply_rotary_pos_emb`, rotate-half) on
/// `x [batch, seq, heads*head_dim]`, over the first `rotary_dim` channels of
/// each head. `position_ids` is `[batch, seq]` (batch 1 broadcasts) or
/// `[seq]`, default `0..seq`. cos/sin come from [`crate::ir::rope::cos_sin`]
/// with `seq_len = max position + 1` (only dynamic scaling depends on it),
/// and are rounded to x's dtype as transformers casts them.
pub fn rope(
    x: &Tensor,
    position_ids: Option<&Tensor>,
    attrs: &RopeAttrs,
) -> Result<Tensor, String> {
    let setup = RopeSetup::new("Rope", x, position_ids, attrs)?;
    let dtype = x.dtype;
    fn run<T: Real>(x: &[T], st: &RopeSetup, dtype: DType) -> Vec<T> {
        let mut out = T::copy_of(x);
        let (hidden, hd, rd) = (st.hidden, st.head_dim, st.rotary_dim);
        if hidden == 0 || rd == 0 {
            return out;
        }
        let half = rd / 2;
        let (cos, sin) = st.tables::<T>(dtype);
        let r = |v: T| T::round_one(dtype, v);
        let rounds = matches!(dtype, DType::F16 | DType::BF16);
        out.par_chunks_mut(hidden)
            .enumerate()
            .with_min_len(min_rows(hidden))
            .for_each(|(row, o)| {
                let p = st.position_row(row);
                let c = &cos[p * rd..(p + 1) * rd];
                let sn = &sin[p * rd..(p + 1) * rd];
                for head in o.chunks_mut(hd) {
                    let (lo, hi) = head[..rd].split_at_mut(half);
                    if rounds {
                        for i in 0..half {
                            let (x1, x2) = (lo[i], hi[i]);
                            lo[i] = r(r(x1 * c[i]) - r(x2 * sn[i]));
                            hi[i] = r(r(x2 * c[i + half]) + r(x1 * sn[i + half]));
                        }
                    } else {
                        for i in 0..half {
                            let (x1, x2) = (lo[i], hi[i]);
                            lo[i] = x1 * c[i] - x2 * sn[i];
                            hi[i] = x2 * c[i + half] + x1 * sn[i + half];
                        }
                    }
                }
            });
        out
    }
    match &x.data {
        TensorData::F32(v) => Ok(finish(dtype, x.shape.clone(), run(v, &setup, dtype))),
        TensorData::F64(v) => Ok(finish(dtype, x.shape.clone(), run(v, &setup, dtype))),
        _ => Err(float_kind_error("Rope", "input", x)),
    }
}

/// What `Rope` and `RopeGrad` share: the checked sizes, the positions, and
/// the cos/sin tables.
pub(super) struct RopeSetup {
    pub seq: usize,
    pub hidden: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    /// 1 when every row uses positions `[seq]`, else the batch.
    pub pos_batch: usize,
    /// `[positions, rotary_dim]` cos and sin (see `ir::rope::cos_sin`).
    pub cos_sin: Arc<(Vec<f32>, Vec<f32>)>,
}

impl RopeSetup {
    pub(super) fn new(
        op: &str,
        x: &Tensor,
        position_ids: Option<&Tensor>,
        attrs: &RopeAttrs,
    ) -> Result<RopeSetup, String> {
        let (batch, seq, hidden) = match *x.shape.as_slice() {
            [b, s, h] => (b, s, h),
            _ => {
                return Err(format!(
                    "{op} input must be [batch, seq, heads*head_dim], got {:?}",
                    x.shape
                ))
            }
        };
        let (heads, hd, rd) = (attrs.num_heads, attrs.head_dim, attrs.rotary_dim);
        if heads.checked_mul(hd) != Some(hidden) {
            return Err(format!(
                "{op} input hidden size {hidden} is not heads ({heads}) × head_dim ({hd})"
            ));
        }
        if rd > hd || rd % 2 != 0 {
            return Err(format!(
                "{op} rotary_dim {rd} must be even and at most head_dim {hd}"
            ));
        }
        let (positions, pos_batch): (Vec<i64>, usize) = match position_ids {
            None => ((0..seq as i64).collect(), 1),
            Some(p) => {
                let ids = p.as_i64().ok_or_else(|| {
                    format!("{op} position_ids must be integers, got {}", p.dtype)
                })?;
                match *p.shape.as_slice() {
                    [s] if s == seq => (ids.to_vec(), 1),
                    [pb, s] if s == seq && (pb == batch || pb == 1) => (ids.to_vec(), pb),
                    _ => {
                        return Err(format!(
                            "{op} position_ids of shape {:?} do not match [batch={batch}, seq={seq}] or [seq]",
                            p.shape
                        ))
                    }
                }
            }
        };
        let seq_len = positions.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
        Ok(RopeSetup {
            seq,
            hidden,
            head_dim: hd,
            rotary_dim: rd,
            pos_batch,
            cos_sin: rope_tables(attrs, positions, seq_len),
        })
    }

    /// The table row of activation row `row` (`batch·seq + s`).
    #[inline]
    pub(super) fn position_row(&self, row: usize) -> usize {
        if self.pos_batch == 1 {
            row % self.seq
        } else {
            row
        }
    }

    /// The tables in the compute type, rounded to `dtype`'s precision (a
    /// half-precision model holds its cos/sin in half precision).
    pub(super) fn tables<T: Real>(&self, dtype: DType) -> (Vec<T>, Vec<T>) {
        let conv = |t: &[f32]| -> Vec<T> {
            t.iter()
                .map(|&v| T::round_one(dtype, T::from_f64(v as f64)))
                .collect()
        };
        (conv(&self.cos_sin.0), conv(&self.cos_sin.1))
    }
}

/// `ir::rope::cos_sin`, cached: a training step asks for the same tables
/// once per Rope node and once per RopeGrad node, and computing them is
/// most of such a node's cost. The last few distinct requests are kept.
fn rope_tables(
    attrs: &RopeAttrs,
    positions: Vec<i64>,
    seq_len: usize,
) -> Arc<(Vec<f32>, Vec<f32>)> {
    type Key = (RopeAttrs, Vec<i64>, usize);
    type Cache = Vec<(Key, Arc<(Vec<f32>, Vec<f32>)>)>;
    const KEEP: usize = 4;
    static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(Vec::new());
    let key = (attrs.clone(), positions, seq_len);
    if let Ok(cache) = CACHE.lock() {
        if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
            return t.clone();
        }
    }
    let t = Arc::new(crate::ir::rope::cos_sin(attrs, &key.1, seq_len));
    if let Ok(mut cache) = CACHE.lock() {
        if cache.len() >= KEEP {
            cache.remove(0);
        }
        cache.push((key, t.clone()));
    }
    t
}

/// LLaMA self-attention on projected, rotated `q [batch, seq, heads*hd]`
/// and `k, v [batch, kv_seq, kv_heads*hd]`: full causal (when kv_seq >
/// seq, the frontier is aligned bottom-right, as with a KV cache), GQA
/// (query head h reads kv head `h / (heads/kv_heads)`), scores scaled by
/// `attrs.scale`. Output `[batch, seq, heads*hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<Tensor, String> {
    attention_impl(q, k, v, attrs, false).map(|(out, _)| out)
}

/// [`attention`] that also returns the log-sum-exp of each query row's
/// scaled scores over the keys it sees, `[batch, heads, seq]` in q's dtype
/// (for S²-Attn heads, over the row's group). The output is the very same
/// computation as `attention`'s, so the two agree bit for bit.
pub(super) fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<(Tensor, Tensor), String> {
    let (out, lse) = attention_impl(q, k, v, attrs, true)?;
    let lse = lse.ok_or_else(|| "Attention: the kernel did not report lse".to_string())?;
    Ok((out, lse))
}

fn attention_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>), String> {
    const OP: &str = "Attention";
    let (heads, kv_heads, hd) = (attrs.num_heads, attrs.num_kv_heads, attrs.head_dim);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{OP} heads ({heads}) must be a multiple of kv_heads ({kv_heads})"
        ));
    }
    let dims3 = |t: &Tensor, h: usize, name: &str| match *t.shape.as_slice() {
        [b, s, w] if Some(w) == h.checked_mul(hd) => Ok((b, s)),
        _ => Err(format!(
            "{OP} {name} must be [batch, seq, {h}×{hd}], got {:?}",
            t.shape
        )),
    };
    let (batch, q_len) = dims3(q, heads, "q")?;
    let (kb, kv_len) = dims3(k, kv_heads, "k")?;
    let (vb, v_len) = dims3(v, kv_heads, "v")?;
    if kb != batch || vb != batch || v_len != kv_len || kv_len < q_len {
        return Err(format!(
            "{OP} shapes do not agree: q {:?}, k {:?}, v {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    if !same_data_kind(q, k) || !same_data_kind(q, v) {
        return Err(format!(
            "{OP} q ({}), k ({}) and v ({}) must have one type",
            q.dtype, k.dtype, v.dtype
        ));
    }
    let causal_offset = match attrs.pattern {
        AttentionPattern::FullCausal => Some(kv_len - q_len),
        AttentionPattern::ShiftedSparse { group, wrap } => {
            return shifted_sparse_attention(q, k, v, attrs, group, wrap, want_lse);
        }
    };
    fn run<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        (batch, heads, kv_heads, hd, q_len, kv_len): (usize, usize, usize, usize, usize, usize),
        scale: f32,
        causal_offset: Option<usize>,
        want_lse: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let p = AttnProblem {
            q,
            q_layout: HeadLayout::bshd(q_len, heads, hd),
            k,
            k_layout: HeadLayout::bshd(kv_len, kv_heads, hd),
            v,
            v_layout: HeadLayout::bshd(kv_len, kv_heads, hd),
            batch,
            q_heads: heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim: hd,
            v_head_dim: hd,
            scale: T::from_f64(scale as f64),
            softcap: T::ZERO,
            causal_offset,
            bias: None,
        };
        let mut out = T::zeroed(q.len());
        let mut lse = want_lse.then(|| T::zeroed(batch * heads * q_len));
        let lse_layout = LseLayout {
            batch: heads * q_len,
            head: q_len,
        };
        flash_attention(
            &p,
            &mut out,
            HeadLayout::bshd(q_len, heads, hd),
            lse.as_deref_mut().map(|l| (l, lse_layout)),
        );
        (out, lse)
    }
    let dims = (batch, heads, kv_heads, hd, q_len, kv_len);
    let lse_shape = vec![batch, heads, q_len];
    match (&q.data, &k.data, &v.data) {
        (TensorData::F32(a), TensorData::F32(b), TensorData::F32(c)) => {
            let (out, lse) = run(a, b, c, dims, attrs.scale, causal_offset, want_lse);
            Ok(finish_with_lse(q, out, lse, lse_shape))
        }
        (TensorData::F64(a), TensorData::F64(b), TensorData::F64(c)) => {
            let (out, lse) = run(a, b, c, dims, attrs.scale, causal_offset, want_lse);
            Ok(finish_with_lse(q, out, lse, lse_shape))
        }
        _ => Err(float_kind_error(OP, "q", q)),
    }
}

/// The output tensor (q's dtype and shape) and, when computed, the lse tensor.
fn finish_with_lse<T: Real>(
    q: &Tensor,
    out: Vec<T>,
    lse: Option<Vec<T>>,
    lse_shape: Vec<usize>,
) -> (Tensor, Option<Tensor>) {
    (
        finish(q.dtype, q.shape.clone(), out),
        lse.map(|l| finish(q.dtype, lse_shape, l)),
    )
}

/// LongLoRA's S²-Attn on `[batch, seq, heads*hd]` q/k/v (see
/// `AttentionPattern::ShiftedSparse`): the first half of the heads attends
/// causally within groups [0,G), [G,2G), …; the second half within
/// [0,G/2), [G/2,3G/2), … or, with `wrap`, within G-groups of the sequence
/// rolled by −G/2. Each group is one small causal problem for the tiled
/// kernel, so memory stays linear in the length and only the tiles inside
/// groups are computed (about G/L of full attention's work).
fn shifted_sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
    group: GroupSize,
    wrap: bool,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>), String> {
    const OP: &str = "Attention (shifted sparse)";
    let (heads, kv_heads, hd) = (attrs.num_heads, attrs.num_kv_heads, attrs.head_dim);
    if heads % 2 != 0 {
        return Err(format!(
            "{OP} splits the heads in halves, but there are {heads} (odd); use full causal attention for this model"
        ));
    }
    let (batch, len) = (q.shape[0], q.shape[1]);
    if k.shape[1] != len {
        return Err(format!(
            "{OP} is for training without a KV cache: q has {len} positions, k {} ({:?})",
            k.shape[1], k.shape
        ));
    }
    if len == 0 {
        let lse = want_lse.then(|| Tensor::zeros(q.dtype, vec![batch, heads, 0]));
        return Ok((q.clone(), lse));
    }
    let g = group.tokens(len);
    if g > len {
        return Err(format!(
            "{OP}: the group size {g} exceeds the sequence length {len}; use sequences of at least {g} tokens or a smaller group_size"
        ));
    }
    fn run<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        (batch, heads, kv_heads, hd, len): (usize, usize, usize, usize, usize),
        scale: f32,
        (g, wrap): (usize, bool),
        want_lse: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let shift = g / 2;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let roll = |t: &[T], width: usize, back: bool| -> Vec<T> {
            let mut out = vec![T::ZERO; t.len()];
            for b in 0..batch {
                for p in 0..len {
                    let i = (p + shift) % len;
                    let (src, dst) = if back { (p, i) } else { (i, p) };
                    let (s0, d0) = ((b * len + src) * width, (b * len + dst) * width);
                    out[d0..d0 + width].copy_from_slice(&t[s0..s0 + width]);
                }
            }
            out
        };
        let groups = |start: usize| -> Vec<(usize, usize)> {
            let mut v = Vec::new();
            if start > 0 {
                v.push((0, start.min(len)));
            }
            let mut a = start;
            while a < len {
                v.push((a, (a + g).min(len)));
                a += g;
            }
            v
        };
        let rolled = wrap.then(|| (roll(q, qw, false), roll(k, kw, false), roll(v, kw, false)));
        let mut out = T::zeroed(q.len());
        let mut shifted_out = wrap.then(|| vec![T::ZERO; q.len()]);
        let lse_len = batch * heads * len;
        let mut lse = want_lse.then(|| T::zeroed(lse_len));
        // With wrap, the shifted heads' lse is in rolled positions, like their output.
        let mut shifted_lse = (want_lse && wrap).then(|| vec![T::ZERO; lse_len]);
        let lse_layout = LseLayout {
            batch: heads * len,
            head: len,
        };
        let per_kv = heads / kv_heads;
        let half = heads / 2;
        // One sub-problem per (kv head, head half, group): the query heads
        // of one kv head that lie in one half are contiguous.
        for kvh in 0..kv_heads {
            let (h_lo, h_hi) = (kvh * per_kv, (kvh + 1) * per_kv);
            for shifted in [false, true] {
                let (a, b) = if shifted {
                    (h_lo.max(half), h_hi)
                } else {
                    (h_lo, h_hi.min(half))
                };
                if a >= b {
                    continue;
                }
                let (src_q, src_k, src_v, dst, dst_lse, bounds) = match (shifted, &rolled) {
                    (false, _) => (q, k, v, &mut out, lse.as_deref_mut(), groups(0)),
                    (true, None) => (q, k, v, &mut out, lse.as_deref_mut(), groups(shift)),
                    (true, Some((rq, rk, rv))) => (
                        &rq[..],
                        &rk[..],
                        &rv[..],
                        shifted_out.as_mut().expect("allocated with wrap"),
                        shifted_lse.as_deref_mut(),
                        groups(0),
                    ),
                };
                let mut dst_lse = dst_lse;
                for (s, e) in bounds {
                    let n = e - s;
                    let p = AttnProblem {
                        q: &src_q[s * qw + a * hd..],
                        q_layout: HeadLayout::bshd(len, heads, hd),
                        k: &src_k[s * kw + kvh * hd..],
                        k_layout: HeadLayout::bshd(len, kv_heads, hd),
                        v: &src_v[s * kw + kvh * hd..],
                        v_layout: HeadLayout::bshd(len, kv_heads, hd),
                        batch,
                        q_heads: b - a,
                        kv_heads: 1,
                        q_len: n,
                        kv_len: n,
                        head_dim: hd,
                        v_head_dim: hd,
                        scale: T::from_f64(scale as f64),
                        softcap: T::ZERO,
                        causal_offset: Some(0),
                        bias: None,
                    };
                    flash_attention(
                        &p,
                        &mut dst[s * qw + a * hd..],
                        HeadLayout::bshd(len, heads, hd),
                        dst_lse
                            .as_deref_mut()
                            .map(|l| (&mut l[a * len + s..], lse_layout)),
                    );
                }
            }
        }
        if let Some(so) = shifted_out {
            let back = roll(&so, qw, true);
            for row in 0..batch * len {
                let r = row * qw + half * hd;
                out[r..(row + 1) * qw].copy_from_slice(&back[r..(row + 1) * qw]);
            }
        }
        if let (Some(lse), Some(sl)) = (lse.as_mut(), shifted_lse.as_ref()) {
            for b in 0..batch {
                for h in half..heads {
                    let base = b * lse_layout.batch + h * lse_layout.head;
                    for p in 0..len {
                        lse[base + (p + shift) % len] = sl[base + p];
                    }
                }
            }
        }
        (out, lse)
    }
    let dims = (batch, heads, kv_heads, hd, len);
    let lse_shape = vec![batch, heads, len];
    match (&q.data, &k.data, &v.data) {
        (TensorData::F32(a), TensorData::F32(b), TensorData::F32(c)) => {
            let (out, lse) = run(a, b, c, dims, attrs.scale, (g, wrap), want_lse);
            Ok(finish_with_lse(q, out, lse, lse_shape))
        }
        (TensorData::F64(a), TensorData::F64(b), TensorData::F64(c)) => {
            let (out, lse) = run(a, b, c, dims, attrs.scale, (g, wrap), want_lse);
            Ok(finish_with_lse(q, out, lse, lse_shape))
        }
        _ => Err(float_kind_error(OP, "q", q)),
    }
}

/// `x [..., in] · Wᵀ + bias` with W `[out, in]` (Hugging Face layout), read
/// through a transposed view (no copy of W).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, String> {
    const OP: &str = "Linear";
    let (out_f, in_f) = match *weight.shape.as_slice() {
        [o, i] => (o, i),
        _ => {
            return Err(format!(
                "{OP} weight must be 2-D [out, in], got {:?}",
                weight.shape
            ))
        }
    };
    if x.shape.last() != Some(&in_f) {
        return Err(format!(
            "{OP} input {:?} does not end in the weight's in-features {in_f} (weight {:?})",
            x.shape, weight.shape
        ));
    }
    if let Some(b) = bias {
        if b.numel() != out_f || b.rank() != 1 {
            return Err(format!(
                "{OP} bias of shape {:?} does not match out-features {out_f}",
                b.shape
            ));
        }
        if !same_data_kind(x, b) {
            return Err(format!(
                "{OP} bias ({}) and input ({}) differ in type",
                b.dtype, x.dtype
            ));
        }
    }
    if !same_data_kind(x, weight) {
        return Err(format!(
            "{OP} input ({}) and weight ({}) have different types",
            x.dtype, weight.dtype
        ));
    }
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = out_f;
    }
    output_numel(&shape, x.dtype.size().max(4), "Linear output")?;
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    fn run<T: Real>(
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        rows: usize,
        in_f: usize,
        out_f: usize,
    ) -> Vec<T> {
        let mut out = T::zeroed(rows * out_f);
        if let Some(b) = b {
            for row in out.chunks_mut(out_f.max(1)) {
                row.copy_from_slice(&b[..row.len()]);
            }
        }
        gemm_strided(
            rows,
            out_f,
            in_f,
            &mut out,
            out_f,
            b.is_some(),
            MatRef::row_major(x, 0, in_f),
            MatRef::row_major(w, 0, in_f).t(),
            T::ONE,
            true,
        );
        out
    }
    let dtype = promote(x.dtype, weight.dtype);
    match (&x.data, &weight.data) {
        (TensorData::F32(a), TensorData::F32(w)) => Ok(finish(
            dtype,
            shape,
            run(a, w, bias.and_then(|b| b.as_f32()), rows, in_f, out_f),
        )),
        (TensorData::F64(a), TensorData::F64(w)) => Ok(finish(
            dtype,
            shape,
            run(
                a,
                w,
                bias.and_then(|b| f64::slice(&b.data)),
                rows,
                in_f,
                out_f,
            ),
        )),
        _ => Err(float_kind_error(OP, "input", x)),
    }
}

/// LoRA projection `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias)` with W `[out, in]`,
/// A `[rank, in]`, B `[out, rank]` (PEFT layouts), all read through
/// transposed views (no copy of W). Inference only: no dropout.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    lora_a: &Tensor,
    lora_b: &Tensor,
    bias: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor, String> {
    const OP: &str = "LoraLinear";
    let (out_f, in_f) = match *weight.shape.as_slice() {
        [o, i] => (o, i),
        _ => {
            return Err(format!(
                "{OP} weight must be 2-D [out, in], got {:?}",
                weight.shape
            ))
        }
    };
    let rank = match *lora_a.shape.as_slice() {
        [r, i] if i == in_f => r,
        _ => {
            return Err(format!(
                "{OP} lora_A must be [rank, {in_f}] (in-features of weight {:?}), got {:?}",
                weight.shape, lora_a.shape
            ))
        }
    };
    if lora_b.shape != [out_f, rank] {
        return Err(format!(
            "{OP} lora_B must be [{out_f}, {rank}] (out-features × rank of lora_A {:?}), got {:?}",
            lora_a.shape, lora_b.shape
        ));
    }
    if !same_data_kind(x, lora_a) || !same_data_kind(x, lora_b) {
        return Err(format!(
            "{OP} input ({}), lora_A ({}) and lora_B ({}) must have the same type",
            x.dtype, lora_a.dtype, lora_b.dtype
        ));
    }
    let mut y = linear(x, weight, bias)?;
    let down = linear(x, lora_a, None)?;
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    #[allow(clippy::too_many_arguments)]
    fn up<T: Real>(
        y: &mut [T],
        down: &[T],
        b: &[T],
        rows: usize,
        rank: usize,
        out_f: usize,
        scale: f32,
        dtype: DType,
    ) {
        gemm_strided(
            rows,
            out_f,
            rank,
            y,
            out_f,
            true,
            MatRef::row_major(down, 0, rank),
            MatRef::row_major(b, 0, rank).t(),
            T::from_f64(scale as f64),
            true,
        );
        T::round_storage(dtype, y);
    }
    let dtype = y.dtype;
    match (&mut y.data, &down.data, &lora_b.data) {
        (TensorData::F32(y), TensorData::F32(d), TensorData::F32(b)) => {
            up(y, d, b, rows, rank, out_f, scale, dtype)
        }
        (TensorData::F64(y), TensorData::F64(d), TensorData::F64(b)) => {
            up(y, d, b, rows, rank, out_f, scale, dtype)
        }
        _ => return Err(float_kind_error(OP, "input", x)),
    }
    if let TensorData::F32(v) = down.data {
        super::pool::recycle(v);
    }
    Ok(y)
}

/// `silu(gate) · up` with `silu(g) = g / (1 + exp(-g))`; shapes must match.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "SwiGlu";
    if gate.shape != up.shape {
        return Err(format!(
            "{OP} gate {:?} and up {:?} must have the same shape",
            gate.shape, up.shape
        ));
    }
    let dtype = promote(gate.dtype, up.dtype);
    fn run<T: Real>(g: &[T], u: &[T], gdt: DType) -> Vec<T> {
        let mut out = T::zeroed(g.len());
        let half = matches!(gdt, DType::F16 | DType::BF16);
        out.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(
                g.par_chunks(MIN_TASK_ELEMS)
                    .zip(u.par_chunks(MIN_TASK_ELEMS)),
            )
            .for_each(|(o, (g, u))| {
                if half {
                    // silu is rounded to the gate's precision before the
                    // product, as a half-precision model computes it.
                    T::silu(g, o);
                    for (o, &u) in o.iter_mut().zip(u) {
                        *o = T::round_one(gdt, *o) * u;
                    }
                } else {
                    T::silu_mul(g, u, o);
                }
            });
        out
    }
    match (&gate.data, &up.data) {
        (TensorData::F32(g), TensorData::F32(u)) => {
            Ok(finish(dtype, gate.shape.clone(), run(g, u, gate.dtype)))
        }
        (TensorData::F64(g), TensorData::F64(u)) => {
            Ok(finish(dtype, gate.shape.clone(), run(g, u, gate.dtype)))
        }
        _ => Err(format!(
            "{OP} needs float gate and up of one type, got {} and {}",
            gate.dtype, up.dtype
        )),
    }
}

#[cfg(test)]
// Reference implementations read best as index loops.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::super::linalg::testutil::{assert_close, Rng};
    use super::*;
    use crate::ir::RopeScaling;

    fn t64(shape: &[usize], v: Vec<f64>) -> Tensor {
        Tensor {
            dtype: DType::F64,
            shape: shape.to_vec(),
            data: TensorData::F64(v),
        }
    }

    // --- softmax -----------------------------------------------------------

    fn ref_softmax(x: &[f64], shape: &[usize], axis: usize, log: bool) -> Vec<f64> {
        let len = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        let outer: usize = shape[..axis].iter().product();
        let mut out = vec![0.0; x.len()];
        for o in 0..outer {
            for t in 0..inner {
                let at = |c: usize| o * len * inner + c * inner + t;
                let max = (0..len).map(|c| x[at(c)]).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = (0..len).map(|c| (x[at(c)] - max).exp()).sum();
                for c in 0..len {
                    out[at(c)] = if log {
                        x[at(c)] - max - sum.ln()
                    } else {
                        (x[at(c)] - max).exp() / sum
                    };
                }
            }
        }
        out
    }

    #[test]
    fn softmax_matches_reference_on_every_axis() {
        let mut rng = Rng(10);
        for shape in [vec![3, 4, 5], vec![2, 130], vec![7]] {
            let x = rng.tensor(&shape);
            for axis in -(shape.len() as i64)..shape.len() as i64 {
                for log in [false, true] {
                    let got = softmax(&x, axis, log).unwrap();
                    let ax = if axis < 0 {
                        axis + shape.len() as i64
                    } else {
                        axis
                    } as usize;
                    let want = ref_softmax(&x.to_f64_vec(), &shape, ax, log);
                    assert_close(
                        &got.to_f64_vec(),
                        &want,
                        1e-6,
                        &format!("{shape:?} axis {axis} log {log}"),
                    );
                }
            }
        }
        let x = rng.tensor(&[4, 6]);
        let x64 = t64(&[4, 6], x.to_f64_vec());
        let got = softmax(&x64, 1, false).unwrap();
        assert_eq!(got.dtype, DType::F64);
        assert_close(
            &got.to_f64_vec(),
            &ref_softmax(&x.to_f64_vec(), &[4, 6], 1, false),
            1e-14,
            "f64",
        );
        assert!(softmax(&x, 2, false).unwrap_err().contains("out of range"));
    }

    #[test]
    fn softmax_with_neg_infinity() {
        let inf = f32::INFINITY;
        let x = Tensor::f32(vec![2, 3], vec![-inf, 0.0, 1.0, -inf, -inf, -inf]);
        let y = softmax(&x, -1, false).unwrap().to_f64_vec();
        let (e0, e1) = (1.0f64, 1f64.exp());
        assert_eq!(y[0], 0.0);
        assert!((y[1] - e0 / (e0 + e1)).abs() < 1e-7);
        assert!((y[2] - e1 / (e0 + e1)).abs() < 1e-7);
        // A fully masked row is NaN, as in onnxruntime and torch.
        assert!(y[3..].iter().all(|v| v.is_nan()));
        let l = softmax(&x, -1, true).unwrap().to_f64_vec();
        assert_eq!(l[0], f64::NEG_INFINITY);
        assert!((l[2] - (e1 / (e0 + e1)).ln()).abs() < 1e-6);
    }

    // --- reduce ------------------------------------------------------------

    fn ref_reduce(x: &[f64], shape: &[usize], axes: &[usize], op: ReduceOp) -> Vec<f64> {
        let rank = shape.len();
        let kept: Vec<usize> = (0..rank).filter(|d| !axes.contains(d)).collect();
        let out_n: usize = kept.iter().map(|&d| shape[d]).product();
        let mut groups: Vec<Vec<f64>> = vec![Vec::new(); out_n];
        for (flat, &v) in x.iter().enumerate() {
            let mut idx = vec![0; rank];
            let mut rem = flat;
            for d in (0..rank).rev() {
                idx[d] = rem % shape[d];
                rem /= shape[d];
            }
            let o = kept.iter().fold(0, |acc, &d| acc * shape[d] + idx[d]);
            groups[o].push(v);
        }
        groups
            .iter()
            .map(|g| match op {
                ReduceOp::Sum => g.iter().sum(),
                ReduceOp::Mean => g.iter().sum::<f64>() / g.len() as f64,
                ReduceOp::Max => g.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::Min => g.iter().copied().fold(f64::INFINITY, f64::min),
            })
            .collect()
    }

    #[test]
    fn reduce_matches_reference() {
        let mut rng = Rng(11);
        let shape = [2, 3, 4];
        let x = rng.tensor(&shape);
        let axes_cases: &[Option<&[i64]>] = &[
            Some(&[0]),
            Some(&[1]),
            Some(&[2]),
            Some(&[-1]),
            Some(&[0, 2]),
            Some(&[2, 0]),
            Some(&[-2, -1]),
            Some(&[0, 1, 2]),
            Some(&[]),
            None,
        ];
        for op in [ReduceOp::Mean, ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            for &axes in axes_cases {
                for keepdims in [false, true] {
                    let got = reduce(&x, op, axes, keepdims, false).unwrap();
                    let norm: Vec<usize> = match axes {
                        Some(a) if !a.is_empty() => {
                            a.iter().map(|&v| ((v + 3) % 3) as usize).collect()
                        }
                        _ => vec![0, 1, 2],
                    };
                    let want_shape: Vec<usize> = (0..3)
                        .filter_map(|d| {
                            if !norm.contains(&d) {
                                Some(shape[d])
                            } else if keepdims {
                                Some(1)
                            } else {
                                None
                            }
                        })
                        .collect();
                    let what = format!("{op:?} axes {axes:?} keepdims {keepdims}");
                    assert_eq!(got.shape, want_shape, "{what}");
                    let want = ref_reduce(&x.to_f64_vec(), &shape, &norm, op);
                    assert_close(&got.to_f64_vec(), &want, 1e-6, &what);
                }
            }
        }
    }

    #[test]
    fn reduce_noop_empty_int_and_errors() {
        let x = Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(reduce(&x, ReduceOp::Sum, None, true, true).unwrap(), x);
        assert_eq!(reduce(&x, ReduceOp::Sum, Some(&[]), true, true).unwrap(), x);
        let s = reduce(&x, ReduceOp::Sum, None, false, false).unwrap();
        assert_eq!((s.shape.clone(), s.to_f64_vec()), (vec![], vec![10.0]));

        let e = Tensor::f32(vec![2, 0], vec![]);
        let r = |op| {
            reduce(&e, op, Some(&[1]), false, false)
                .unwrap()
                .to_f64_vec()
        };
        assert_eq!(r(ReduceOp::Sum), vec![0.0, 0.0]);
        assert_eq!(r(ReduceOp::Max), vec![f64::NEG_INFINITY; 2]);
        assert_eq!(r(ReduceOp::Min), vec![f64::INFINITY; 2]);
        assert!(r(ReduceOp::Mean).iter().all(|v| v.is_nan()));
        let z = reduce(&e, ReduceOp::Sum, Some(&[0]), true, false).unwrap();
        assert_eq!(z.shape, vec![1, 0]);

        let i = Tensor::i64(vec![2, 3], vec![1, -2, 3, 4, 5, -7]);
        let sum = reduce(&i, ReduceOp::Sum, Some(&[1]), false, false).unwrap();
        assert_eq!(sum.as_i64().unwrap(), &[2, 2]);
        let mean = reduce(&i, ReduceOp::Mean, Some(&[0]), false, false).unwrap();
        assert_eq!(mean.as_i64().unwrap(), &[2, 1, -2]);
        let max = reduce(&i, ReduceOp::Max, None, true, false).unwrap();
        assert_eq!(
            (max.shape.clone(), max.as_i64().unwrap()),
            (vec![1, 1], &[5i64][..])
        );

        assert!(reduce(&x, ReduceOp::Sum, Some(&[1, -1]), true, false)
            .unwrap_err()
            .contains("twice"));
        assert!(reduce(&x, ReduceOp::Sum, Some(&[2]), true, false)
            .unwrap_err()
            .contains("out of range"));
        let b = Tensor::bool(vec![2, 2], vec![true, false, false, false]);
        let any = reduce(&b, ReduceOp::Max, Some(&[1]), false, false).unwrap();
        assert_eq!(any.as_bool().unwrap(), &[true, false]);
        let all = reduce(&b, ReduceOp::Min, Some(&[0]), false, false).unwrap();
        assert_eq!(all.as_bool().unwrap(), &[false, false]);
        assert!(reduce(&b, ReduceOp::Sum, None, false, false).is_err());
        let nan = Tensor::f32(vec![3], vec![1.0, f32::NAN, 2.0]);
        assert!(reduce(&nan, ReduceOp::Max, None, false, false)
            .unwrap()
            .to_f64_vec()[0]
            .is_nan());
    }

    // --- RMSNormalization --------------------------------------------------

    #[test]
    fn rms_normalization_matches_reference() {
        let mut rng = Rng(12);
        let shape = [2, 3, 4];
        let x = rng.tensor(&shape);
        let xv = x.to_f64_vec();
        let cases: &[(i64, &[usize])] = &[
            (-1, &[4]),
            (2, &[1, 4]),
            (1, &[3, 4]),
            (1, &[1, 4]),
            (1, &[3, 1]),
            (0, &[2, 3, 4]),
        ];
        for &(axis, sshape) in cases {
            let scale = rng.tensor(sshape);
            let sv = scale.to_f64_vec();
            let got = rms_normalization(&x, &scale, axis, 1e-5, 1).unwrap();
            let ax = ((axis + 3) % 3) as usize;
            let row: usize = shape[ax..].iter().product();
            let sstr = super::super::linalg::broadcast_strides(sshape, &shape);
            let mut want = vec![0.0; xv.len()];
            for (r, chunk) in xv.chunks(row).enumerate() {
                let ms = chunk.iter().map(|v| v * v).sum::<f64>() / row as f64;
                let inv = 1.0 / (ms + 1e-5f32 as f64).sqrt();
                for c in 0..row {
                    let flat = r * row + c;
                    let idx = [flat / 12, (flat / 4) % 3, flat % 4];
                    let so: usize = idx.iter().zip(&sstr).map(|(i, s)| i * s).sum();
                    want[flat] = chunk[c] * inv * sv[so];
                }
            }
            assert_close(
                &got.to_f64_vec(),
                &want,
                1e-6,
                &format!("axis {axis} scale {sshape:?}"),
            );
        }
        let bad = rng.tensor(&[3]);
        assert!(rms_normalization(&x, &bad, -1, 1e-5, 1)
            .unwrap_err()
            .contains("broadcast"));
        assert!(rms_normalization(&x, &rng.tensor(&[4]), -1, 1e-5, 10)
            .unwrap_err()
            .contains("stash_type"));
    }

    // --- RotaryEmbedding ---------------------------------------------------

    struct RotCase {
        /// [b, h, s, d] when true, else [b, s, h*d].
        four_d: bool,
        b: usize,
        h: usize,
        s: usize,
        d: usize,
        rot: usize,
        interleaved: bool,
        /// (max positions, position-id batch) when position ids are used,
        /// else the cache batch.
        pos: Option<(usize, usize)>,
        cache_batch: usize,
    }

    /// ONNX reference semantics (op_rotary_embedding.py), plain loops, f64.
    fn ref_rotary(
        c: &RotCase,
        x: &[f64],
        cos: &[f64],
        sin: &[f64],
        pos: Option<&[i64]>,
    ) -> Vec<f64> {
        let half = c.rot / 2;
        let at = |b: usize, s: usize, h: usize, i: usize| {
            if c.four_d {
                ((b * c.h + h) * c.s + s) * c.d + i
            } else {
                ((b * c.s + s) * c.h + h) * c.d + i
            }
        };
        let mut out = x.to_vec();
        for b in 0..c.b {
            for s in 0..c.s {
                let row = match (pos, c.pos) {
                    (Some(p), Some((_, pb))) => p[if pb == 1 { s } else { b * c.s + s }] as usize,
                    _ => (if c.cache_batch == 1 { 0 } else { b }) * c.s + s,
                };
                for h in 0..c.h {
                    for i in 0..half {
                        let (ia, ib) = if c.interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        let (x1, x2) = (x[at(b, s, h, ia)], x[at(b, s, h, ib)]);
                        let (co, si) = (cos[row * half + i], sin[row * half + i]);
                        out[at(b, s, h, ia)] = co * x1 - si * x2;
                        out[at(b, s, h, ib)] = si * x1 + co * x2;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rotary_embedding_matches_reference() {
        let mut rng = Rng(13);
        let mut cases = Vec::new();
        for four_d in [true, false] {
            for interleaved in [false, true] {
                for (rot, pos, cache_batch) in [
                    (8, None, 2),
                    (8, None, 1),
                    (4, None, 2),
                    (8, Some((16, 2)), 0),
                    (4, Some((9, 2)), 0),
                    (6, Some((12, 1)), 0),
                ] {
                    cases.push(RotCase {
                        four_d,
                        b: 2,
                        h: 3,
                        s: 5,
                        d: 8,
                        rot,
                        interleaved,
                        pos,
                        cache_batch,
                    });
                }
            }
        }
        for c in &cases {
            let xshape = if c.four_d {
                vec![c.b, c.h, c.s, c.d]
            } else {
                vec![c.b, c.s, c.h * c.d]
            };
            let x = rng.tensor(&xshape);
            let half = c.rot / 2;
            let cshape = match c.pos {
                Some((max, _)) => vec![max, half],
                None => vec![c.cache_batch, c.s, half],
            };
            let cos = rng.tensor(&cshape);
            let sin = rng.tensor(&cshape);
            let pos = c.pos.map(|(max, pb)| {
                let ids: Vec<i64> = (0..pb * c.s).map(|i| ((i * 7 + 3) % max) as i64).collect();
                Tensor::i64(vec![pb, c.s], ids)
            });
            let got = rotary_embedding(
                &x,
                &cos,
                &sin,
                pos.as_ref(),
                c.interleaved,
                (!c.four_d).then_some(c.h as i64),
                if c.rot == c.d { 0 } else { c.rot as i64 },
            )
            .unwrap();
            let want = ref_rotary(
                c,
                &x.to_f64_vec(),
                &cos.to_f64_vec(),
                &sin.to_f64_vec(),
                pos.as_ref().and_then(|p| p.as_i64()),
            );
            let what = format!(
                "4d {} interleaved {} rot {} pos {:?} cache batch {}",
                c.four_d, c.interleaved, c.rot, c.pos, c.cache_batch
            );
            assert_eq!(got.shape, xshape, "{what}");
            assert_close(&got.to_f64_vec(), &want, 1e-6, &what);
        }
    }

    #[test]
    fn rotary_embedding_errors() {
        let x = Tensor::f32(vec![1, 2, 8], vec![0.0; 16]);
        let c = Tensor::f32(vec![4, 4], vec![0.0; 16]);
        let p = Tensor::i64(vec![1, 2], vec![0, 4]);
        let e = rotary_embedding(&x, &c, &c, Some(&p), false, None, 0).unwrap_err();
        assert!(e.contains("num_heads"), "{e}");
        let e = rotary_embedding(&x, &c, &c, Some(&p), false, Some(1), 0).unwrap_err();
        assert!(e.contains("position id 4"), "{e}");
        let e = rotary_embedding(&x, &c, &c, Some(&p), false, Some(2), 0).unwrap_err();
        assert!(e.contains("rotary_embedding_dim/2"), "{e}");
    }

    /// Expected values from onnx's reference evaluator (onnx 1.20 in
    /// /work/pyenv), produced by:
    ///
    /// ```python
    /// def vals(shape, a, b):
    ///     n = int(np.prod(shape)); return np.sin(a*np.arange(n)+b).reshape(shape).astype(np.float32)
    /// x = vals([2,3,12], 0.37, 0.1)
    /// ang = 0.5*np.arange(5)[:,None]*(np.arange(2)[None,:]+1)
    /// cos = np.cos(ang).astype(np.float32); sin = np.sin(ang).astype(np.float32)
    /// pid = np.array([[0,2,4],[1,3,0]], dtype=np.int64)
    /// node = helper.make_node("RotaryEmbedding", ["x","cos","sin","pid"], ["y"],
    ///                         interleaved=1, num_heads=2, rotary_embedding_dim=4)
    /// # one-node opset-23 model, ReferenceEvaluator(model).run(None, {...})
    /// ```
    #[test]
    fn rotary_embedding_matches_onnx_reference_values() {
        let vals = |n: usize, a: f64, b: f64| -> Vec<f32> {
            (0..n).map(|i| (a * i as f64 + b).sin() as f32).collect()
        };
        let x = Tensor::f32(vec![2, 3, 12], vals(72, 0.37, 0.1));
        let ang = |p: usize, k: usize| 0.5 * p as f64 * (k + 1) as f64;
        let cos: Vec<f32> = (0..10).map(|i| ang(i / 2, i % 2).cos() as f32).collect();
        let sin: Vec<f32> = (0..10).map(|i| ang(i / 2, i % 2).sin() as f32).collect();
        let cos = Tensor::f32(vec![5, 2], cos);
        let sin = Tensor::f32(vec![5, 2], sin);
        let pid = Tensor::i64(vec![2, 3], vec![0, 2, 4, 1, 3, 0]);
        let got = rotary_embedding(&x, &cos, &sin, Some(&pid), true, Some(2), 4).unwrap();
        let want = [
            9.98334140e-02,
            4.52886283e-01,
            7.44643092e-01,
            9.35616016e-01,
            9.99957621e-01,
            9.28959727e-01,
            7.32231438e-01,
            4.36399072e-01,
            8.15021545e-02,
            -2.84425706e-01,
            -6.11857891e-01,
            -8.56477976e-01,
            2.92800784e-01,
            -1.35878563e+00,
            8.88935387e-01,
            -5.20467877e-01,
            -2.60157496e-01,
            1.06611691e-01,
            -3.82435918e-01,
            7.90974975e-01,
            -1.29952645e+00,
            4.36827481e-01,
            9.26415503e-01,
            7.27573276e-01,
            -2.46982336e-01,
            3.60142410e-01,
            -2.76945025e-01,
            6.23644412e-01,
            -8.59975696e-01,
            -9.86323893e-01,
            1.17084098e+00,
            -5.41006625e-01,
            1.91267759e-01,
            6.09389186e-01,
            1.13385022e-01,
            4.64995384e-01,
            2.10585147e-01,
            1.18655539e+00,
            -2.37213194e-01,
            1.34039807e+00,
            7.22881377e-01,
            4.24095839e-01,
            2.02209964e-01,
            -2.28492156e-01,
            3.90172213e-01,
            -9.90399003e-01,
            -9.87424135e-01,
            -9.77771580e-01,
            5.20098209e-01,
            -8.74763846e-01,
            2.27546066e-01,
            -1.53803557e-01,
            4.71017659e-01,
            7.58132219e-01,
            -9.30377126e-01,
            1.01098192e+00,
            -1.01332545e+00,
            -5.80969453e-01,
            4.17914540e-01,
            6.11104742e-02,
            -3.03964615e-01,
            -6.27899528e-01,
            -8.66851151e-01,
            -9.88478541e-01,
            -9.76320028e-01,
            -8.32021177e-01,
            -5.75112164e-01,
            -2.40364388e-01,
            1.26915559e-01,
            4.77018088e-01,
            7.62558460e-01,
            9.44890082e-01,
        ];
        assert_close(&got.to_f64_vec(), &want, 1e-6, "onnx reference");
    }

    // --- ONNX Attention ----------------------------------------------------

    /// Plain attention on [b, h, s, d] arrays in f64: scaled scores,
    /// softcap, additive bias, softmax, fully masked rows → 0.
    #[allow(clippy::too_many_arguments)]
    fn ref_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        (b, hq, hkv, sq, skv, d, dv): (usize, usize, usize, usize, usize, usize, usize),
        scale: f64,
        softcap: f64,
        bias: &dyn Fn(usize, usize, usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; b * hq * sq * dv];
        let group = hq / hkv;
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                for i in 0..sq {
                    let mut s = vec![0.0; skv];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let mut dot = 0.0;
                        for c in 0..d {
                            dot += q[((bi * hq + h) * sq + i) * d + c]
                                * k[((bi * hkv + kh) * skv + j) * d + c];
                        }
                        let mut x = dot * scale;
                        if softcap > 0.0 {
                            x = softcap * (x / softcap).tanh();
                        }
                        *sj = x + bias(bi, h, i, j);
                    }
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let w: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for c in 0..dv {
                        let mut acc = 0.0;
                        for j in 0..skv {
                            acc += w[j] * v[((bi * hkv + kh) * skv + j) * dv + c];
                        }
                        out[((bi * hq + h) * sq + i) * dv + c] = acc / sum;
                    }
                }
            }
        }
        out
    }

    /// [b, s, h*d] → [b, h, s, d].
    fn to_bhsd(x: &[f64], b: usize, s: usize, h: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for bi in 0..b {
            for si in 0..s {
                for hi in 0..h {
                    for c in 0..d {
                        out[((bi * h + hi) * s + si) * d + c] = x[((bi * s + si) * h + hi) * d + c];
                    }
                }
            }
        }
        out
    }

    fn to_bshd(x: &[f64], b: usize, h: usize, s: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for c in 0..d {
                        out[((bi * s + si) * h + hi) * d + c] = x[((bi * h + hi) * s + si) * d + c];
                    }
                }
            }
        }
        out
    }

    #[derive(Clone, Copy, Debug)]
    enum MaskKind {
        None,
        /// Bool mask of rank 2 [q, total].
        Bool2,
        /// Float mask [b, 1, q, total - 1] (shorter: last key padded masked).
        FloatShort4,
        /// Bool mask [hq, q, total] (rank 3: heads, not batch).
        Bool3,
    }

    #[derive(Clone, Copy, Debug)]
    struct AttnCase {
        three_d: bool,
        b: usize,
        hq: usize,
        hkv: usize,
        sq: usize,
        past: usize,
        skv: usize,
        d: usize,
        dv: usize,
        causal: bool,
        mask: MaskKind,
        softcap: f32,
        scale: Option<f32>,
    }

    fn run_attn_case(c: AttnCase, rng: &mut Rng) {
        let total = c.past + c.skv;
        let qb = rng.vec(c.b * c.hq * c.sq * c.d);
        let kb = rng.vec(c.b * c.hkv * c.skv * c.d);
        let vb = rng.vec(c.b * c.hkv * c.skv * c.dv);
        let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (q, k, v) = if c.three_d {
            (
                Tensor::f32(
                    vec![c.b, c.sq, c.hq * c.d],
                    to_bshd(&to64(&qb), c.b, c.hq, c.sq, c.d)
                        .iter()
                        .map(|&x| x as f32)
                        .collect(),
                ),
                Tensor::f32(
                    vec![c.b, c.skv, c.hkv * c.d],
                    to_bshd(&to64(&kb), c.b, c.hkv, c.skv, c.d)
                        .iter()
                        .map(|&x| x as f32)
                        .collect(),
                ),
                Tensor::f32(
                    vec![c.b, c.skv, c.hkv * c.dv],
                    to_bshd(&to64(&vb), c.b, c.hkv, c.skv, c.dv)
                        .iter()
                        .map(|&x| x as f32)
                        .collect(),
                ),
            )
        } else {
            (
                Tensor::f32(vec![c.b, c.hq, c.sq, c.d], qb.clone()),
                Tensor::f32(vec![c.b, c.hkv, c.skv, c.d], kb.clone()),
                Tensor::f32(vec![c.b, c.hkv, c.skv, c.dv], vb.clone()),
            )
        };
        let (pk, pv) = if c.past > 0 {
            (
                Some(rng.tensor(&[c.b, c.hkv, c.past, c.d])),
                Some(rng.tensor(&[c.b, c.hkv, c.past, c.dv])),
            )
        } else {
            (None, None)
        };
        let mask = match c.mask {
            MaskKind::None => None,
            MaskKind::Bool2 => {
                // Keep key 0 visible so that no row is fully masked by the
                // mask alone, except row 1 which masks everything.
                let m: Vec<bool> = (0..c.sq * total)
                    .map(|i| {
                        let (r, j) = (i / total, i % total);
                        r != 1 && (j == 0 || (i * 5 + 3) % 7 > 2)
                    })
                    .collect();
                Some(Tensor::bool(vec![c.sq, total], m))
            }
            MaskKind::FloatShort4 => Some(rng.tensor(&[c.b, 1, c.sq, total - 1])),
            MaskKind::Bool3 => {
                let m: Vec<bool> = (0..c.hq * c.sq * total)
                    .map(|i| (i * 3 + 1) % 5 > 0)
                    .collect();
                Some(Tensor::bool(vec![c.hq, c.sq, total], m))
            }
        };
        let attrs = OnnxAttentionAttrs {
            is_causal: c.causal,
            kv_num_heads: c.three_d.then_some(c.hkv as i64),
            q_num_heads: c.three_d.then_some(c.hq as i64),
            scale: c.scale,
            softcap: c.softcap,
            qk_matmul_output_mode: 0,
            softmax_precision: None,
            num_outputs: 3,
        };
        let outs = onnx_attention(&q, &k, &v, mask.as_ref(), pk.as_ref(), pv.as_ref(), &attrs)
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        // Reference: present = past ++ new (in [b, h, s, d]).
        let cat = |past: &Option<Tensor>, new: &[f64], dim: usize| {
            let mut out = Vec::new();
            for bi in 0..c.b {
                for h in 0..c.hkv {
                    if let Some(p) = past {
                        let pv = p.to_f64_vec();
                        let o = (bi * c.hkv + h) * c.past * dim;
                        out.extend_from_slice(&pv[o..o + c.past * dim]);
                    }
                    let o = (bi * c.hkv + h) * c.skv * dim;
                    out.extend_from_slice(&new[o..o + c.skv * dim]);
                }
            }
            out
        };
        let pk_want = cat(&pk, &to64(&kb), c.d);
        let pv_want = cat(&pv, &to64(&vb), c.dv);
        let maskv = mask.as_ref().map(|m| m.to_f64_vec());
        let bias = |bi: usize, h: usize, i: usize, j: usize| -> f64 {
            let mut x = 0.0;
            if c.causal && j > i + c.past {
                x = f64::NEG_INFINITY;
            }
            let m = match (&maskv, c.mask) {
                (Some(m), MaskKind::Bool2) => {
                    if m[i * total + j] != 0.0 {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                }
                (Some(m), MaskKind::Bool3) => {
                    if m[(h * c.sq + i) * total + j] != 0.0 {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                }
                (Some(m), MaskKind::FloatShort4) => {
                    if j < total - 1 {
                        m[(bi * c.sq + i) * (total - 1) + j]
                    } else {
                        f64::NEG_INFINITY
                    }
                }
                _ => 0.0,
            };
            x + m
        };
        let scale = c
            .scale
            .map(|s| s as f64)
            .unwrap_or(1.0 / (c.d as f64).sqrt());
        let y_bhsd = ref_attention(
            &to64(&qb),
            &pk_want,
            &pv_want,
            (c.b, c.hq, c.hkv, c.sq, total, c.d, c.dv),
            scale,
            c.softcap as f64,
            &bias,
        );
        let (y_want, y_shape) = if c.three_d {
            (
                to_bshd(&y_bhsd, c.b, c.hq, c.sq, c.dv),
                vec![c.b, c.sq, c.hq * c.dv],
            )
        } else {
            (y_bhsd, vec![c.b, c.hq, c.sq, c.dv])
        };
        let what = format!("{c:?}");
        assert_eq!(outs.len(), 3);
        assert_eq!(outs[0].shape, y_shape, "{what}");
        assert_close(&outs[0].to_f64_vec(), &y_want, 2e-5, &what);
        assert_eq!(outs[1].shape, vec![c.b, c.hkv, total, c.d], "{what}");
        assert_close(&outs[1].to_f64_vec(), &pk_want, 0.0, &what);
        assert_close(&outs[2].to_f64_vec(), &pv_want, 0.0, &what);
    }

    #[test]
    fn onnx_attention_matches_reference() {
        let mut rng = Rng(14);
        let base = AttnCase {
            three_d: false,
            b: 2,
            hq: 4,
            hkv: 2,
            sq: 7,
            past: 0,
            skv: 7,
            d: 8,
            dv: 8,
            causal: false,
            mask: MaskKind::None,
            softcap: 0.0,
            scale: None,
        };
        let cases = [
            base,
            AttnCase {
                causal: true,
                ..base
            },
            AttnCase {
                three_d: true,
                causal: true,
                ..base
            },
            AttnCase {
                mask: MaskKind::Bool2,
                ..base
            },
            AttnCase {
                mask: MaskKind::Bool2,
                causal: true,
                past: 3,
                ..base
            },
            AttnCase {
                mask: MaskKind::FloatShort4,
                three_d: true,
                ..base
            },
            AttnCase {
                mask: MaskKind::FloatShort4,
                causal: true,
                past: 2,
                skv: 5,
                sq: 5,
                ..base
            },
            AttnCase {
                mask: MaskKind::Bool3,
                hkv: 1,
                ..base
            },
            AttnCase {
                softcap: 1.5,
                scale: Some(0.3),
                ..base
            },
            AttnCase {
                dv: 5,
                three_d: true,
                past: 4,
                ..base
            },
            AttnCase {
                sq: 1,
                skv: 1,
                past: 9,
                causal: true,
                three_d: true,
                ..base
            },
            AttnCase {
                sq: 65,
                skv: 65,
                causal: true,
                b: 1,
                hq: 2,
                hkv: 1,
                ..base
            },
            AttnCase {
                sq: 130,
                skv: 130,
                causal: true,
                b: 1,
                hq: 2,
                hkv: 2,
                d: 4,
                dv: 4,
                ..base
            },
            AttnCase {
                sq: 130,
                skv: 70,
                past: 60,
                causal: true,
                b: 1,
                hq: 2,
                hkv: 1,
                mask: MaskKind::Bool2,
                ..base
            },
            AttnCase {
                sq: 7,
                skv: 130,
                causal: false,
                b: 1,
                mask: MaskKind::FloatShort4,
                ..base
            },
            // More queries than keys without a past: top-left causal.
            AttnCase {
                sq: 9,
                skv: 4,
                causal: true,
                b: 1,
                ..base
            },
        ];
        for c in cases {
            run_attn_case(c, &mut rng);
        }
    }

    /// Expected values from onnx's reference evaluator (onnx 1.20 in
    /// /work/pyenv), produced by (`vals` as in the rotary test, one-node
    /// opset-23 models run with `ReferenceEvaluator`):
    ///
    /// ```python
    /// # A: 4-D, GQA 4/2, past 1, bool mask [q, total], not causal
    /// q=vals([1,4,2,3],0.31,0.2); k=vals([1,2,2,3],0.53,0.3); v=vals([1,2,2,3],0.71,0.4)
    /// pk=vals([1,2,1,3],0.23,0.5); pv=vals([1,2,1,3],0.43,0.6)
    /// mask=np.array([[True,False,True],[True,True,True]])
    /// make_node("Attention",["q","k","v","m","pk","pv"],["y","presk","presv"])
    /// # B: 3-D, heads 2/1, past 2, causal, softcap 2, scale 0.7,
    /// #    float mask [3, 4] (one key shorter than total 5)
    /// q=vals([1,3,4],0.29,0.1); k=vals([1,3,2],0.47,0.2); v=vals([1,3,2],0.61,0.3)
    /// pk=vals([1,1,2,2],0.19,0.4); pv=vals([1,1,2,2],0.37,0.5); fm=vals([3,4],0.9,0.7)
    /// make_node("Attention",[...],[...],is_causal=1,q_num_heads=2,kv_num_heads=1,softcap=2.0,scale=0.7)
    /// ```
    #[test]
    fn onnx_attention_matches_onnx_reference_values() {
        let vals = |shape: &[usize], a: f64, b: f64| {
            let n: usize = shape.iter().product();
            Tensor::f32(
                shape.to_vec(),
                (0..n).map(|i| (a * i as f64 + b).sin() as f32).collect(),
            )
        };
        let attrs = OnnxAttentionAttrs {
            is_causal: false,
            kv_num_heads: None,
            q_num_heads: None,
            scale: None,
            softcap: 0.0,
            qk_matmul_output_mode: 0,
            softmax_precision: None,
            num_outputs: 3,
        };
        let mask = Tensor::bool(vec![2, 3], vec![true, false, true, true, true, true]);
        let out = onnx_attention(
            &vals(&[1, 4, 2, 3], 0.31, 0.2),
            &vals(&[1, 2, 2, 3], 0.53, 0.3),
            &vals(&[1, 2, 2, 3], 0.71, 0.4),
            Some(&mask),
            Some(&vals(&[1, 2, 1, 3], 0.23, 0.5)),
            Some(&vals(&[1, 2, 1, 3], 0.43, 0.6)),
            &attrs,
        )
        .unwrap();
        let y_a = [
            5.68901122e-01,
            4.30281788e-01,
            2.26546451e-01,
            5.05548239e-01,
            5.79939604e-01,
            4.62298274e-01,
            5.69586754e-01,
            3.61534566e-01,
            1.03012152e-01,
            5.16420662e-01,
            4.98049051e-01,
            3.20538878e-01,
            5.30111313e-01,
            9.18173552e-01,
            8.83755386e-01,
            -2.31298164e-01,
            7.12561980e-02,
            3.48685920e-01,
            6.47569776e-01,
            8.66094887e-01,
            7.43128657e-01,
            6.78772867e-01,
            6.02629840e-01,
            4.00893182e-01,
        ];
        let pk_a = [
            4.79425550e-01,
            6.66869640e-01,
            8.19191575e-01,
            2.95520216e-01,
            7.37931371e-01,
            9.77864623e-01,
            9.49485600e-01,
            6.60581172e-01,
            1.90422654e-01,
            9.28368986e-01,
            9.88651752e-01,
            9.96865034e-01,
            -3.31985176e-01,
            -7.63300955e-01,
            -9.85177755e-01,
            -9.36735749e-01,
            -6.31266654e-01,
            -1.52586907e-01,
        ];
        let pv_a = [
            5.64642489e-01,
            8.57298970e-01,
            9.93868351e-01,
            3.89418334e-01,
            8.95698667e-01,
            9.69109118e-01,
            5.74172139e-01,
            -9.82485935e-02,
            -7.23188102e-01,
            9.49485600e-01,
            7.32231438e-01,
            3.81660998e-01,
            -9.98628020e-01,
            -7.91454673e-01,
            -2.01790124e-01,
            4.85394806e-01,
            9.37999964e-01,
            9.37292039e-01,
        ];
        assert_eq!(out[0].shape, vec![1, 4, 2, 3]);
        assert_close(&out[0].to_f64_vec(), &y_a, 1e-6, "A: Y");
        assert_close(&out[1].to_f64_vec(), &pk_a, 1e-7, "A: present_key");
        assert_close(&out[2].to_f64_vec(), &pv_a, 1e-7, "A: present_value");

        let attrs = OnnxAttentionAttrs {
            is_causal: true,
            kv_num_heads: Some(1),
            q_num_heads: Some(2),
            scale: Some(0.7),
            softcap: 2.0,
            ..attrs
        };
        let out = onnx_attention(
            &vals(&[1, 3, 4], 0.29, 0.1),
            &vals(&[1, 3, 2], 0.47, 0.2),
            &vals(&[1, 3, 2], 0.61, 0.3),
            Some(&vals(&[3, 4], 0.9, 0.7)),
            Some(&vals(&[1, 1, 2, 2], 0.19, 0.4)),
            Some(&vals(&[1, 1, 2, 2], 0.37, 0.5)),
            &attrs,
        )
        .unwrap();
        let y_b = [
            6.36451423e-01,
            8.75484645e-01,
            6.64674759e-01,
            8.86174798e-01,
            8.42076540e-01,
            8.49492311e-01,
            8.40926647e-01,
            8.49365294e-01,
            6.71976268e-01,
            8.58732104e-01,
            6.40356958e-01,
            8.48269999e-01,
        ];
        let pk_b = [
            3.89418334e-01,
            5.56361020e-01,
            7.03279436e-01,
            8.24885726e-01,
            1.98669329e-01,
            6.20985985e-01,
            9.08633471e-01,
            9.99231637e-01,
            8.73133004e-01,
            5.57683706e-01,
        ];
        assert_eq!(out[0].shape, vec![1, 3, 4]);
        assert_close(&out[0].to_f64_vec(), &y_b, 1e-6, "B: Y");
        assert_close(&out[1].to_f64_vec(), &pk_b, 1e-7, "B: present_key");
    }

    #[test]
    fn onnx_attention_errors() {
        let q = Tensor::f32(vec![1, 2, 3, 4], vec![0.0; 24]);
        let k3 = Tensor::f32(vec![1, 3, 3, 4], vec![0.0; 36]);
        let mut attrs = OnnxAttentionAttrs {
            is_causal: false,
            kv_num_heads: None,
            q_num_heads: None,
            scale: None,
            softcap: 0.0,
            qk_matmul_output_mode: 0,
            softmax_precision: None,
            num_outputs: 3,
        };
        let e = onnx_attention(&q, &k3, &k3, None, None, None, &attrs).unwrap_err();
        assert!(e.contains("multiple of kv heads"), "{e}");
        let q3 = Tensor::f32(vec![1, 3, 8], vec![0.0; 24]);
        let e = onnx_attention(&q3, &q3, &q3, None, None, None, &attrs).unwrap_err();
        assert!(e.contains("q_num_heads"), "{e}");
        attrs.qk_matmul_output_mode = 1;
        let e = onnx_attention(&q, &q, &q, None, None, None, &attrs).unwrap_err();
        assert!(e.contains("qk_matmul_output_mode"), "{e}");
        attrs.qk_matmul_output_mode = 0;
        let m = Tensor::bool(vec![3, 4], vec![true; 12]);
        let e = onnx_attention(&q, &q, &q, Some(&m), None, None, &attrs).unwrap_err();
        assert!(e.contains("attn_mask"), "{e}");
    }

    // --- LLaMA-level ops ---------------------------------------------------

    #[test]
    fn embedding_gathers_rows_and_rejects_bad_ids() {
        let w = Tensor::f32(vec![3, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut ids = Tensor::i64(vec![2, 2], vec![2, 0, 1, 2]);
        ids.dtype = DType::I32;
        let e = embedding(&w, &ids).unwrap();
        assert_eq!(e.shape, vec![2, 2, 2]);
        assert_eq!(
            e.as_f32().unwrap(),
            &[4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        let bad = Tensor::i64(vec![1, 2], vec![1, 3]);
        let msg = embedding(&w, &bad).unwrap_err();
        assert!(
            msg.contains("token id 3") && msg.contains("size 3"),
            "{msg}"
        );
        let neg = Tensor::i64(vec![1], vec![-1]);
        assert!(embedding(&w, &neg).unwrap_err().contains("token id -1"));
        let fl = Tensor::f32(vec![1], vec![0.0]);
        assert!(embedding(&w, &fl).unwrap_err().contains("integers"));
    }

    #[test]
    fn rms_norm_matches_reference() {
        let mut rng = Rng(15);
        for shape in [vec![2, 7, 16], vec![1, 130, 8], vec![5]] {
            let h = *shape.last().unwrap();
            let x = rng.tensor(&shape);
            let w = rng.tensor(&[h]);
            let got = rms_norm(&x, &w, 1e-6).unwrap();
            let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
            let mut want = vec![0.0; xv.len()];
            for (r, row) in xv.chunks(h).enumerate() {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
                let inv = 1.0 / (ms + 1e-6f32 as f64).sqrt();
                for c in 0..h {
                    want[r * h + c] = wv[c] * row[c] * inv;
                }
            }
            assert_close(&got.to_f64_vec(), &want, 1e-6, &format!("{shape:?}"));
        }
        // bf16: the normalised value is rounded to bf16 before the weight
        // multiplies it, and the product is rounded again (transformers).
        let mut x = Tensor::f32(vec![1, 2], vec![1.0, 3.0]);
        x.dtype = DType::BF16;
        let mut w = Tensor::f32(vec![2], vec![1.0, 1.0]);
        w.dtype = DType::BF16;
        let got = rms_norm(&x, &w, 0.0).unwrap();
        assert_eq!(got.dtype, DType::BF16);
        let inv = 1.0 / (5.0f32).sqrt();
        let want: Vec<f32> = [1.0f32, 3.0]
            .iter()
            .map(|&v| half::bf16::from_f32(v * inv).to_f32())
            .collect();
        assert_eq!(got.as_f32().unwrap(), want.as_slice());
        assert!(rms_norm(&x, &rng.tensor(&[3]), 1e-6)
            .unwrap_err()
            .contains("hidden size"));
    }

    fn rope_attrs(heads: usize, hd: usize, rd: usize, scaling: RopeScaling) -> RopeAttrs {
        RopeAttrs {
            num_heads: heads,
            head_dim: hd,
            rotary_dim: rd,
            theta: 10000.0,
            scaling,
        }
    }

    /// transformers' rotate-half RoPE in f64 with the given per-position
    /// tables ([n, rd], cat(freqs, freqs) layout).
    fn ref_rope(
        x: &[f64],
        (b, s, heads, hd, rd): (usize, usize, usize, usize, usize),
        table_row: &dyn Fn(usize, usize) -> usize,
        cos: &[f64],
        sin: &[f64],
    ) -> Vec<f64> {
        let half = rd / 2;
        let mut out = x.to_vec();
        for bi in 0..b {
            for si in 0..s {
                let p = table_row(bi, si);
                for h in 0..heads {
                    let base = ((bi * s + si) * heads + h) * hd;
                    for c in 0..rd {
                        let rot = if c < half {
                            -x[base + c + half]
                        } else {
                            x[base + c - half]
                        };
                        out[base + c] = x[base + c] * cos[p * rd + c] + rot * sin[p * rd + c];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rope_matches_transformers_formula() {
        let mut rng = Rng(16);
        let (b, s, heads, hd) = (2, 7, 3, 8);
        for rd in [8, 4] {
            let attrs = rope_attrs(heads, hd, rd, RopeScaling::None);
            let x = rng.tensor(&[b, s, heads * hd]);
            let pos_bs: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 5) % 23).collect();
            let cases: Vec<(Option<Tensor>, Vec<i64>, bool)> = vec![
                (None, (0..s as i64).collect(), false),
                (
                    Some(Tensor::i64(vec![s], (3..3 + s as i64).collect())),
                    (3..3 + s as i64).collect(),
                    false,
                ),
                (
                    Some(Tensor::i64(vec![b, s], pos_bs.clone())),
                    pos_bs.clone(),
                    true,
                ),
                (
                    Some(Tensor::i64(vec![1, s], pos_bs[..s].to_vec())),
                    pos_bs[..s].to_vec(),
                    false,
                ),
            ];
            for (pt, positions, per_batch) in cases {
                let got = rope(&x, pt.as_ref(), &attrs).unwrap();
                // Tables straight from the frequencies, in f64.
                let half = rd / 2;
                let mut cos = vec![0.0; positions.len() * rd];
                let mut sin = vec![0.0; positions.len() * rd];
                for (p, &pos) in positions.iter().enumerate() {
                    for i in 0..half {
                        let inv = 1.0 / 10000f64.powf((2 * i) as f64 / rd as f64);
                        let a = pos as f64 * inv;
                        for c in [i, i + half] {
                            cos[p * rd + c] = a.cos();
                            sin[p * rd + c] = a.sin();
                        }
                    }
                }
                let row = |bi: usize, si: usize| if per_batch { bi * s + si } else { si };
                let want = ref_rope(&x.to_f64_vec(), (b, s, heads, hd, rd), &row, &cos, &sin);
                // f32 angles at positions up to 22: ~1e-5 absolute.
                assert_close(
                    &got.to_f64_vec(),
                    &want,
                    2e-5,
                    &format!("rd {rd} positions {positions:?}"),
                );
            }
        }
    }

    #[test]
    fn rope_uses_max_position_for_dynamic_scaling() {
        let mut rng = Rng(17);
        let (b, s, heads, hd) = (1, 5, 2, 8);
        let scaling = RopeScaling::Dynamic {
            factor: 2.0,
            original_max_position_embeddings: 8,
        };
        let attrs = rope_attrs(heads, hd, hd, scaling);
        let x = rng.tensor(&[b, s, heads * hd]);
        let positions: Vec<i64> = vec![0, 4, 9, 12, 3];
        let pt = Tensor::i64(vec![1, s], positions.clone());
        let got = rope(&x, Some(&pt), &attrs).unwrap();
        let (cos, sin) = crate::ir::rope::cos_sin(&attrs, &positions, 13);
        let to64 = |v: Vec<f32>| v.into_iter().map(|x| x as f64).collect::<Vec<f64>>();
        let want = ref_rope(
            &x.to_f64_vec(),
            (b, s, heads, hd, hd),
            &|_, si| si,
            &to64(cos),
            &to64(sin),
        );
        assert_close(&got.to_f64_vec(), &want, 1e-6, "dynamic");
        // Not what the unscaled tables would give.
        let (c0, s0) = crate::ir::rope::cos_sin(&attrs, &positions, 8);
        let plain = ref_rope(
            &x.to_f64_vec(),
            (b, s, heads, hd, hd),
            &|_, si| si,
            &to64(c0),
            &to64(s0),
        );
        assert!(got
            .to_f64_vec()
            .iter()
            .zip(&plain)
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }

    fn ref_llama_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        (b, sq, skv, heads, kvh, hd): (usize, usize, usize, usize, usize, usize),
        scale: f64,
    ) -> Vec<f64> {
        let off = skv - sq;
        let y = ref_attention(
            &to_bhsd(q, b, sq, heads, hd),
            &to_bhsd(k, b, skv, kvh, hd),
            &to_bhsd(v, b, skv, kvh, hd),
            (b, heads, kvh, sq, skv, hd, hd),
            scale,
            0.0,
            &|_, _, i, j| if j > i + off { f64::NEG_INFINITY } else { 0.0 },
        );
        to_bshd(&y, b, heads, sq, hd)
    }

    #[test]
    fn attention_is_causal_gqa_flash() {
        let mut rng = Rng(18);
        let cases = [
            (1, 1, 1, 2, 2, 4),
            (2, 7, 7, 4, 2, 8),
            (1, 65, 65, 4, 1, 16),
            (2, 130, 130, 2, 2, 8),
            (1, 3, 67, 4, 2, 8),
            (1, 64, 64, 2, 1, 32),
        ];
        for (b, sq, skv, heads, kvh, hd) in cases {
            let q = rng.tensor(&[b, sq, heads * hd]);
            let k = rng.tensor(&[b, skv, kvh * hd]);
            let v = rng.tensor(&[b, skv, kvh * hd]);
            let attrs = AttentionAttrs {
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                pattern: AttentionPattern::FullCausal,
            };
            let got = attention(&q, &k, &v, &attrs).unwrap();
            let want = ref_llama_attention(
                &q.to_f64_vec(),
                &k.to_f64_vec(),
                &v.to_f64_vec(),
                (b, sq, skv, heads, kvh, hd),
                attrs.scale as f64,
            );
            assert_eq!(got.shape, q.shape);
            assert_close(
                &got.to_f64_vec(),
                &want,
                1e-5,
                &format!("b {b} sq {sq} skv {skv} heads {heads}/{kvh} hd {hd}"),
            );
            // Same bits on a second run: no scheduling-dependent sums.
            assert_eq!(attention(&q, &k, &v, &attrs).unwrap(), got);
        }
        let q = rng.tensor(&[1, 2, 8]);
        let attrs = AttentionAttrs {
            num_heads: 3,
            num_kv_heads: 2,
            head_dim: 4,
            scale: 0.5,
            pattern: AttentionPattern::FullCausal,
        };
        assert!(attention(&q, &q, &q, &attrs)
            .unwrap_err()
            .contains("multiple"));
    }

    #[test]
    fn linear_matches_reference() {
        let mut rng = Rng(19);
        for (xs, out_f, with_bias) in [
            (vec![2, 3, 5], 7, true),
            (vec![4, 5], 3, false),
            (vec![130, 70], 65, true),
            (vec![1, 1, 16], 1, false),
        ] {
            let in_f = *xs.last().unwrap();
            let x = rng.tensor(&xs);
            let w = rng.tensor(&[out_f, in_f]);
            let bias = with_bias.then(|| rng.tensor(&[out_f]));
            let got = linear(&x, &w, bias.as_ref()).unwrap();
            let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
            let bv = bias.as_ref().map(|b| b.to_f64_vec());
            let rows = xv.len() / in_f;
            let mut want = vec![0.0; rows * out_f];
            for r in 0..rows {
                for o in 0..out_f {
                    let mut s = bv.as_ref().map_or(0.0, |b| b[o]);
                    for i in 0..in_f {
                        s += xv[r * in_f + i] * wv[o * in_f + i];
                    }
                    want[r * out_f + o] = s;
                }
            }
            let mut shape = xs.clone();
            *shape.last_mut().unwrap() = out_f;
            assert_eq!(got.shape, shape);
            assert_close(&got.to_f64_vec(), &want, 1e-5, &format!("{xs:?} → {out_f}"));
        }
        let x = rng.tensor(&[2, 4]);
        let w = rng.tensor(&[3, 5]);
        assert!(linear(&x, &w, None).unwrap_err().contains("in-features"));
    }

    #[test]
    fn swiglu_matches_reference() {
        let mut rng = Rng(20);
        let g = rng.tensor(&[3, 11]);
        let u = rng.tensor(&[3, 11]);
        let got = swiglu(&g, &u).unwrap();
        let want: Vec<f64> = g
            .to_f64_vec()
            .iter()
            .zip(u.to_f64_vec())
            .map(|(&a, b)| a / (1.0 + (-a).exp()) * b)
            .collect();
        assert_close(&got.to_f64_vec(), &want, 1e-6, "swiglu");
        assert!(swiglu(&g, &rng.tensor(&[11, 3]))
            .unwrap_err()
            .contains("same shape"));
    }
}
