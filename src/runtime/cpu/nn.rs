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

use super::linalg::{finish, gemm_strided, numel_of, MatRef, Real};
use crate::ir::{
    AttentionAttrs, AttentionPattern, DType, OnnxAttentionAttrs, ReduceOp, RopeAttrs, Tensor,
    TensorData,
};
use rayon::prelude::*;

/// Below this many elements per task, rayon's overhead outweighs the split.
const MIN_TASK_ELEMS: usize = 1 << 13;

/// Rows per rayon task for rows of `row_len` elements.
fn min_rows(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

fn norm_axis(axis: i64, rank: usize, op: &str) -> Result<usize, String> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(format!(
            "{op} axis {axis} is out of range for a rank-{rank} input (allowed {}..{})",
            -r,
            r - 1
        ));
    }
    Ok(if axis < 0 { axis + r } else { axis } as usize)
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
        TensorData::Bool(_) => return Err(format!("{name} does not take bool inputs")),
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
    let ok = super::linalg::broadcast_shapes(&x.shape, &scale.shape).is_some_and(|s| s == x.shape);
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

const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 64;

/// Tiled attention with an online softmax. Query head h reads key/value head
/// `h / (q_heads / kv_heads)` (GQA). Rows whose every key is masked give 0
/// (as the ONNX reference does). Writes into `out` through `out_layout`.
fn flash_attention<T: Real>(p: &AttnProblem<'_, T>, out: &mut [T], out_layout: HeadLayout) {
    let q_blocks = p.q_len.div_ceil(BLOCK_Q);
    let tasks: Vec<(usize, usize, usize)> = (0..p.batch)
        .flat_map(|b| (0..p.q_heads).flat_map(move |h| (0..q_blocks).map(move |qb| (b, h, qb))))
        .collect();
    let blocks: Vec<Vec<T>> = tasks
        .par_iter()
        .map(|&(b, h, qb)| attend_block(p, b, h, qb))
        .collect();
    let vd = p.v_head_dim;
    for (&(b, h, qb), block) in tasks.iter().zip(&blocks) {
        let base = out_layout.at(b, h);
        for (r, row) in block.chunks(vd.max(1)).enumerate() {
            let i = qb * BLOCK_Q + r;
            let o = base + i * out_layout.row;
            out[o..o + vd].copy_from_slice(row);
        }
    }
}

