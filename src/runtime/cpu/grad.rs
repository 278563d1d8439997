//! Loss and backward kernels for the training ops `autodiff` emits (all but
//! attention, which lives in `attention_grad`).
//!
//! Each kernel is the exact derivative of its forward in `nn.rs` (the
//! f16/bf16 roundings of the forward are treated as identities). Like the
//! forwards they are generic over [`Real`] (f32 for f32/f16/bf16 tensors, f64
//! for f64, which the finite-difference tests use) and split rows over rayon
//! with a fixed reduction order: a sum over rows (RmsNorm's dweight,
//! Embedding's scatter-add) adds per-chunk partials of a fixed chunk size in
//! chunk order, so results never depend on the number of threads.

use super::linalg::{finish, gemm_strided, output_numel, MatRef, Real};
use super::nn::RopeSetup;
use crate::ir::{DType, RopeAttrs, Tensor, TensorData};
use rayon::prelude::*;

/// Below this many elements per task, rayon's overhead outweighs the split.
const MIN_TASK_ELEMS: usize = 1 << 13;

/// Rows per partial sum in row reductions. Fixed (not derived from the
/// thread count) so that the summation order, and thus the result, is the
/// same on every machine.
const REDUCE_CHUNK_ROWS: usize = 64;

fn min_rows(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

/// The compute dtype of a float result: f64 stays f64, the rest is f32 (or
/// their own f16/bf16 type where a kernel keeps it).
fn loss_dtype(t: &Tensor) -> DType {
    match t.data {
        TensorData::F64(_) => DType::F64,
        _ => DType::F32,
    }
}

fn float_kind_error(op: &str, what: &str, t: &Tensor) -> String {
    format!("{op} needs a float {what}, got {}", t.dtype)
}

fn same_kind(a: &Tensor, b: &Tensor) -> bool {
    std::mem::discriminant(&a.data) == std::mem::discriminant(&b.data)
}

// ---------------------------------------------------------------------------
// Cross-entropy

/// Checks logits `[batch, seq, vocab]` against labels `[batch, seq]` and
/// returns, per position `(b, t)`, the label it is scored against (that of
/// `t+1`) or `None` when it is not scored.
fn scored_labels(
    op: &str,
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
) -> Result<(usize, Vec<Option<usize>>), String> {
    let (batch, seq, vocab) = match *logits.shape.as_slice() {
        [b, s, v] => (b, s, v),
        _ => {
            return Err(format!(
                "{op} logits must be [batch, seq, vocab], got {:?}",
                logits.shape
            ))
        }
    };
    let lab = labels
        .as_i64()
        .ok_or_else(|| format!("{op} labels must be integers, got {}", labels.dtype))?;
    if labels.shape != [batch, seq] {
        return Err(format!(
            "{op} labels {:?} do not match logits {:?} (expected [{batch}, {seq}])",
            labels.shape, logits.shape
        ));
    }
    let mut out = vec![None; batch * seq];
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let l = lab[b * seq + t + 1];
            if l == ignore_index {
                continue;
            }
            if l < 0 || l as usize >= vocab {
                return Err(format!(
                    "{op} label {l} at [{b}, {}] is outside the vocabulary (size {vocab}); \
                     mark padding with ignore_index ({ignore_index})",
                    t + 1
                ));
            }
            out[b * seq + t] = Some(l as usize);
        }
    }
    Ok((vocab, out))
}

/// log Σ exp(row), stabilised by the row maximum, accumulated in f64.
fn log_sum_exp<T: Real>(row: &[T]) -> f64 {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v.to_f64()));
    if max == f64::NEG_INFINITY {
        return max;
    }
    let sum: f64 = row.iter().map(|&v| (v.to_f64() - max).exp()).sum();
    max + sum.ln()
}

