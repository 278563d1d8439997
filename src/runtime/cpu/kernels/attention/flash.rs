//! The tiled attention forward every attention op runs (LLaMA Attention,
//! its S²-Attn groups, ONNX Attention): for a block of queries it walks key
//! blocks with an online softmax, so memory is O(block·head_dim) per task
//! instead of O(seq²), and causal masks skip the key blocks no query of the
//! block can see.

use crate::runtime::cpu::linalg::{gemm_strided, MatRef, Real};
use rayon::prelude::*;

/// Where the heads of a q/k/v/output tensor lie: element (b, h, row, c) is
/// at `b*batch + h*head + row*row + c`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadLayout {
    pub(crate) batch: usize,
    pub(crate) head: usize,
    pub(crate) row: usize,
}

impl HeadLayout {
    /// `[batch, seq, heads*dim]`.
    pub(crate) fn bshd(seq: usize, heads: usize, dim: usize) -> Self {
        HeadLayout {
            batch: seq * heads * dim,
            head: dim,
            row: heads * dim,
        }
    }

    /// `[batch, heads, seq, dim]`.
    pub(crate) fn bhsd(seq: usize, heads: usize, dim: usize) -> Self {
        HeadLayout {
            batch: heads * seq * dim,
            head: seq * dim,
            row: dim,
        }
    }

    pub(crate) fn at(&self, b: usize, h: usize) -> usize {
        b * self.batch + h * self.head
    }
}

/// An additive bias indexed (batch, head, query, key) through strides (0 on
/// broadcast dims); keys at or past `keys` are masked (`-inf`).
pub(crate) struct Bias<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) strides: [usize; 4],
    pub(crate) keys: usize,
}

pub(crate) struct AttnProblem<'a, T> {
    pub(crate) q: &'a [T],
    pub(crate) q_layout: HeadLayout,
    pub(crate) k: &'a [T],
    pub(crate) k_layout: HeadLayout,
    pub(crate) v: &'a [T],
    pub(crate) v_layout: HeadLayout,
    pub(crate) batch: usize,
    pub(crate) q_heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) q_len: usize,
    pub(crate) kv_len: usize,
    pub(crate) head_dim: usize,
    pub(crate) v_head_dim: usize,
    pub(crate) scale: T,
    /// `softcap·tanh(s/softcap)` on the scaled scores when positive.
    pub(crate) softcap: T,
    /// Query i sees key j only when `j <= i + offset`.
    pub(crate) causal_offset: Option<usize>,
    pub(crate) bias: Option<Bias<'a, T>>,
}

const BLOCK_Q: usize = 128;
const BLOCK_K: usize = 128;

/// Where the log-sum-exp of each query row goes: row (b, h, i) is at
/// `b*batch + h*head + i` (the `[batch, heads, seq]` layout, or a window of
/// it for a sub-problem).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LseLayout {
    pub(crate) batch: usize,
    pub(crate) head: usize,
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
pub(crate) fn flash_attention<T: Real>(
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
