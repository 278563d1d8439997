//! Attention for training: the forward that also returns the log-sum-exp of
//! each query row, and the tiled backward (FlashAttention-2 style), for full
//! causal and shifted sparse (S²-Attn) patterns.
//!
//! The forward is `nn::attention`'s own kernel asked to also report each
//! row's softmax max `m` and sum `l`, so its output is bit-identical to the
//! inference op; `lse = m + ln(l)` over the scaled scores is all the backward
//! needs to rebuild any tile of probabilities without storing them.
//!
//! The backward splits the work into *segments*: one (batch, query head,
//! causal run of positions) each — the whole sequence for full attention,
//! one group for S²-Attn (the wrapped shifted groups in rolled positions).
//! Within a segment the pattern is plain causal, so every tile above the
//! diagonal is skipped and S²-Attn does about G/L of full attention's work.
//! Each segment is one rayon task that gathers its rows into contiguous
//! scratch (O(segment·head_dim)), walks key blocks × query blocks with five
//! small GEMMs per tile, and returns its dq, dk, dv rows. dq rows belong to
//! exactly one segment; dk/dv rows of a kv head are summed over its query
//! heads afterwards in a fixed order, so results never depend on the number
//! of threads and nothing is ever S×S.

use super::linalg::{finish, gemm_strided, MatRef, Real};
use super::nn;
use crate::ir::{AttentionAttrs, AttentionPattern, DType, Tensor, TensorData};
use rayon::prelude::*;

/// Tile sizes of the backward. Smaller than the forward's: a tile keeps two
/// score-sized buffers (P and dS) plus four head_dim-wide operands hot.
const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Checks q, k, v against the attributes and each other; returns the sizes.
fn check_qkv(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<Dims, String> {
    let (heads, kv_heads, hd) = (attrs.num_heads, attrs.num_kv_heads, attrs.head_dim);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{op}: heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})"
        ));
    }
    if let AttentionPattern::ShiftedSparse { .. } = attrs.pattern {
        if heads % 2 != 0 {
            return Err(format!(
                "{op} (shifted sparse) splits the heads in halves, but there are {heads} (odd); use full causal attention for this model"
            ));
        }
    }
    for t in [q, k, v] {
        if !matches!(t.dtype, DType::F32 | DType::F64) || t.dtype != q.dtype {
            return Err(format!(
                "{op} computes in f32 or f64 with one type for all inputs; got q {}, k {}, v {} (cast them first)",
                q.dtype, k.dtype, v.dtype
            ));
        }
    }
    let dims3 = |t: &Tensor, h: usize, name: &str| match *t.shape.as_slice() {
        [b, s, w] if Some(w) == h.checked_mul(hd) => Ok((b, s)),
        _ => Err(format!(
            "{op}: {name} must be [batch, seq, {h}×{hd}], got {:?}",
            t.shape
        )),
    };
    let (batch, len) = dims3(q, heads, "q")?;
    check_numel(op, &[("q", q), ("k", k), ("v", v)])?;
    let kd = dims3(k, kv_heads, "k")?;
    let vd = dims3(v, kv_heads, "v")?;
    if kd != (batch, len) || vd != (batch, len) {
        return Err(format!(
            "{op} is for training without a KV cache: q, k and v must have the same batch and length, got q {:?}, k {:?}, v {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    Ok(Dims {
        batch,
        len,
        heads,
        kv_heads,
        head_dim: hd,
    })
}

/// Training forward: `(out, lse)`. `out` is `[batch, seq, heads*head_dim]`,
/// bit-identical to `nn::attention`; `lse` is `[batch, heads, seq]` in q's
/// dtype, the log-sum-exp of each query row's scaled scores over the keys it
/// sees (for S²-Attn heads, within its group). f32 and f64 only.
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<(Tensor, Tensor), String> {
    check_qkv("AttentionFwd", q, k, v, attrs)?;
    nn::attention_with_lse(q, k, v, attrs)
}

