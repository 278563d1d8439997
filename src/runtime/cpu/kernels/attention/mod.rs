//! Attention: LLaMA self-attention (full causal, or LongLoRA's shifted
//! sparse S²-Attn) for inference, and for training the forward that also
//! returns each query row's log-sum-exp and the tiled backward
//! (FlashAttention-2 style, in [`backward`]).
//!
//! Every forward runs one tiled kernel, [`flash`] (ONNX Attention runs it
//! too). An S²-Attn group is one small causal problem for it, so memory
//! stays linear in the length and only the tiles inside groups are
//! computed (about G/L of full attention's work). The training forward is
//! the inference kernel asked to also report each row's softmax max `m`
//! and sum `l`, so its output is bit-identical to [`attention`];
//! `lse = m + ln(l)` over the scaled scores is all the backward needs to
//! rebuild any tile of probabilities without storing them.

mod backward;
pub(crate) mod flash;

pub use backward::attention_grad;

use super::{float_kind_error, same_data_kind};
use crate::ir::{AttentionAttrs, AttentionPattern, DType, GroupSize, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, Real};
use flash::{flash_attention, AttnProblem, HeadLayout, LseLayout};

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

/// Training forward: `(out, lse)`. `out` is `[batch, seq, heads*head_dim]`,
/// bit-identical to [`attention`] (the very same computation); `lse` is
/// `[batch, heads, seq]` in q's dtype, the log-sum-exp of each query row's
/// scaled scores over the keys it sees (for S²-Attn heads, within its
/// group). f32 and f64 only, and no KV cache.
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<(Tensor, Tensor), String> {
    check_qkv("AttentionFwd", q, k, v, attrs)?;
    let (out, lse) = attention_impl(q, k, v, attrs, true)?;
    let lse = lse.ok_or_else(|| "Attention: the kernel did not report lse".to_string())?;
    Ok((out, lse))
}

