//! The LLaMA MLP's gate: SwiGLU, `silu(gate)·up`, and its backward.

use super::{promote, MIN_TASK_ELEMS};
use crate::ir::{DType, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, Real};
use rayon::prelude::*;

/// `silu(gate) · up` with `silu(g) = g / (1 + exp(-g))`; shapes must match.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, String> {
    const OP: &str = "SwiGlu";
    if gate.shape != up.shape {
        return Err(format!(
            "{OP} gate {:?} and up {:?} must have the same shape",
            gate.shape, up.shape
        ));
    }
    let dtype = promote(gate.dtype, up.dtype);
    fn run<T: Real>(g: &[T], u: &[T], gdt: DType) -> Vec<T> {
        let mut out = T::zeroed(g.len());
        let half = matches!(gdt, DType::F16 | DType::BF16);
        out.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(
                g.par_chunks(MIN_TASK_ELEMS)
                    .zip(u.par_chunks(MIN_TASK_ELEMS)),
            )
            .for_each(|(o, (g, u))| {
                if half {
                    // silu is rounded to the gate's precision before the
                    // product, as a half-precision model computes it.
                    T::silu(g, o);
                    for (o, &u) in o.iter_mut().zip(u) {
                        *o = T::round_one(gdt, *o) * u;
                    }
                } else {
                    T::silu_mul(g, u, o);
                }
            });
        out
    }
    match (&gate.data, &up.data) {
        (TensorData::F32(g), TensorData::F32(u)) => {
            Ok(finish(dtype, gate.shape.clone(), run(g, u, gate.dtype)))
        }
        (TensorData::F64(g), TensorData::F64(u)) => {
            Ok(finish(dtype, gate.shape.clone(), run(g, u, gate.dtype)))
        }
        _ => Err(format!(
            "{OP} needs float gate and up of one type, got {} and {}",
            gate.dtype, up.dtype
        )),
    }
}

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
// Reference

/// SwiGLU and its backward as their definitions read, elementwise in f64:
/// what every backend's kernels are compared against.
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
pub(crate) mod reference {
    fn sigmoid(g: f64) -> f64 {
        1.0 / (1.0 + (-g).exp())
    }

    /// `silu(g)·u` with `silu(g) = g·σ(g)`.
    pub fn swiglu(gate: &[f64], up: &[f64]) -> Vec<f64> {
        gate.iter()
            .zip(up)
            .map(|(&g, &u)| g * sigmoid(g) * u)
            .collect()
    }

    /// `(dgate, dup)` of `Σ swiglu·dy`: `dup = dy·silu(g)` and
    /// `dgate = dy·u·silu'(g)` with `silu'(g) = σ(g) + g·σ(g)·(1 − σ(g))`.
    pub fn swiglu_grad(gate: &[f64], up: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut dgate = Vec::with_capacity(gate.len());
        let mut dup = Vec::with_capacity(gate.len());
        for ((&g, &u), &d) in gate.iter().zip(up).zip(dy) {
            let s = sigmoid(g);
            dup.push(d * g * s);
            dgate.push(d * u * (s + g * s * (1.0 - s)));
        }
        (dgate, dup)
    }
}

#[cfg(test)]
mod tests;