/// Training backward: `(dq, dk, dv)` in the shapes of q, k, v, from the
/// forward's `out` and `lse` and the output gradient `dout`.
pub fn attention_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<(Tensor, Tensor, Tensor), String> {
    const OP: &str = "AttentionGrad";
    let dims = check_qkv(OP, q, k, v, attrs)?;
    for (name, t) in [("out", out), ("dout", dout)] {
        if t.shape != q.shape || t.dtype != q.dtype {
            return Err(format!(
                "{OP}: {name} must be {} {:?} like q, got {} {:?}",
                q.dtype, q.shape, t.dtype, t.shape
            ));
        }
    }
    check_numel(OP, &[("out", out), ("lse", lse), ("dout", dout)])?;
    let lse_shape = [dims.batch, dims.heads, dims.len];
    if lse.shape != lse_shape || lse.dtype != q.dtype {
        return Err(format!(
            "{OP}: lse must be {} {lse_shape:?} ([batch, heads, seq], from AttentionFwd), got {} {:?}",
            q.dtype, lse.dtype, lse.shape
        ));
    }
    let groups = match attrs.pattern {
        AttentionPattern::FullCausal => None,
        AttentionPattern::ShiftedSparse { group, wrap } => {
            let g = group.tokens(dims.len);
            if dims.len > 0 && g > dims.len {
                return Err(format!(
                    "{OP} (shifted sparse): the group size {g} exceeds the sequence length {}; use sequences of at least {g} tokens or a smaller group_size",
                    dims.len
                ));
            }
            Some((g, wrap))
        }
    };
    let segments = segments(dims, groups);
    let shift = groups.map_or(0, |(g, _)| g / 2);
    macro_rules! typed {
        ($variant:ident) => {
            if let (
                TensorData::$variant(q_),
                TensorData::$variant(k_),
                TensorData::$variant(v_),
                TensorData::$variant(o_),
                TensorData::$variant(l_),
                TensorData::$variant(d_),
            ) = (&q.data, &k.data, &v.data, &out.data, &lse.data, &dout.data)
            {
                let inputs = Inputs {
                    q: q_,
                    k: k_,
                    v: v_,
                    out: o_,
                    lse: l_,
                    dout: d_,
                };
                let (dq, dk, dv) = backward(&inputs, dims, &segments, shift, attrs.scale);
                return Ok((
                    finish(q.dtype, q.shape.clone(), dq),
                    finish(k.dtype, k.shape.clone(), dk),
                    finish(v.dtype, v.shape.clone(), dv),
                ));
            }
        };
    }
    typed!(F32);
    typed!(F64);
    Err(format!(
        "{OP}: the tensors' data do not match their dtype {} (internal error)",
        q.dtype
    ))
}

/// A tensor whose data is not as long as its shape says would make the
/// kernels index out of bounds; say so instead.
fn check_numel(op: &str, tensors: &[(&str, &Tensor)]) -> Result<(), String> {
    for (name, t) in tensors {
        if crate::ir::tensor::checked_numel(&t.shape) != Some(t.numel()) {
            return Err(format!(
                "{op}: {name} has shape {:?} but {} values (a malformed tensor)",
                t.shape,
                t.numel()
            ));
        }
    }
    Ok(())
}

struct Inputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    out: &'a [T],
    lse: &'a [T],
    dout: &'a [T],
}

/// A causal run of positions of one query head: local row p is sequence
/// position `start + p`, or, when `rolled` (S²-Attn with wrap), position
/// `(start + p + shift) % len` — the shifted heads attend within groups of
/// the sequence rolled by −shift.
#[derive(Clone, Copy, Debug)]
struct Segment {
    batch: usize,
    head: usize,
    start: usize,
    len: usize,
    rolled: bool,
}

impl Segment {
    fn position(&self, p: usize, shift: usize, len: usize) -> usize {
        if self.rolled {
            (self.start + p + shift) % len
        } else {
            self.start + p
        }
    }
}

