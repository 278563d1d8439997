//! The training loss: mean next-token cross-entropy (Hugging Face's
//! shifted loss) and its gradient for the logits.

use super::{compute_dtype, float_kind_error, min_rows};
use crate::ir::{DType, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, Real};
use rayon::prelude::*;

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
    Ok(match compute_dtype(logits) {
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
// Reference

/// The loss and its gradient as their definitions read, in plain loops over
/// f64 on `[batch, seq, vocab]` logits and `[batch, seq]` labels: what every
/// backend's kernels are compared against. Scored labels must be in the
/// vocabulary.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
#[allow(clippy::needless_range_loop)]
pub(crate) mod reference {
    /// `log Σ_v exp(row[v])`, stabilised by the row's maximum.
    fn log_sum_exp(row: &[f64]) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
    }

    /// The positions scored and their targets: (b, t) against
    /// `labels[b, t+1]` unless that is `ignore_index`.
    fn scored(
        labels: &[i64],
        (batch, seq): (usize, usize),
        ignore_index: i64,
    ) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for b in 0..batch {
            for t in 0..seq.saturating_sub(1) {
                let l = labels[b * seq + t + 1];
                if l != ignore_index {
                    out.push((b * seq + t, l as usize));
                }
            }
        }
        out
    }

    /// `mean over scored (b, t) of lse(logits[b, t]) − logits[b, t, labels[b, t+1]]`;
    /// 0 when nothing is scored.
    pub fn cross_entropy(
        logits: &[f64],
        labels: &[i64],
        (batch, seq, vocab): (usize, usize, usize),
        ignore_index: i64,
    ) -> f64 {
        let rows = scored(labels, (batch, seq), ignore_index);
        if rows.is_empty() {
            return 0.0;
        }
        let total: f64 = rows
            .iter()
            .map(|&(r, l)| {
                let row = &logits[r * vocab..(r + 1) * vocab];
                log_sum_exp(row) - row[l]
            })
            .sum();
        total / rows.len() as f64
    }

    /// The gradient of `dloss·cross_entropy` for the logits:
    /// `dloss/count·(softmax(row) − onehot(label))` on scored rows, 0 elsewhere.
    pub fn cross_entropy_grad(
        logits: &[f64],
        labels: &[i64],
        (batch, seq, vocab): (usize, usize, usize),
        dloss: f64,
        ignore_index: i64,
    ) -> Vec<f64> {
        let rows = scored(labels, (batch, seq), ignore_index);
        let mut grad = vec![0.0; logits.len()];
        for &(r, l) in &rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let lse = log_sum_exp(row);
            for v in 0..vocab {
                let onehot = if v == l { 1.0 } else { 0.0 };
                grad[r * vocab + v] = dloss / rows.len() as f64 * ((row[v] - lse).exp() - onehot);
            }
        }
        grad
    }
}

#[cfg(test)]
mod tests;
