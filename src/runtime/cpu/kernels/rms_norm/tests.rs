//! RmsNorm against its reference (f32 loosely, f64 tightly) and in bf16 as
//! transformers rounds it; the backward against the reference and against
//! finite differences of the forward.

use super::super::testutil::{
    assert_close, check_fd, dot, rand64, to_f32, to_f64, with_threads, Rng,
};
use super::*;

#[test]
fn rms_norm_matches_reference() {
    let mut rng = Rng(15);
    for shape in [vec![2, 7, 16], vec![1, 130, 8], vec![5]] {
        let h = *shape.last().unwrap();
        let x = rng.tensor(&shape);
        let w = rng.tensor(&[h]);
        let got = rms_norm(&x, &w, 1e-6).unwrap();
        let want = reference::rms_norm(&x.to_f64_vec(), &w.to_f64_vec(), h, 1e-6);
        assert_close(&got.to_f64_vec(), &want, 1e-6, &format!("{shape:?}"));
        let got64 = rms_norm(&to_f64(&x), &to_f64(&w), 1e-6).unwrap();
        assert_eq!(got64.dtype, DType::F64);
        assert_close(&got64.to_f64_vec(), &want, 1e-14, &format!("f64 {shape:?}"));
    }
    // bf16: the normalised value is rounded to bf16 before the weight
    // multiplies it, and the product is rounded again (transformers).
    let mut x = Tensor::f32(vec![1, 2], vec![1.0, 3.0]);
    x.dtype = DType::BF16;
    let mut w = Tensor::f32(vec![2], vec![1.0, 1.0]);
    w.dtype = DType::BF16;
    let got = rms_norm(&x, &w, 0.0).unwrap();
    assert_eq!(got.dtype, DType::BF16);
    let inv = 1.0 / (5.0f32).sqrt();
    let want: Vec<f32> = [1.0f32, 3.0]
        .iter()
        .map(|&v| half::bf16::from_f32(v * inv).to_f32())
        .collect();
    assert_eq!(got.as_f32().unwrap(), want.as_slice());
    assert!(rms_norm(&x, &rng.tensor(&[3]), 1e-6)
        .unwrap_err()
        .contains("hidden size"));
}

#[test]
fn rms_norm_grad_matches_reference() {
    let mut rng = Rng(16);
    for shape in [vec![2, 3, 8], vec![130, 16], vec![7]] {
        let h = *shape.last().unwrap();
        let x = rand64(&mut rng, &shape);
        let w = rand64(&mut rng, &[h]);
        let dy = rand64(&mut rng, &shape);
        let (want_dx, want_dw) =
            reference::rms_norm_grad(&x.to_f64_vec(), &w.to_f64_vec(), &dy.to_f64_vec(), h, 1e-5);
        let (dx, dw) = rms_norm_grad(&x, &w, &dy, 1e-5).unwrap();
        assert_eq!((dx.dtype, dw.dtype), (DType::F64, DType::F64));
        assert_close(&dx.to_f64_vec(), &want_dx, 1e-12, &format!("dx {shape:?}"));
        assert_close(&dw.to_f64_vec(), &want_dw, 1e-12, &format!("dw {shape:?}"));
        let (dx, dw) = rms_norm_grad(&to_f32(&x), &to_f32(&w), &to_f32(&dy), 1e-5).unwrap();
        assert_close(
            &dx.to_f64_vec(),
            &want_dx,
            1e-5,
            &format!("f32 dx {shape:?}"),
        );
        assert_close(
            &dw.to_f64_vec(),
            &want_dw,
            1e-5,
            &format!("f32 dw {shape:?}"),
        );
    }
}

#[test]
fn rms_norm_grad_matches_finite_differences() {
    let mut rng = Rng(11);
    let x = rand64(&mut rng, &[2, 3, 8]);
    let w = rand64(&mut rng, &[8]);
    let r = rand64(&mut rng, &[2, 3, 8]);
    let eps = 1e-5;
    let (dx, dw) = rms_norm_grad(&x, &w, &r, eps).unwrap();
    let ex = check_fd("RmsNorm dx", &x, &dx, |x| {
        dot(&rms_norm(x, &w, eps).unwrap(), &r)
    });
    let ew = check_fd("RmsNorm dw", &w, &dw, |w| {
        dot(&rms_norm(&x, w, eps).unwrap(), &r)
    });
    eprintln!("RmsNorm max rel err vs FD: dx {ex:.2e}, dw {ew:.2e}");
}

/// The weight gradient sums over rows; that must not depend on the number
/// of threads.
#[test]
fn rms_norm_grad_is_independent_of_thread_count() {
    let mut rng = Rng(29);
    let rows = 1000;
    let x = rng.tensor(&[rows, 32]);
    let w = rng.tensor(&[32]);
    let dy = rng.tensor(&[rows, 32]);
    let run = |threads| with_threads(threads, || rms_norm_grad(&x, &w, &dy, 1e-5).unwrap());
    assert_eq!(run(1), run(4));
}