/// Mean next-token cross-entropy (Hugging Face's shifted loss): position t
/// of `logits [batch, seq, vocab]` is scored against `labels[t+1]`; labels
/// equal to `ignore_index` are skipped; 0 when nothing is scored. The
/// result is a scalar of the logits' compute type (f32, or f64).
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
) -> Result<Tensor, String> {
    const OP: &str = "CrossEntropy";
    let (vocab, targets) = scored_labels(OP, logits, labels, ignore_index)?;
    fn run<T: Real>(x: &[T], vocab: usize, targets: &[Option<usize>]) -> f64 {
        let per_row: Vec<f64> = targets
            .par_iter()
            .enumerate()
            .with_min_len(min_rows(vocab))
            .map(|(row, target)| match target {
                None => 0.0,
                Some(l) => {
                    let r = &x[row * vocab..(row + 1) * vocab];
                    log_sum_exp(r) - r[*l].to_f64()
                }
            })
            .collect();
        let count = targets.iter().filter(|t| t.is_some()).count();
        if count == 0 {
            return 0.0;
        }
        per_row.iter().sum::<f64>() / count as f64
    }
    let loss = match &logits.data {
        TensorData::F32(x) => run(x, vocab, &targets),
        TensorData::F64(x) => run(x, vocab, &targets),
        _ => return Err(float_kind_error(OP, "logits", logits)),
    };
    Ok(match loss_dtype(logits) {
        DType::F64 => Tensor {
            dtype: DType::F64,
            shape: vec![],
            data: TensorData::F64(vec![loss]),
        },
        _ => Tensor::scalar_f32(loss as f32),
    })
}

/// d(loss)/d(logits) of [`cross_entropy`] times the scalar `dloss`:
/// `dloss/count · (softmax(row) − onehot(label))` on scored rows, zero on
/// the others.
pub fn cross_entropy_grad(
    logits: &Tensor,
    labels: &Tensor,
    dloss: &Tensor,
    ignore_index: i64,
) -> Result<Tensor, String> {
    const OP: &str = "CrossEntropyGrad";
    let (vocab, targets) = scored_labels(OP, logits, labels, ignore_index)?;
    if dloss.numel() != 1 || matches!(dloss.data, TensorData::I64(_) | TensorData::Bool(_)) {
        return Err(format!(
            "{OP} dloss must be a float scalar, got {}{:?}",
            dloss.dtype, dloss.shape
        ));
    }
    let dl = dloss.to_f64_vec()[0];
    let count = targets.iter().filter(|t| t.is_some()).count();
    let coef = if count == 0 { 0.0 } else { dl / count as f64 };
    fn run<T: Real>(x: &[T], vocab: usize, targets: &[Option<usize>], coef: f64) -> Vec<T> {
        let mut out = T::zeroed(x.len());
        if vocab == 0 {
            return out;
        }
        out.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .zip(targets.par_iter())
            .with_min_len(min_rows(vocab))
            .for_each(|((o, r), target)| {
                let Some(l) = target else { return };
                let lse = log_sum_exp(r);
                for (o, &v) in o.iter_mut().zip(r) {
                    *o = T::from_f64(coef * (v.to_f64() - lse).exp());
                }
                o[*l] = T::from_f64(coef * ((r[*l].to_f64() - lse).exp() - 1.0));
            });
        out
    }
    match &logits.data {
        TensorData::F32(x) => Ok(finish(
            logits.dtype,
            logits.shape.clone(),
            run(x, vocab, &targets, coef),
        )),
        TensorData::F64(x) => Ok(finish(
            logits.dtype,
            logits.shape.clone(),
            run(x, vocab, &targets, coef),
        )),
        _ => Err(float_kind_error(OP, "logits", logits)),
    }
}

// ---------------------------------------------------------------------------
// RmsNorm

