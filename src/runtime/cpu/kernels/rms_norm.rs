//! LLaMA RMSNorm (over the last axis, with a weight) and its backward.
//! ONNX's RMSNormalization is in [`super::onnx_nn`].

use super::{float_kind_error, min_rows, promote, same_data_kind};
use crate::ir::{DType, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, Real};
use rayon::prelude::*;

/// Rows per partial sum of the weight gradient. Fixed (not derived from the
/// thread count) so that the summation order, and thus the result, is the
/// same on every machine.
const REDUCE_CHUNK_ROWS: usize = 64;

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
        let mut out = T::zeroed(x.len());
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
    if !same_data_kind(x, weight) || !same_data_kind(x, dy) {
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
// Reference

/// RmsNorm and its backward as their definitions read, in plain loops over
/// f64 on `[rows, hidden]` rows: what every backend's kernels are compared
/// against.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
#[allow(clippy::needless_range_loop)]
pub(crate) mod reference {
    /// `y = w · x / sqrt(mean(x²) + eps)` over each row of `hidden`.
    pub fn rms_norm(x: &[f64], weight: &[f64], hidden: usize, eps: f32) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for (r, row) in x.chunks(hidden.max(1)).enumerate() {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for c in 0..hidden {
                out[r * hidden + c] = weight[c] * row[c] * inv;
            }
        }
        out
    }

    /// `(dx, dw)` of `Σ y·dy`, through the Jacobian of each row's
    /// normalisation: with `inv = 1/sqrt(mean(x²) + eps)`,
    /// `∂(x_j·inv)/∂x_i = inv·δ_ij − x_j·x_i·inv³/hidden`, so
    /// `dx_i = Σ_j dy_j·w_j·∂(x_j·inv)/∂x_i` and `dw_j = Σ_rows dy_j·x_j·inv`.
    pub fn rms_norm_grad(
        x: &[f64],
        weight: &[f64],
        dy: &[f64],
        hidden: usize,
        eps: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; hidden];
        for (r, row) in x.chunks(hidden.max(1)).enumerate() {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            let g = &dy[r * hidden..(r + 1) * hidden];
            for j in 0..hidden {
                dw[j] += g[j] * row[j] * inv;
                for i in 0..hidden {
                    let delta = if i == j { inv } else { 0.0 };
                    let jac = delta - row[j] * row[i] * inv.powi(3) / hidden as f64;
                    dx[r * hidden + i] += g[j] * weight[j] * jac;
                }
            }
        }
        (dx, dw)
    }
}

#[cfg(test)]
mod tests;