/// The sizes of a training attention problem.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// `(batch, seq)` of a `[batch, seq, heads×head_dim]` tensor.
fn dims3(
    op: &str,
    t: &Tensor,
    heads: usize,
    head_dim: usize,
    name: &str,
) -> Result<(usize, usize), String> {
    match *t.shape.as_slice() {
        [b, s, w] if Some(w) == heads.checked_mul(head_dim) => Ok((b, s)),
        _ => Err(format!(
            "{op}: {name} must be [batch, seq, {heads}×{head_dim}], got {:?}",
            t.shape
        )),
    }
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
    let (batch, len) = dims3(op, q, heads, hd, "q")?;
    check_numel(op, &[("q", q), ("k", k), ("v", v)])?;
    let kd = dims3(op, k, kv_heads, hd, "k")?;
    let vd = dims3(op, v, kv_heads, hd, "v")?;
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

/// The S²-Attn groups of a sequence of `len` positions whose first group
/// boundary after 0 is `start` (0 or G/2): `[0, start)` when start > 0,
/// then `[start, start+G)`, … clipped to `len`.
fn group_bounds(len: usize, start: usize, group: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    if start > 0 {
        v.push((0, start.min(len)));
    }
    let mut a = start;
    while a < len {
        v.push((a, (a + group).min(len)));
        a += group;
    }
    v
}

/// What [`attention`] and [`attention_fwd`] run: the checks, then the tiled
/// kernel on the pattern's causal problems; with `want_lse`, each row's
/// log-sum-exp too.
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
    let (batch, q_len) = dims3(OP, q, heads, hd, "q")?;
    let (kb, kv_len) = dims3(OP, k, kv_heads, hd, "k")?;
    let (vb, v_len) = dims3(OP, v, kv_heads, hd, "v")?;
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
        let groups = |start: usize| group_bounds(len, start, g);
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

// ---------------------------------------------------------------------------
// Reference

/// Attention and its gradient as their definitions read: dense f64 scores
/// with an explicit masked softmax, O(len²) per head, straight from the
/// pattern (not from the kernels' tiles, groups or segments). What every
/// backend's attention kernels are compared against. Tensors are
/// `[batch, seq, heads·head_dim]` as the kernels take them; inputs must be
/// valid.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
pub(crate) mod reference {
    use crate::ir::{AttentionAttrs, AttentionPattern};

    /// Whether query i of head h sees key j: full causal aligns the
    /// frontier bottom-right (`j <= i + kv_len − q_len`, a KV cache);
    /// S²-Attn (q_len = kv_len = len) keeps the first half of the heads
    /// within groups of G and the second half within groups shifted by G/2
    /// (or, with `wrap`, within groups of the sequence rolled by −G/2).
    pub fn sees(
        pattern: &AttentionPattern,
        heads: usize,
        (q_len, kv_len): (usize, usize),
        h: usize,
        i: usize,
        j: usize,
    ) -> bool {
        match *pattern {
            AttentionPattern::FullCausal => j <= i + (kv_len - q_len),
            AttentionPattern::ShiftedSparse { group, wrap } => {
                let len = q_len;
                let g = group.tokens(len);
                let shift = g / 2;
                if h < heads / 2 {
                    j <= i && i / g == j / g
                } else if !wrap {
                    let id = |t: usize| if t < shift { 0 } else { (t - shift) / g + 1 };
                    j <= i && id(i) == id(j)
                } else {
                    // Rolled by −shift: position t sits at (t − shift) mod len.
                    let r = |t: usize| (t + len - shift % len) % len;
                    r(j) <= r(i) && r(i) / g == r(j) / g
                }
            }
        }
    }

    /// Query row i of head h in batch b: the softmax over the keys it sees
    /// (0 for the others) and the log-sum-exp of its scaled scores.
    #[allow(clippy::too_many_arguments)]
    fn row_probabilities(
        q: &[f64],
        k: &[f64],
        (q_len, kv_len): (usize, usize),
        a: &AttentionAttrs,
        b: usize,
        h: usize,
        i: usize,
    ) -> (Vec<f64>, f64) {
        let (heads, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let g = h / (heads / kvh);
        let qo = (b * q_len + i) * heads * hd + h * hd;
        let s: Vec<Option<f64>> = (0..kv_len)
            .map(|j| {
                let ko = (b * kv_len + j) * kvh * hd + g * hd;
                sees(&a.pattern, heads, (q_len, kv_len), h, i, j)
                    .then(|| (0..hd).map(|c| q[qo + c] * k[ko + c]).sum::<f64>() * a.scale as f64)
            })
            .collect();
        let m = s.iter().flatten().fold(f64::NEG_INFINITY, |x, &y| x.max(y));
        let sum: f64 = s.iter().flatten().map(|x| (x - m).exp()).sum();
        let lse = m + sum.ln();
        let p = s
            .iter()
            .map(|x| x.map_or(0.0, |x| (x - lse).exp()))
            .collect();
        (p, lse)
    }

    /// `(out, lse)`: out `[batch, q_len, heads·hd]` = P·V, lse
    /// `[batch, heads, q_len]`.
    pub fn attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        batch: usize,
        (q_len, kv_len): (usize, usize),
        a: &AttentionAttrs,
    ) -> (Vec<f64>, Vec<f64>) {
        let (heads, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; batch * heads * q_len];
        for b in 0..batch {
            for h in 0..heads {
                let g = h / (heads / kvh);
                for i in 0..q_len {
                    let (p, l) = row_probabilities(q, k, (q_len, kv_len), a, b, h, i);
                    lse[(b * heads + h) * q_len + i] = l;
                    let qo = (b * q_len + i) * heads * hd + h * hd;
                    for (j, &pj) in p.iter().enumerate() {
                        let ko = (b * kv_len + j) * kvh * hd + g * hd;
                        for c in 0..hd {
                            out[qo + c] += pj * v[ko + c];
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// `(dq, dk, dv)` of `Σ out·dout` for q, k, v of one length `len`:
    /// `dV_j = Σ_i P_ij dO_i`, `dS_ij = P_ij (dO_i·V_j − Σ_l P_il dO_i·V_l)`,
    /// `dQ_i = scale Σ_j dS_ij K_j`, `dK_j = scale Σ_i dS_ij Q_i`.
    pub fn attention_grad(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dout: &[f64],
        batch: usize,
        len: usize,
        a: &AttentionAttrs,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (heads, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let scale = a.scale as f64;
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        for b in 0..batch {
            for h in 0..heads {
                let g = h / (heads / kvh);
                for i in 0..len {
                    let (p, _) = row_probabilities(q, k, (len, len), a, b, h, i);
                    let qo = (b * len + i) * heads * hd + h * hd;
                    let ko = |j: usize| (b * len + j) * kvh * hd + g * hd;
                    let dp: Vec<f64> = (0..len)
                        .map(|j| (0..hd).map(|c| dout[qo + c] * v[ko(j) + c]).sum())
                        .collect();
                    let d: f64 = p.iter().zip(&dp).map(|(x, y)| x * y).sum();
                    for j in 0..len {
                        let ds = p[j] * (dp[j] - d);
                        for c in 0..hd {
                            dv[ko(j) + c] += p[j] * dout[qo + c];
                            dq[qo + c] += scale * ds * k[ko(j) + c];
                            dk[ko(j) + c] += scale * ds * q[qo + c];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

#[cfg(test)]
mod tests;