/// The segments of the pattern, in a fixed order (batch, head, position):
/// the order in which dk/dv contributions are summed.
fn segments(dims: Dims, groups: Option<(usize, bool)>) -> Vec<Segment> {
    let len = dims.len;
    // The same bounds as the forward's `shifted_sparse_attention`.
    let bounds = |start: usize, g: usize| -> Vec<(usize, usize)> {
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
    let mut out = Vec::new();
    for batch in 0..dims.batch {
        for head in 0..dims.heads {
            let (runs, rolled) = match groups {
                None => (vec![(0, len)], false),
                Some((g, _)) if head < dims.heads / 2 => (bounds(0, g), false),
                Some((g, false)) => (bounds(g / 2, g), false),
                Some((g, true)) => (bounds(0, g), true),
            };
            for (s, e) in runs {
                if e > s {
                    out.push(Segment {
                        batch,
                        head,
                        start: s,
                        len: e - s,
                        rolled,
                    });
                }
            }
        }
    }
    out
}

/// One segment's gradients: rows in local order, `head_dim` wide.
struct SegmentGrad<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

fn backward<T: Real>(
    x: &Inputs<'_, T>,
    dims: Dims,
    segments: &[Segment],
    shift: usize,
    scale: f32,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        len,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = dims;
    let scale = T::from_f64(scale as f64);
    let grads: Vec<SegmentGrad<T>> = segments
        .par_iter()
        .map(|seg| segment_grad(x, dims, seg, shift, scale))
        .collect();
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let per_kv = heads / kv_heads;
    let mut dq = T::zeroed(x.q.len());
    let mut dk = T::zeroed(x.k.len());
    let mut dv = T::zeroed(x.v.len());
    for (seg, g) in segments.iter().zip(&grads) {
        let kvh = seg.head / per_kv;
        for p in 0..seg.len {
            let t = seg.position(p, shift, len);
            let local = p * hd..(p + 1) * hd;
            let qo = (seg.batch * len + t) * qw + seg.head * hd;
            dq[qo..qo + hd].copy_from_slice(&g.dq[local.clone()]);
            let ko = (seg.batch * len + t) * kw + kvh * hd;
            for ((a, b), (c, d)) in dk[ko..ko + hd]
                .iter_mut()
                .zip(&g.dk[local.clone()])
                .zip(dv[ko..ko + hd].iter_mut().zip(&g.dv[local]))
            {
                *a += *b;
                *c += *d;
            }
        }
    }
    (dq, dk, dv)
}

/// The backward of one causal segment (see the module comment).
fn segment_grad<T: Real>(
    x: &Inputs<'_, T>,
    dims: Dims,
    seg: &Segment,
    shift: usize,
    scale: T,
) -> SegmentGrad<T> {
    let Dims {
        len,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = dims;
    let n = seg.len;
    let kvh = seg.head / (heads / kv_heads);
    let (qw, kw) = (heads * hd, kv_heads * hd);
    // Gather the segment's rows; D_i = Σ dO_i·O_i on the way.
    let mut q = vec![T::ZERO; n * hd];
    let mut k = vec![T::ZERO; n * hd];
    let mut v = vec![T::ZERO; n * hd];
    let mut dout = vec![T::ZERO; n * hd];
    let mut lse = vec![T::ZERO; n];
    let mut delta = vec![T::ZERO; n];
    for p in 0..n {
        let t = seg.position(p, shift, len);
        let local = p * hd..(p + 1) * hd;
        let qo = (seg.batch * len + t) * qw + seg.head * hd;
        let ko = (seg.batch * len + t) * kw + kvh * hd;
        q[local.clone()].copy_from_slice(&x.q[qo..qo + hd]);
        dout[local.clone()].copy_from_slice(&x.dout[qo..qo + hd]);
        k[local.clone()].copy_from_slice(&x.k[ko..ko + hd]);
        v[local].copy_from_slice(&x.v[ko..ko + hd]);
        lse[p] = x.lse[(seg.batch * heads + seg.head) * len + t];
        let mut d = T::ZERO;
        for (a, b) in x.dout[qo..qo + hd].iter().zip(&x.out[qo..qo + hd]) {
            d += *a * *b;
        }
        delta[p] = d;
    }
    let mut dq = vec![T::ZERO; n * hd];
    let mut dk = vec![T::ZERO; n * hd];
    let mut dv = vec![T::ZERO; n * hd];
    // One tile of P, and one of dP turned into dS in place.
    let mut p_tile = vec![T::ZERO; BLOCK_Q * BLOCK_K];
    let mut ds_tile = vec![T::ZERO; BLOCK_Q * BLOCK_K];
    let mut j0 = 0;
    while j0 < n {
        let cols = BLOCK_K.min(n - j0);
        let k_j = rows_from(&k, j0, hd);
        let v_j = rows_from(&v, j0, hd);
        // Queries before j0 see none of these keys.
        let mut i0 = j0 / BLOCK_Q * BLOCK_Q;
        while i0 < n {
            let rows = BLOCK_Q.min(n - i0);
            let q_i = rows_from(&q, i0, hd);
            let do_i = rows_from(&dout, i0, hd);
            // P = exp(scale·Q Kᵀ − lse), zero above the diagonal.
            gemm_strided(
                rows,
                cols,
                hd,
                &mut p_tile,
                BLOCK_K,
                false,
                q_i,
                k_j.t(),
                scale,
                false,
            );
            for r in 0..rows {
                let i = i0 + r;
                let row = &mut p_tile[r * BLOCK_K..r * BLOCK_K + cols];
                let l = lse[i];
                // Keys j <= i are visible; a row that saw nothing (lse = −inf) weighs nothing.
                let visible = if l == T::NEG_INFINITY {
                    0
                } else {
                    (i + 1).saturating_sub(j0).min(cols)
                };
                T::exp_sub(&mut row[..visible], l);
                row[visible..].fill(T::ZERO);
            }
            let p_ij = MatRef::row_major(&p_tile, 0, BLOCK_K);
            // dV_j += Pᵀ dO_i.
            gemm_strided(
                cols,
                hd,
                rows,
                &mut dv[j0 * hd..],
                hd,
                true,
                p_ij.t(),
                do_i,
                T::ONE,
                false,
            );
            // dP = dO_i V_jᵀ, then dS = P∘(dP − D_i).
            gemm_strided(
                rows,
                cols,
                hd,
                &mut ds_tile,
                BLOCK_K,
                false,
                do_i,
                v_j.t(),
                T::ONE,
                false,
            );
            for r in 0..rows {
                let d = delta[i0 + r];
                let span = r * BLOCK_K..r * BLOCK_K + cols;
                for (s, p) in ds_tile[span.clone()].iter_mut().zip(&p_tile[span]) {
                    *s = *p * (*s - d);
                }
            }
            let ds_ij = MatRef::row_major(&ds_tile, 0, BLOCK_K);
            // dQ_i += scale·dS K_j;  dK_j += scale·dSᵀ Q_i.
            gemm_strided(
                rows,
                hd,
                cols,
                &mut dq[i0 * hd..],
                hd,
                true,
                ds_ij,
                k_j,
                scale,
                false,
            );
            gemm_strided(
                cols,
                hd,
                rows,
                &mut dk[j0 * hd..],
                hd,
                true,
                ds_ij.t(),
                q_i,
                scale,
                false,
            );
            i0 += rows;
        }
        j0 += cols;
    }
    SegmentGrad { dq, dk, dv }
}

/// Rows `r0..` of a row-major matrix `width` wide.
fn rows_from<T>(m: &[T], r0: usize, width: usize) -> MatRef<'_, T> {
    MatRef::row_major(m, r0 * width, width)
}

#[cfg(test)]
mod tests;
