//! The ONNX ops with real arithmetic: Softmax/LogSoftmax, Reduce*,
//! RMSNormalization, RotaryEmbedding (in this file) and Attention
//! ([`attention`]; opset 23), as onnx's reference evaluator defines them.

pub mod attention;

pub use attention::onnx_attention;

use super::{float_kind_error, min_rows, same_data_kind};
use crate::ir::{DType, ReduceOp, Tensor, TensorData};
use crate::runtime::cpu::layout;
use crate::runtime::cpu::linalg::{self, finish, Real};
use rayon::prelude::*;

fn norm_axis(axis: i64, rank: usize, op: &str) -> Result<usize, String> {
    layout::norm_axis(axis, rank, &format!("{op} axis"))
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
            linalg::round_to_storage(x.dtype, &mut out);
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
    let ok = layout::broadcast_shapes(&x.shape, &scale.shape).is_ok_and(|s| s == x.shape);
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
    let strides = linalg::broadcast_strides(&scale.shape, &x.shape);
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
// Reference

/// These ONNX ops as onnx's reference evaluator defines them, in plain
/// loops over f64: what every backend's kernels are compared against.
/// Inputs must be valid (the kernels check them; these do not). ONNX
/// Attention's is [`attention::reference`].
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
#[allow(clippy::needless_range_loop)]
pub(crate) mod reference {
    use crate::ir::{ReduceOp, Tensor};

    /// Softmax (or LogSoftmax) of `x` (shape `shape`) over `axis`:
    /// `exp(x − max) / Σ exp(x − max)`.
    pub fn softmax(x: &[f64], shape: &[usize], axis: usize, log: bool) -> Vec<f64> {
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

    /// ReduceSum/Mean/Max/Min of `x` (shape `shape`) over `axes` (normalised,
    /// distinct): one value per combination of the kept axes, in row-major
    /// order (the output's shape is the kept axes, with 1s for the reduced
    /// ones under `keepdims`).
    pub fn reduce(x: &[f64], shape: &[usize], axes: &[usize], op: ReduceOp) -> Vec<f64> {
        let rank = shape.len();
        let kept: Vec<usize> = (0..rank).filter(|d| !axes.contains(d)).collect();
        let out_n: usize = kept.iter().map(|&d| shape[d]).product();
        let mut groups: Vec<Vec<f64>> = vec![Vec::new(); out_n];
        for (flat, &v) in x.iter().enumerate() {
            let idx = unravel(flat, shape);
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

    /// The multi-index of row-major position `flat` in `shape`.
    fn unravel(flat: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        let mut rem = flat;
        for d in (0..shape.len()).rev() {
            idx[d] = rem % shape[d];
            rem /= shape[d];
        }
        idx
    }

    /// The position in a tensor of shape `from` that element `flat` of the
    /// broadcast shape `to` reads (numpy broadcasting).
    fn broadcast_source(flat: usize, to: &[usize], from: &[usize]) -> usize {
        let idx = unravel(flat, to);
        let lead = to.len() - from.len();
        from.iter().enumerate().fold(0, |acc, (d, &n)| {
            acc * n + if n == 1 { 0 } else { idx[lead + d] }
        })
    }

    /// RMSNormalization of `x` over axes `[axis, rank)`:
    /// `x / sqrt(mean(x²) + epsilon) · scale`, scale broadcast to x's shape.
    pub fn rms_normalization(
        x: &[f64],
        shape: &[usize],
        scale: &[f64],
        scale_shape: &[usize],
        axis: usize,
        epsilon: f32,
    ) -> Vec<f64> {
        let row: usize = shape[axis..].iter().product();
        let mut out = vec![0.0; x.len()];
        for (r, chunk) in x.chunks(row.max(1)).enumerate() {
            let ms = chunk.iter().map(|v| v * v).sum::<f64>() / row as f64;
            let inv = 1.0 / (ms + epsilon as f64).sqrt();
            for c in 0..chunk.len() {
                let flat = r * row + c;
                out[flat] = chunk[c] * inv * scale[broadcast_source(flat, shape, scale_shape)];
            }
        }
        out
    }

    /// RotaryEmbedding (op_rotary_embedding.py), with the kernel's
    /// arguments; the result has x's shape. Pair i of each head is channels
    /// (2i, 2i+1) when `interleaved`, else (i, i + rotary_dim/2), rotated by
    /// the cache row of its (batch, position): `position_ids[b, s]` (batch 1
    /// broadcasts), or row (b, s) of `[batch or 1, seq, ·]` caches.
    pub fn rotary_embedding(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        position_ids: Option<&Tensor>,
        interleaved: bool,
        num_heads: Option<i64>,
        rotary_embedding_dim: i64,
    ) -> Vec<f64> {
        let (b, h, s, d, four_d) = match *x.shape.as_slice() {
            [b, h, s, d] => (b, h, s, d, true),
            [b, s, w] => {
                let h = num_heads.expect("num_heads for a 3-D input") as usize;
                (b, h, s, w / h, false)
            }
            _ => panic!("RotaryEmbedding input {:?} must be 3-D or 4-D", x.shape),
        };
        let rot = if rotary_embedding_dim <= 0 {
            d
        } else {
            rotary_embedding_dim as usize
        };
        let half = rot / 2;
        let (xv, cv, sv) = (x.to_f64_vec(), cos.to_f64_vec(), sin.to_f64_vec());
        let ids = position_ids.map(|p| (p.to_i64_vec(), p.shape[0]));
        let at = |bi: usize, si: usize, hi: usize, c: usize| {
            if four_d {
                ((bi * h + hi) * s + si) * d + c
            } else {
                ((bi * s + si) * h + hi) * d + c
            }
        };
        let mut out = xv.clone();
        for bi in 0..b {
            for si in 0..s {
                let row = match &ids {
                    Some((ids, pb)) => ids[if *pb == 1 { si } else { bi * s + si }] as usize,
                    None => (if cos.shape[0] == 1 { 0 } else { bi }) * s + si,
                };
                for hi in 0..h {
                    for i in 0..half {
                        let (ia, ib) = if interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        let (x1, x2) = (xv[at(bi, si, hi, ia)], xv[at(bi, si, hi, ib)]);
                        let (co, si_) = (cv[row * half + i], sv[row * half + i]);
                        out[at(bi, si, hi, ia)] = co * x1 - si_ * x2;
                        out[at(bi, si, hi, ib)] = si_ * x1 + co * x2;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
