//! Token embedding: the lookup and its backward (a scatter-add into the
//! table's rows).

use super::{float_kind_error, min_rows};
use crate::ir::{Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, output_numel, Real};
use rayon::prelude::*;

/// `(vocab, hidden)` of a `[vocab, hidden]` table, the ids, and the shape
/// of the looked-up rows (`ids.shape ++ [hidden]`), for the lookup and its
/// backward alike.
type Lookup<'a> = (usize, usize, &'a [i64], Vec<usize>);

fn lookup_geometry<'a>(op: &str, weight: &Tensor, ids: &'a Tensor) -> Result<Lookup<'a>, String> {
    let [vocab, hidden] = *weight.shape.as_slice() else {
        return Err(format!(
            "{op} weight must be 2-D [vocab, hidden], got {:?}",
            weight.shape
        ));
    };
    let id_vals = ids
        .as_i64()
        .ok_or_else(|| format!("{op} ids must be integers, got {}", ids.dtype))?;
    let mut shape = ids.shape.clone();
    shape.push(hidden);
    Ok((vocab, hidden, id_vals, shape))
}

/// Token embedding: rows of `weight` `[vocab, hidden]` picked by `ids` (any
/// integer type, any shape) → `ids.shape ++ [hidden]`.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "Embedding";
    let (vocab, hidden, id_vals, shape) = lookup_geometry(OP, weight, ids)?;
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

/// Backward of the embedding lookup: `dW[id] += dy[token]` for every token.
/// Tokens are bucketed by id (keeping token order), then each vocabulary row
/// sums its tokens in that order, in f64, rows in parallel: deterministic
/// whatever the thread count. `weight` is read only for its shape and type.
pub fn embedding_grad(weight: &Tensor, ids: &Tensor, dy: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "EmbeddingGrad";
    let (vocab, hidden, id_vals, want) = lookup_geometry(OP, weight, ids)?;
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
// Reference

/// The embedding and its backward as their definitions read, in plain loops
/// over f64 on a row-major `[vocab, hidden]` table: what every backend's
/// kernels are compared against. Ids must be in the vocabulary.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
pub(crate) mod reference {
    /// Row `ids[t]` of the table for every token t: `[tokens, hidden]`.
    pub fn embedding(weight: &[f64], hidden: usize, ids: &[i64]) -> Vec<f64> {
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let row = id as usize * hidden;
            out.extend_from_slice(&weight[row..row + hidden]);
        }
        out
    }

    /// The gradient of `Σ embedding·dy` for the table: `dW[v] = Σ_{t: ids[t] = v} dy[t]`.
    pub fn embedding_grad(ids: &[i64], dy: &[f64], vocab: usize, hidden: usize) -> Vec<f64> {
        let mut dw = vec![0.0; vocab * hidden];
        for (t, &id) in ids.iter().enumerate() {
            for c in 0..hidden {
                dw[id as usize * hidden + c] += dy[t * hidden + c];
            }
        }
        dw
    }
}

#[cfg(test)]
mod tests;
