//! LLaMA RoPE (transformers' rotate-half `apply_rotary_pos_emb`) and its
//! backward, one rotation in two directions: the forward turns each channel
//! pair by +θ, the backward (the forward's transpose) by −θ, with the very
//! cos/sin tables the forward used.

use super::{float_kind_error, min_rows};
use crate::ir::{DType, RopeAttrs, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, Real};
use rayon::prelude::*;
use std::sync::Arc;

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
    rotate("Rope", x, position_ids, attrs, Direction::Forward)
}

/// The transpose of [`rope`]: each rotated pair `(x1, x2)` went through
/// `[[c, −s], [s, c]]`, so the gradient goes through its transpose
/// `[[c, s], [−s, c]]` (rotation by −θ), with the very cos/sin the forward
/// used (same scaling, same `seq_len`, same positions). Channels past
/// `rotary_dim` pass through.
pub fn rope_grad(
    dy: &Tensor,
    positions: Option<&Tensor>,
    attrs: &RopeAttrs,
) -> Result<Tensor, String> {
    rotate("RopeGrad", dy, positions, attrs, Direction::Backward)
}

/// Which way [`rotate`] turns the channel pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// By +θ: `(x1, x2) → (x1·c − x2·s, x2·c + x1·s)` (Rope).
    Forward,
    /// By −θ, the forward's transpose (RopeGrad).
    Backward,
}

fn rotate(
    op: &str,
    x: &Tensor,
    position_ids: Option<&Tensor>,
    attrs: &RopeAttrs,
    direction: Direction,
) -> Result<Tensor, String> {
    let setup = RopeSetup::new(op, x, position_ids, attrs)?;
    let dtype = x.dtype;
    fn run<T: Real>(x: &[T], st: &RopeSetup, dtype: DType, direction: Direction) -> Vec<T> {
        let mut out = T::copy_of(x);
        let (hidden, hd, rd) = (st.hidden, st.head_dim, st.rotary_dim);
        if hidden == 0 || rd == 0 {
            return out;
        }
        let half = rd / 2;
        let (cos, sin) = st.tables::<T>(dtype, direction);
        let r = |v: T| T::round_one(dtype, v);
        // A half-precision forward rounds each product and sum as
        // transformers computes it; the backward, like every backward here,
        // treats those roundings as identities.
        let rounds = direction == Direction::Forward && matches!(dtype, DType::F16 | DType::BF16);
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
        TensorData::F32(v) => Ok(finish(
            dtype,
            x.shape.clone(),
            run(v, &setup, dtype, direction),
        )),
        TensorData::F64(v) => Ok(finish(
            dtype,
            x.shape.clone(),
            run(v, &setup, dtype, direction),
        )),
        _ => Err(float_kind_error(
            op,
            match direction {
                Direction::Forward => "input",
                Direction::Backward => "dy",
            },
            x,
        )),
    }
}

/// The checked sizes, the positions and the cos/sin tables of one call.
struct RopeSetup {
    seq: usize,
    hidden: usize,
    head_dim: usize,
    rotary_dim: usize,
    /// 1 when every row uses positions `[seq]`, else the batch.
    pos_batch: usize,
    /// `[positions, rotary_dim]` cos and sin (see `ir::rope::cos_sin`).
    cos_sin: Arc<(Vec<f32>, Vec<f32>)>,
}

