//! The projections against their references (f32 loosely, f64 tightly);
//! the weight gradient against finite differences of the forward too.

use super::super::testutil::{
    assert_close, check_fd, dot, rand64, to_f32, to_f64, with_threads, Rng,
};
use super::*;

#[test]
fn linear_matches_reference() {
    let mut rng = Rng(19);
    for (xs, out_f, with_bias) in [
        (vec![2, 3, 5], 7, true),
        (vec![4, 5], 3, false),
        (vec![130, 70], 65, true),
        (vec![1, 1, 16], 1, false),
    ] {
        let in_f = *xs.last().unwrap();
        let x = rng.tensor(&xs);
        let w = rng.tensor(&[out_f, in_f]);
        let bias = with_bias.then(|| rng.tensor(&[out_f]));
        let got = linear(&x, &w, bias.as_ref()).unwrap();
        let bv = bias.as_ref().map(|b| b.to_f64_vec());
        let rows = x.numel() / in_f;
        let want = reference::linear(
            &x.to_f64_vec(),
            &w.to_f64_vec(),
            bv.as_deref(),
            (rows, in_f, out_f),
        );
        let mut shape = xs.clone();
        *shape.last_mut().unwrap() = out_f;
        let what = format!("{xs:?} → {out_f}");
        assert_eq!(got.shape, shape);
        assert_close(&got.to_f64_vec(), &want, 1e-5, &what);
        let bias64 = bias.as_ref().map(to_f64);
        let got64 = linear(&to_f64(&x), &to_f64(&w), bias64.as_ref()).unwrap();
        assert_eq!(got64.dtype, DType::F64);
        assert_close(&got64.to_f64_vec(), &want, 1e-13, &format!("f64 {what}"));
    }
    let x = rng.tensor(&[2, 4]);
    let w = rng.tensor(&[3, 5]);
    assert!(linear(&x, &w, None).unwrap_err().contains("in-features"));
}

#[test]
fn lora_linear_matches_reference() {
    let mut rng = Rng(21);
    for (xs, out_f, rank, with_bias) in [(vec![2, 3, 6], 5, 2, true), (vec![130, 24], 40, 8, false)]
    {
        let in_f = *xs.last().unwrap();
        let x = rng.tensor(&xs);
        let w = rng.tensor(&[out_f, in_f]);
        let a = rng.tensor(&[rank, in_f]);
        let b = rng.tensor(&[out_f, rank]);
        let bias = with_bias.then(|| rng.tensor(&[out_f]));
        let bv = bias.as_ref().map(|b| b.to_f64_vec());
        let rows = x.numel() / in_f;
        let want = reference::lora_linear(
            &x.to_f64_vec(),
            &w.to_f64_vec(),
            &a.to_f64_vec(),
            &b.to_f64_vec(),
            bv.as_deref(),
            2.5,
            (rows, in_f, rank, out_f),
        );
        let what = format!("{xs:?} → {out_f}, rank {rank}");
        let got = lora_linear(&x, &w, &a, &b, bias.as_ref(), 2.5).unwrap();
        assert_close(&got.to_f64_vec(), &want, 1e-5, &what);
        let bias64 = bias.as_ref().map(to_f64);
        let got64 = lora_linear(
            &to_f64(&x),
            &to_f64(&w),
            &to_f64(&a),
            &to_f64(&b),
            bias64.as_ref(),
            2.5,
        )
        .unwrap();
        assert_eq!(got64.dtype, DType::F64);
        assert_close(&got64.to_f64_vec(), &want, 1e-13, &format!("f64 {what}"));
    }
    let x = rng.tensor(&[2, 4]);
    let w = rng.tensor(&[3, 4]);
    let e = lora_linear(
        &x,
        &w,
        &rng.tensor(&[2, 5]),
        &rng.tensor(&[3, 2]),
        None,
        1.0,
    )
    .unwrap_err();
    assert!(e.contains("lora_A"), "{e}");
    let e = lora_linear(
        &x,
        &w,
        &rng.tensor(&[2, 4]),
        &rng.tensor(&[2, 3]),
        None,
        1.0,
    )
    .unwrap_err();
    assert!(e.contains("lora_B"), "{e}");
}

#[test]
fn linear_grad_weight_matches_reference() {
    let mut rng = Rng(22);
    for (xs, out_f) in [(vec![2, 3, 5], 4), (vec![200, 33], 17)] {
        let in_f = *xs.last().unwrap();
        let mut ys = xs.clone();
        *ys.last_mut().unwrap() = out_f;
        let x = rand64(&mut rng, &xs);
        let dy = rand64(&mut rng, &ys);
        let rows = x.numel() / in_f;
        let want =
            reference::linear_grad_weight(&x.to_f64_vec(), &dy.to_f64_vec(), (rows, in_f, out_f));
        let what = format!("{xs:?} → {out_f}");
        let got = linear_grad_weight(&x, &dy).unwrap();
        assert_eq!(
            (got.dtype, got.shape.clone()),
            (DType::F64, vec![out_f, in_f])
        );
        assert_close(&got.to_f64_vec(), &want, 1e-13, &what);
        let got32 = linear_grad_weight(&to_f32(&x), &to_f32(&dy)).unwrap();
        assert_close(&got32.to_f64_vec(), &want, 1e-5, &format!("f32 {what}"));
    }
}

#[test]
fn linear_grad_weight_matches_finite_differences() {
    let mut rng = Rng(23);
    let x = rand64(&mut rng, &[2, 3, 5]);
    let w = rand64(&mut rng, &[4, 5]);
    let r = rand64(&mut rng, &[2, 3, 4]);
    let dw = linear_grad_weight(&x, &r).unwrap();
    let e = check_fd("Linear dW", &w, &dw, |w| {
        dot(&linear(&x, w, None).unwrap(), &r)
    });
    eprintln!("LinearGradWeight max rel err vs FD: {e:.2e}");
    let e = linear_grad_weight(&x, &rand64(&mut rng, &[3, 2, 4])).unwrap_err();
    assert!(e.contains("every axis but the last"), "{e}");
    let e = linear_grad_weight(&x, &Tensor::f32(vec![2, 3, 4], vec![0.0; 24])).unwrap_err();
    assert!(e.contains("one float type"), "{e}");
}

/// The weight gradient sums over rows; that must not depend on the number
/// of threads.
#[test]
fn linear_grad_weight_is_independent_of_thread_count() {
    let mut rng = Rng(29);
    let rows = 1000;
    let x = rng.tensor(&[rows, 32]);
    let dy = rng.tensor(&[rows, 32]);
    let run = |threads| with_threads(threads, || linear_grad_weight(&x, &dy).unwrap());
    assert_eq!(run(1), run(4));
}