fn attend_block<T: Real>(p: &AttnProblem<'_, T>, b: usize, h: usize, qb: usize) -> Vec<T> {
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
            let tile_max = srow.iter().fold(T::NEG_INFINITY, |a, &x| a.max(x));
            let m_new = m[r].max(tile_max);
            if m_new == T::NEG_INFINITY {
                // Nothing visible yet in this row: these keys weigh nothing.
                srow.fill(T::ZERO);
                continue;
            }
            let alpha = (m[r] - m_new).exp();
            let mut sum = T::ZERO;
            for x in srow.iter_mut() {
                *x = (*x - m_new).exp();
                sum += *x;
            }
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
    acc
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
    let out_len = numel_of(
        &[g.batch, g.q_heads, g.q_len, g.v_head_dim],
        "Attention output",
    )?;
    let mut y = vec![T::ZERO; out_len];
    let out_layout = layout(g.q_len, g.q_heads, g.v_head_dim);
    flash_attention(&problem, &mut y, out_layout);
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
    numel_of(&shape, "Embedding output")?;
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
        let mut out = vec![T::ZERO; x.len()];
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
    const OP: &str = "Rope";
    let (batch, seq, hidden) = match *x.shape.as_slice() {
        [b, s, h] => (b, s, h),
        _ => {
            return Err(format!(
                "{OP} input must be [batch, seq, heads*head_dim], got {:?}",
                x.shape
            ))
        }
    };
    let (heads, hd, rd) = (attrs.num_heads, attrs.head_dim, attrs.rotary_dim);
    if heads.checked_mul(hd) != Some(hidden) {
        return Err(format!(
            "{OP} input hidden size {hidden} is not heads ({heads}) × head_dim ({hd})"
        ));
    }
    if rd > hd || rd % 2 != 0 {
        return Err(format!(
            "{OP} rotary_dim {rd} must be even and at most head_dim {hd}"
        ));
    }
    let (positions, pos_batch): (Vec<i64>, usize) = match position_ids {
        None => ((0..seq as i64).collect(), 1),
        Some(p) => {
            let ids = p
                .as_i64()
                .ok_or_else(|| format!("{OP} position_ids must be integers, got {}", p.dtype))?;
            match *p.shape.as_slice() {
                [s] if s == seq => (ids.to_vec(), 1),
                [pb, s] if s == seq && (pb == batch || pb == 1) => (ids.to_vec(), pb),
                _ => {
                    return Err(format!(
                        "{OP} position_ids of shape {:?} do not match [batch={batch}, seq={seq}] or [seq]",
                        p.shape
                    ))
                }
            }
        }
    };
    let seq_len = positions.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
    let (cos, sin) = crate::ir::rope::cos_sin(attrs, &positions, seq_len);
    let dtype = x.dtype;
    fn run<T: Real>(
        x: &[T],
        cos: &[f32],
        sin: &[f32],
        (seq, hidden, pos_batch): (usize, usize, usize),
        (hd, rd): (usize, usize),
        dtype: DType,
    ) -> Vec<T> {
        let r = |v: T| T::round_one(dtype, v);
        let half = rd / 2;
        let mut out = x.to_vec();
        if hidden == 0 || rd == 0 {
            return out;
        }
        out.par_chunks_mut(hidden)
            .enumerate()
            .with_min_len(min_rows(hidden))
            .for_each(|(row, o)| {
                let (b, s) = (row / seq, row % seq);
                let p = if pos_batch == 1 { s } else { b * seq + s };
                let c: Vec<T> = cos[p * rd..(p + 1) * rd]
                    .iter()
                    .map(|&v| r(T::from_f64(v as f64)))
                    .collect();
                let sn: Vec<T> = sin[p * rd..(p + 1) * rd]
                    .iter()
                    .map(|&v| r(T::from_f64(v as f64)))
                    .collect();
                for head in o.chunks_mut(hd) {
                    for i in 0..half {
                        let (x1, x2) = (head[i], head[i + half]);
                        head[i] = r(r(x1 * c[i]) - r(x2 * sn[i]));
                        head[i + half] = r(r(x2 * c[i + half]) + r(x1 * sn[i + half]));
                    }
                }
            });
        out
    }
    let dims = (seq, hidden, pos_batch);
    match &x.data {
        TensorData::F32(v) => Ok(finish(
            dtype,
            x.shape.clone(),
            run(v, &cos, &sin, dims, (hd, rd), dtype),
        )),
        TensorData::F64(v) => Ok(finish(
            dtype,
            x.shape.clone(),
            run(v, &cos, &sin, dims, (hd, rd), dtype),
        )),
        _ => Err(float_kind_error(OP, "input", x)),
    }
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
    };
    fn run<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        (batch, heads, kv_heads, hd, q_len, kv_len): (usize, usize, usize, usize, usize, usize),
        scale: f32,
        causal_offset: Option<usize>,
    ) -> Vec<T> {
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
        let mut out = vec![T::ZERO; q.len()];
        flash_attention(&p, &mut out, HeadLayout::bshd(q_len, heads, hd));
        out
    }
    let dims = (batch, heads, kv_heads, hd, q_len, kv_len);
    match (&q.data, &k.data, &v.data) {
        (TensorData::F32(a), TensorData::F32(b), TensorData::F32(c)) => Ok(finish(
            q.dtype,
            q.shape.clone(),
            run(a, b, c, dims, attrs.scale, causal_offset),
        )),
        (TensorData::F64(a), TensorData::F64(b), TensorData::F64(c)) => Ok(finish(
            q.dtype,
            q.shape.clone(),
            run(a, b, c, dims, attrs.scale, causal_offset),
        )),
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
    numel_of(&shape, "Linear output")?;
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    fn run<T: Real>(
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        rows: usize,
        in_f: usize,
        out_f: usize,
    ) -> Vec<T> {
        let mut out = vec![T::ZERO; rows * out_f];
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
        let mut out = vec![T::ZERO; g.len()];
        out.par_iter_mut()
            .zip(g.par_iter().zip(u.par_iter()))
            .with_min_len(MIN_TASK_ELEMS)
            .for_each(|(o, (&g, &u))| {
                let silu = T::round_one(gdt, g / (T::ONE + (-g).exp()));
                *o = silu * u;
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
