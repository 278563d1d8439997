//! The training backward of attention (FlashAttention-2 style), for full
//! causal and shifted sparse (S²-Attn) patterns.
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

use super::{check_numel, check_qkv, group_bounds, Dims};
use crate::ir::{AttentionAttrs, AttentionPattern, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, gemm_strided, MatRef, Real};
use rayon::prelude::*;

/// Tile sizes of the backward. Smaller than the forward's: a tile keeps two
/// score-sized buffers (P and dS) plus four head_dim-wide operands hot.
const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 64;

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
    // The same groups as the forward's.
    let bounds = |start: usize, g: usize| group_bounds(len, start, g);
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