/// Backward of `y = w · x·inv` with `inv = 1/sqrt(mean(x²) + eps)` over the
/// last axis: `dx = inv·(dh − h·mean(dh·h))` with `h = x·inv`, `dh = dy·w`,
/// and `dw = Σ_rows dy·h` (per-chunk partials in f64, added in chunk order).
pub fn rms_norm_grad(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor), String> {
    const OP: &str = "RmsNormGrad";
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
    if dy.shape != x.shape {
        return Err(format!(
            "{OP} dy {:?} must have the shape of the input {:?}",
            dy.shape, x.shape
        ));
    }
    if !same_kind(x, weight) || !same_kind(x, dy) {
        return Err(format!(
            "{OP} input ({}), weight ({}) and dy ({}) must have one float type",
            x.dtype, weight.dtype, dy.dtype
        ));
    }
    fn run<T: Real>(x: &[T], w: &[T], dy: &[T], hidden: usize, eps: f32) -> (Vec<T>, Vec<T>) {
        let mut dx = T::zeroed(x.len());
        if hidden == 0 {
            return (dx, Vec::new());
        }
        let chunk = REDUCE_CHUNK_ROWS * hidden;
        let partials: Vec<Vec<f64>> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .map(|(dxc, (xc, dyc))| {
                let mut dw = vec![0f64; hidden];
                for ((dxr, xr), dyr) in dxc
                    .chunks_mut(hidden)
                    .zip(xc.chunks(hidden))
                    .zip(dyc.chunks(hidden))
                {
                    let ss: f64 = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum();
                    let inv = 1.0 / (ss / hidden as f64 + eps as f64).sqrt();
                    let mut dot = 0f64;
                    for i in 0..hidden {
                        let h = xr[i].to_f64() * inv;
                        let g = dyr[i].to_f64();
                        dw[i] += g * h;
                        dot += g * w[i].to_f64() * h;
                    }
                    let mean = dot / hidden as f64;
                    for i in 0..hidden {
                        let h = xr[i].to_f64() * inv;
                        let dh = dyr[i].to_f64() * w[i].to_f64();
                        dxr[i] = T::from_f64(inv * (dh - h * mean));
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f64; hidden];
        for p in &partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        (dx, dw.into_iter().map(T::from_f64).collect())
    }
    let (dxd, wd) = (x.dtype, weight.dtype);
    match (&x.data, &weight.data, &dy.data) {
        (TensorData::F32(a), TensorData::F32(w), TensorData::F32(g)) => {
            let (dx, dw) = run(a, w, g, hidden, eps);
            Ok((
                finish(dxd, x.shape.clone(), dx),
                finish(wd, weight.shape.clone(), dw),
            ))
        }
        (TensorData::F64(a), TensorData::F64(w), TensorData::F64(g)) => {
            let (dx, dw) = run(a, w, g, hidden, eps);
            Ok((
                finish(dxd, x.shape.clone(), dx),
                finish(wd, weight.shape.clone(), dw),
            ))
        }
        _ => Err(float_kind_error(OP, "input", x)),
    }
}

// ---------------------------------------------------------------------------
// RoPE

/// Reads RoPE's position ids as the forward does: `[batch, seq]` (batch 1
/// broadcasts), `[seq]`, or `0..seq` when absent. Returns the ids and their
/// batch size.
/// The transpose of [`super::nn::rope`]: each rotated pair `(x1, x2)` went
/// through `[[c, −s], [s, c]]`, so the gradient goes through its transpose
/// `[[c, s], [−s, c]]` (rotation by −θ), with the very cos/sin the forward
/// used (same scaling, same `seq_len`). Channels past `rotary_dim` pass
/// through.
pub fn rope_grad(
    dy: &Tensor,
    positions: Option<&Tensor>,
    attrs: &RopeAttrs,
) -> Result<Tensor, String> {
    let setup = RopeSetup::new("RopeGrad", dy, positions, attrs)?;
    let dtype = dy.dtype;
    fn run<T: Real>(dy: &[T], st: &RopeSetup, dtype: DType) -> Vec<T> {
        let mut out = T::copy_of(dy);
        let (hidden, hd, rd) = (st.hidden, st.head_dim, st.rotary_dim);
        if hidden == 0 || rd == 0 {
            return out;
        }
        let half = rd / 2;
        let (cos, sin) = st.tables::<T>(dtype);
        out.par_chunks_mut(hidden)
            .enumerate()
            .with_min_len(min_rows(hidden))
            .for_each(|(row, o)| {
                let p = st.position_row(row);
                let c = &cos[p * rd..(p + 1) * rd];
                let sn = &sin[p * rd..(p + 1) * rd];
                for head in o.chunks_mut(hd) {
                    let (lo, hi) = head[..rd].split_at_mut(half);
                    for i in 0..half {
                        let (g1, g2) = (lo[i], hi[i]);
                        lo[i] = g1 * c[i] + g2 * sn[i + half];
                        hi[i] = g2 * c[i + half] - g1 * sn[i];
                    }
                }
            });
        out
    }
    match &dy.data {
        TensorData::F32(v) => Ok(finish(dtype, dy.shape.clone(), run(v, &setup, dtype))),
        TensorData::F64(v) => Ok(finish(dtype, dy.shape.clone(), run(v, &setup, dtype))),
        _ => Err(float_kind_error("RopeGrad", "dy", dy)),
    }
}

// ---------------------------------------------------------------------------
// SwiGLU

/// Backward of `silu(gate)·up`: `dup = dy·silu(gate)`,
/// `dgate = dy·up·σ(gate)·(1 + gate·(1 − σ(gate)))`.
pub fn swiglu_grad(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor), String> {
    const OP: &str = "SwiGluGrad";
    if gate.shape != up.shape || gate.shape != dy.shape {
        return Err(format!(
            "{OP} gate {:?}, up {:?} and dy {:?} must have the same shape",
            gate.shape, up.shape, dy.shape
        ));
    }
    fn run<T: Real>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let mut dg = T::zeroed(g.len());
        let mut du = T::zeroed(g.len());
        dg.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(du.par_chunks_mut(MIN_TASK_ELEMS))
            .zip(
                g.par_chunks(MIN_TASK_ELEMS)
                    .zip(u.par_chunks(MIN_TASK_ELEMS)),
            )
            .zip(dy.par_chunks(MIN_TASK_ELEMS))
            .for_each(|(((dg, du), (g, u)), d)| T::swiglu_grad(g, u, d, dg, du));
        (dg, du)
    }
    match (&gate.data, &up.data, &dy.data) {
        (TensorData::F32(g), TensorData::F32(u), TensorData::F32(d)) => {
            let (dg, du) = run(g, u, d);
            Ok((
                finish(gate.dtype, gate.shape.clone(), dg),
                finish(up.dtype, up.shape.clone(), du),
            ))
        }
        (TensorData::F64(g), TensorData::F64(u), TensorData::F64(d)) => {
            let (dg, du) = run(g, u, d);
            Ok((
                finish(gate.dtype, gate.shape.clone(), dg),
                finish(up.dtype, up.shape.clone(), du),
            ))
        }
        _ => Err(format!(
            "{OP} needs float gate, up and dy of one type, got {}, {} and {}",
            gate.dtype, up.dtype, dy.dtype
        )),
    }
}

// ---------------------------------------------------------------------------
// Embedding

/// Backward of the embedding lookup: `dW[id] += dy[token]` for every token.
/// Tokens are bucketed by id (keeping token order), then each vocabulary row
/// sums its tokens in that order, in f64, rows in parallel: deterministic
/// whatever the thread count. `weight` is read only for its shape and type.
pub fn embedding_grad(weight: &Tensor, ids: &Tensor, dy: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "EmbeddingGrad";
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
    let mut want = ids.shape.clone();
    want.push(hidden);
    if dy.shape != want {
        return Err(format!(
            "{OP} dy {:?} does not match ids {:?} × hidden {hidden} (expected {want:?})",
            dy.shape, ids.shape
        ));
    }
    output_numel(&weight.shape, 4, "EmbeddingGrad output")?;
    // Counting sort of the token positions by id.
    let mut start = vec![0usize; vocab + 1];
    for &id in id_vals {
        if id < 0 || id as usize >= vocab {
            return Err(format!(
                "{OP} token id {id} is outside the vocabulary (size {vocab})"
            ));
        }
        start[id as usize + 1] += 1;
    }
    for i in 0..vocab {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; id_vals.len()];
    for (tok, &id) in id_vals.iter().enumerate() {
        order[fill[id as usize]] = tok;
        fill[id as usize] += 1;
    }
    fn run<T: Real>(
        dy: &[T],
        vocab: usize,
        hidden: usize,
        start: &[usize],
        order: &[usize],
    ) -> Vec<T> {
        let mut out = T::zeroed(vocab * hidden);
        if hidden == 0 {
            return out;
        }
        out.par_chunks_mut(hidden)
            .enumerate()
            .with_min_len(min_rows(hidden))
            .for_each(|(id, o)| {
                let toks = &order[start[id]..start[id + 1]];
                if toks.is_empty() {
                    return;
                }
                let mut acc = vec![0f64; hidden];
                for &t in toks {
                    for (a, &g) in acc.iter_mut().zip(&dy[t * hidden..(t + 1) * hidden]) {
                        *a += g.to_f64();
                    }
                }
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = T::from_f64(a);
                }
            });
        out
    }
    match (&dy.data, &weight.data) {
        (TensorData::F32(d), TensorData::F32(_)) => Ok(finish(
            weight.dtype,
            weight.shape.clone(),
            run(d, vocab, hidden, &start, &order),
        )),
        (TensorData::F64(d), TensorData::F64(_)) => Ok(finish(
            weight.dtype,
            weight.shape.clone(),
            run(d, vocab, hidden, &start, &order),
        )),
        _ => Err(format!(
            "{OP} weight ({}) and dy ({}) must have one float type",
            weight.dtype, dy.dtype
        )),
    }
}

// ---------------------------------------------------------------------------
// Linear

/// The weight gradient of `y = x·Wᵀ`: `dW [out, in] = dyᵀ·x` summed over all
/// leading positions, as one GEMM with k = rows (split over blocks of dW,
/// never over k, so deterministic).
pub fn linear_grad_weight(x: &Tensor, dy: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "LinearGradWeight";
    let (Some(&in_f), Some(&out_f)) = (x.shape.last(), dy.shape.last()) else {
        return Err(format!(
            "{OP} x {:?} and dy {:?} must have rank >= 1",
            x.shape, dy.shape
        ));
    };
    if x.shape[..x.rank() - 1] != dy.shape[..dy.rank() - 1] {
        return Err(format!(
            "{OP} x {:?} and dy {:?} must agree on every axis but the last",
            x.shape, dy.shape
        ));
    }
    if !same_kind(x, dy) {
        return Err(format!(
            "{OP} x ({}) and dy ({}) must have one float type",
            x.dtype, dy.dtype
        ));
    }
    let shape = vec![out_f, in_f];
    output_numel(&shape, 4, "LinearGradWeight output")?;
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    fn run<T: Real>(x: &[T], dy: &[T], rows: usize, in_f: usize, out_f: usize) -> Vec<T> {
        let mut out = T::zeroed(out_f * in_f);
        gemm_strided(
            out_f,
            in_f,
            rows,
            &mut out,
            in_f,
            false,
            MatRef::row_major(dy, 0, out_f).t(),
            MatRef::row_major(x, 0, in_f),
            T::ONE,
            true,
        );
        out
    }
    // f16/bf16 activations give an f32 gradient (accumulated in f32).
    let dtype = if x.dtype == dy.dtype {
        x.dtype
    } else {
        loss_dtype(x)
    };
    match (&x.data, &dy.data) {
        (TensorData::F32(a), TensorData::F32(g)) => {
            Ok(finish(dtype, shape, run(a, g, rows, in_f, out_f)))
        }
        (TensorData::F64(a), TensorData::F64(g)) => {
            Ok(finish(dtype, shape, run(a, g, rows, in_f, out_f)))
        }
        _ => Err(float_kind_error(OP, "x", x)),
    }
}

#[cfg(test)]
mod tests;