impl RopeSetup {
    fn new(
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
    fn position_row(&self, row: usize) -> usize {
        if self.pos_batch == 1 {
            row % self.seq
        } else {
            row
        }
    }

    /// The tables in the compute type, rounded to `dtype`'s precision (a
    /// half-precision model holds its cos/sin in half precision), with the
    /// sines of `direction`.
    fn tables<T: Real>(&self, dtype: DType, direction: Direction) -> (Vec<T>, Vec<T>) {
        let conv = |t: &[f32]| -> Vec<T> {
            t.iter()
                .map(|&v| T::round_one(dtype, T::from_f64(v as f64)))
                .collect()
        };
        let cos = conv(&self.cos_sin.0);
        let mut sin = conv(&self.cos_sin.1);
        if direction == Direction::Backward {
            // The transpose of [[c_lo, −s_lo], [s_hi, c_hi]] is
            // [[c_lo, s_hi], [−s_lo, c_hi]]: the forward's formula with the
            // sines (−s_hi, −s_lo). The tables hold cat(freqs, freqs), so
            // that is −sin, the rotation by −θ. Negation is exact, so this
            // computes the very products and sums of the transpose.
            let half = self.rotary_dim / 2;
            for row in sin.chunks_mut(self.rotary_dim.max(1)) {
                let (lo, hi) = row.split_at_mut(half);
                for (a, b) in lo.iter_mut().zip(hi) {
                    (*a, *b) = (-*b, -*a);
                }
            }
        }
        (cos, sin)
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

// ---------------------------------------------------------------------------
// Reference

/// RoPE and its backward as their definitions read, in plain loops over
/// f64: what every backend's kernels are compared against. Activations are
/// `[rows, heads·head_dim]` (rows = batch·seq), and `table_rows[row]` is
/// the row of the `[positions, rotary_dim]` tables that activation row
/// uses.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
pub(crate) mod reference {
    use crate::ir::RopeAttrs;

    /// The tables the kernels use at `positions`, widened to f64:
    /// [`crate::ir::rope::cos_sin`] at `seq_len = max position + 1`.
    pub fn tables(attrs: &RopeAttrs, positions: &[i64]) -> (Vec<f64>, Vec<f64>) {
        let seq_len = positions.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
        let (cos, sin) = crate::ir::rope::cos_sin(attrs, positions, seq_len);
        let wide = |t: Vec<f32>| t.into_iter().map(f64::from).collect();
        (wide(cos), wide(sin))
    }

    /// transformers' rotate-half RoPE: channel c < rotary_dim of each head
    /// becomes `x[c]·cos[p, c] + rotate_half(x)[c]·sin[p, c]` with
    /// `rotate_half(x) = (−x[half..], x[..half])`; the rest pass through.
    pub fn rope(
        x: &[f64],
        attrs: &RopeAttrs,
        table_rows: &[usize],
        cos: &[f64],
        sin: &[f64],
    ) -> Vec<f64> {
        let (heads, hd, rd) = (attrs.num_heads, attrs.head_dim, attrs.rotary_dim);
        let half = rd / 2;
        let mut out = x.to_vec();
        for (row, &p) in table_rows.iter().enumerate() {
            for h in 0..heads {
                let base = (row * heads + h) * hd;
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
        out
    }

    /// The gradient of `Σ rope(x)·dy` for x: `Jᵀ·dy` with J the forward's
    /// linear map, accumulated entry by entry from the forward's formula.
    pub fn rope_grad(
        dy: &[f64],
        attrs: &RopeAttrs,
        table_rows: &[usize],
        cos: &[f64],
        sin: &[f64],
    ) -> Vec<f64> {
        let (heads, hd, rd) = (attrs.num_heads, attrs.head_dim, attrs.rotary_dim);
        let half = rd / 2;
        let mut dx = dy.to_vec();
        for (row, &p) in table_rows.iter().enumerate() {
            for h in 0..heads {
                let base = (row * heads + h) * hd;
                dx[base..base + rd].fill(0.0);
                for c in 0..rd {
                    // out[c] = x[c]·cos[c] + sign·x[partner]·sin[c].
                    let (partner, sign) = if c < half {
                        (c + half, -1.0)
                    } else {
                        (c - half, 1.0)
                    };
                    dx[base + c] += dy[base + c] * cos[p * rd + c];
                    dx[base + partner] += sign * dy[base + c] * sin[p * rd + c];
                }
            }
        }
        dx
    }
}

#[cfg(test)]
mod tests;
