//! Projections: Linear (`x·Wᵀ + b`), LoraLinear, and the weight gradient
//! of a projection. The input gradient of a projection is a plain MatMul
//! (`dy·W`), which `autodiff` emits as one.

use super::{compute_dtype, float_kind_error, promote, same_data_kind};
use crate::ir::{DType, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, gemm_strided, output_numel, MatRef, Real};
use crate::runtime::cpu::pool;

/// `x [..., in] · Wᵀ + bias` with W `[out, in]` (Hugging Face layout), read
/// through a transposed view (no copy of W).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, String> {
    const OP: &str = "Linear";
    let (out_f, in_f) = match *weight.shape.as_slice() {
        [o, i] => (o, i),
        _ => {
            return Err(format!(
                "{OP} weight must be 2-D [out, in], got {:?}",
                weight.shape
            ))
        }
    };
    if x.shape.last() != Some(&in_f) {
        return Err(format!(
            "{OP} input {:?} does not end in the weight's in-features {in_f} (weight {:?})",
            x.shape, weight.shape
        ));
    }
    if let Some(b) = bias {
        if b.numel() != out_f || b.rank() != 1 {
            return Err(format!(
                "{OP} bias of shape {:?} does not match out-features {out_f}",
                b.shape
            ));
        }
        if !same_data_kind(x, b) {
            return Err(format!(
                "{OP} bias ({}) and input ({}) differ in type",
                b.dtype, x.dtype
            ));
        }
    }
    if !same_data_kind(x, weight) {
        return Err(format!(
            "{OP} input ({}) and weight ({}) have different types",
            x.dtype, weight.dtype
        ));
    }
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = out_f;
    }
    output_numel(&shape, x.dtype.size().max(4), "Linear output")?;
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    fn run<T: Real>(
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        rows: usize,
        in_f: usize,
        out_f: usize,
    ) -> Vec<T> {
        let mut out = T::zeroed(rows * out_f);
        if let Some(b) = b {
            for row in out.chunks_mut(out_f.max(1)) {
                row.copy_from_slice(&b[..row.len()]);
            }
        }
        gemm_strided(
            rows,
            out_f,
            in_f,
            &mut out,
            out_f,
            b.is_some(),
            MatRef::row_major(x, 0, in_f),
            MatRef::row_major(w, 0, in_f).t(),
            T::ONE,
            true,
        );
        out
    }
    let dtype = promote(x.dtype, weight.dtype);
    match (&x.data, &weight.data) {
        (TensorData::F32(a), TensorData::F32(w)) => Ok(finish(
            dtype,
            shape,
            run(a, w, bias.and_then(|b| b.as_f32()), rows, in_f, out_f),
        )),
        (TensorData::F64(a), TensorData::F64(w)) => Ok(finish(
            dtype,
            shape,
            run(
                a,
                w,
                bias.and_then(|b| f64::slice(&b.data)),
                rows,
                in_f,
                out_f,
            ),
        )),
        _ => Err(float_kind_error(OP, "input", x)),
    }
}

