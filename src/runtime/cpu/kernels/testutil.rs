//! What the kernel tests share: f64 tensors, random data, and the
//! finite-difference check every backward kernel goes through.

pub use crate::runtime::cpu::linalg::testutil::{assert_close, Rng};

use crate::ir::{DType, Tensor, TensorData};

pub fn t64(shape: &[usize], v: Vec<f64>) -> Tensor {
    Tensor {
        dtype: DType::F64,
        shape: shape.to_vec(),
        data: TensorData::F64(v),
    }
}

/// A random f64 tensor (values of `Rng::f32`, widened).
pub fn rand64(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    t64(shape, (0..n).map(|_| rng.f32() as f64).collect())
}

/// The f64 tensor rounded to f32.
pub fn to_f32(t: &Tensor) -> Tensor {
    Tensor::f32(
        t.shape.clone(),
        t.to_f64_vec().iter().map(|&x| x as f32).collect(),
    )
}

/// The f32 tensor widened to f64 (exactly).
pub fn to_f64(t: &Tensor) -> Tensor {
    t64(&t.shape, t.to_f64_vec())
}

pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| x * y)
        .sum()
}

/// Central differences of `f` at every coordinate of `x`, compared with
/// `grad`; returns the largest error relative to max|grad|.
pub fn check_fd(what: &str, x: &Tensor, grad: &Tensor, f: impl Fn(&Tensor) -> f64) -> f64 {
    assert_eq!(x.shape, grad.shape, "{what}: gradient shape");
    let h = 1e-5;
    let base = x.to_f64_vec();
    let g = grad.to_f64_vec();
    let scale = g.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let mut worst = 0f64;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&t64(&x.shape, p.clone()));
        p[i] -= 2.0 * h;
        let fm = f(&t64(&x.shape, p));
        let fd = (fp - fm) / (2.0 * h);
        let err = (fd - g[i]).abs() / scale;
        assert!(
            err < 1e-6,
            "{what}: coordinate {i}: analytic {} vs finite differences {fd}",
            g[i]
        );
        worst = worst.max(err);
    }
    worst
}

/// Runs `f` in a pool of `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}