/// LoRA projection `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias)` with W `[out, in]`,
/// A `[rank, in]`, B `[out, rank]` (PEFT layouts), all read through
/// transposed views (no copy of W). Inference only: no dropout.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    lora_a: &Tensor,
    lora_b: &Tensor,
    bias: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor, String> {
    const OP: &str = "LoraLinear";
    let (out_f, in_f) = match *weight.shape.as_slice() {
        [o, i] => (o, i),
        _ => {
            return Err(format!(
                "{OP} weight must be 2-D [out, in], got {:?}",
                weight.shape
            ))
        }
    };
    let rank = match *lora_a.shape.as_slice() {
        [r, i] if i == in_f => r,
        _ => {
            return Err(format!(
                "{OP} lora_A must be [rank, {in_f}] (in-features of weight {:?}), got {:?}",
                weight.shape, lora_a.shape
            ))
        }
    };
    if lora_b.shape != [out_f, rank] {
        return Err(format!(
            "{OP} lora_B must be [{out_f}, {rank}] (out-features × rank of lora_A {:?}), got {:?}",
            lora_a.shape, lora_b.shape
        ));
    }
    if !same_data_kind(x, lora_a) || !same_data_kind(x, lora_b) {
        return Err(format!(
            "{OP} input ({}), lora_A ({}) and lora_B ({}) must have the same type",
            x.dtype, lora_a.dtype, lora_b.dtype
        ));
    }
    let mut y = linear(x, weight, bias)?;
    let down = linear(x, lora_a, None)?;
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    #[allow(clippy::too_many_arguments)]
    fn up<T: Real>(
        y: &mut [T],
        down: &[T],
        b: &[T],
        rows: usize,
        rank: usize,
        out_f: usize,
        scale: f32,
        dtype: DType,
    ) {
        gemm_strided(
            rows,
            out_f,
            rank,
            y,
            out_f,
            true,
            MatRef::row_major(down, 0, rank),
            MatRef::row_major(b, 0, rank).t(),
            T::from_f64(scale as f64),
            true,
        );
        T::round_storage(dtype, y);
    }
    let dtype = y.dtype;
    match (&mut y.data, &down.data, &lora_b.data) {
        (TensorData::F32(y), TensorData::F32(d), TensorData::F32(b)) => {
            up(y, d, b, rows, rank, out_f, scale, dtype)
        }
        (TensorData::F64(y), TensorData::F64(d), TensorData::F64(b)) => {
            up(y, d, b, rows, rank, out_f, scale, dtype)
        }
        _ => return Err(float_kind_error(OP, "input", x)),
    }
    if let TensorData::F32(v) = down.data {
        pool::recycle(v);
    }
    Ok(y)
}

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
    if !same_data_kind(x, dy) {
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
        compute_dtype(x)
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

// ---------------------------------------------------------------------------
// Reference

/// The projections as their definitions read, in plain loops over f64 on
/// row-major `[rows, features]` activations and `[out, in]` weights: what
/// every backend's kernels are compared against.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
#[allow(clippy::needless_range_loop)]
pub(crate) mod reference {
    /// `y[r, o] = bias[o] + Σ_i x[r, i]·w[o, i]`.
    pub fn linear(
        x: &[f64],
        weight: &[f64],
        bias: Option<&[f64]>,
        (rows, in_f, out_f): (usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0.0; rows * out_f];
        for r in 0..rows {
            for o in 0..out_f {
                let mut s = bias.map_or(0.0, |b| b[o]);
                for i in 0..in_f {
                    s += x[r * in_f + i] * weight[o * in_f + i];
                }
                out[r * out_f + o] = s;
            }
        }
        out
    }

    /// `linear(x, w, bias) + scale·(x·Aᵀ)·Bᵀ` with A `[rank, in]`, B `[out, rank]`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear(
        x: &[f64],
        weight: &[f64],
        lora_a: &[f64],
        lora_b: &[f64],
        bias: Option<&[f64]>,
        scale: f32,
        (rows, in_f, rank, out_f): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = linear(x, weight, bias, (rows, in_f, out_f));
        let down = linear(x, lora_a, None, (rows, in_f, rank));
        let up = linear(&down, lora_b, None, (rows, rank, out_f));
        for (o, u) in out.iter_mut().zip(up) {
            *o += scale as f64 * u;
        }
        out
    }

    /// The gradient of `Σ linear(x, W)·dy` for W: `dW[o, i] = Σ_r dy[r, o]·x[r, i]`.
    pub fn linear_grad_weight(
        x: &[f64],
        dy: &[f64],
        (rows, in_f, out_f): (usize, usize, usize),
    ) -> Vec<f64> {
        let mut dw = vec![0.0; out_f * in_f];
        for o in 0..out_f {
            for i in 0..in_f {
                for r in 0..rows {
                    dw[o * in_f + i] += dy[r * out_f + o] * x[r * in_f + i];
                }
            }
        }
        dw
    }
}

#[cfg(test)]
mod tests;
