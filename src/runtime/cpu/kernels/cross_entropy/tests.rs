//! The loss and its gradient against their references (f32 loosely, f64
//! tightly), by hand, and against finite differences.

use super::super::testutil::{assert_close, check_fd, rand64, t64, to_f32, Rng};
use super::*;

#[test]
fn cross_entropy_and_its_grad_match_reference() {
    let mut rng = Rng(8);
    let (batch, seq, vocab) = (3, 40, 300);
    let logits = rand64(&mut rng, &[batch, seq, vocab]);
    let labels: Vec<i64> = (0..(batch * seq) as i64)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                (i * 37) % vocab as i64
            }
        })
        .collect();
    let lab = Tensor::i64(vec![batch, seq], labels.clone());
    let dims = (batch, seq, vocab);
    let want = reference::cross_entropy(&logits.to_f64_vec(), &labels, dims, -100);
    let got = cross_entropy(&logits, &lab, -100).unwrap().to_f64_vec()[0];
    assert!(
        (got - want).abs() <= 1e-13 * want.abs(),
        "f64: {got} vs {want}"
    );
    let got = cross_entropy(&to_f32(&logits), &lab, -100)
        .unwrap()
        .to_f64_vec()[0];
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "f32: {got} vs {want}"
    );

    let want = reference::cross_entropy_grad(&logits.to_f64_vec(), &labels, dims, 1.5, -100);
    let got = cross_entropy_grad(&logits, &lab, &t64(&[], vec![1.5]), -100).unwrap();
    assert_eq!(got.dtype, DType::F64);
    assert_close(&got.to_f64_vec(), &want, 1e-13, "f64 grad");
    let got = cross_entropy_grad(&to_f32(&logits), &lab, &Tensor::scalar_f32(1.5), -100).unwrap();
    assert_eq!(got.dtype, DType::F32);
    assert_close(&got.to_f64_vec(), &want, 1e-6, "f32 grad");
}

#[test]
fn cross_entropy_matches_finite_differences_with_ignore_index() {
    let mut rng = Rng(7);
    let logits = rand64(&mut rng, &[2, 5, 7]);
    let mut labels = vec![3, 1, 6, 0, 2, 5, -100, 4, -100, 1];
    let lab = Tensor::i64(vec![2, 5], labels.clone());
    let loss = cross_entropy(&logits, &lab, -100).unwrap();
    assert_eq!(loss.dtype, DType::F64);
    // By hand: position t against label t+1, ignored ones skipped.
    let x = logits.to_f64_vec();
    let (mut sum, mut n) = (0.0, 0);
    for b in 0..2 {
        for t in 0..4 {
            let l = labels[b * 5 + t + 1];
            if l == -100 {
                continue;
            }
            let r = &x[(b * 5 + t) * 7..(b * 5 + t + 1) * 7];
            let lse = r.iter().map(|v| v.exp()).sum::<f64>().ln();
            sum += lse - r[l as usize];
            n += 1;
        }
    }
    assert_eq!(n, 6);
    assert!((loss.to_f64_vec()[0] - sum / n as f64).abs() < 1e-12);

    let dloss = t64(&[], vec![2.5]);
    let grad = cross_entropy_grad(&logits, &lab, &dloss, -100).unwrap();
    let err = check_fd("CrossEntropy", &logits, &grad, |l| {
        2.5 * cross_entropy(l, &lab, -100).unwrap().to_f64_vec()[0]
    });
    eprintln!("CrossEntropy max rel err vs FD: {err:.2e}");
    // The last position of each sequence and ignored targets get no gradient.
    let g = grad.to_f64_vec();
    for row in [4, 5, 7, 9] {
        assert!(
            g[row * 7..(row + 1) * 7].iter().all(|&v| v == 0.0),
            "row {row}"
        );
    }

    // Nothing scored: loss 0, gradient 0.
    labels.iter_mut().for_each(|l| *l = -100);
    let lab = Tensor::i64(vec![2, 5], labels);
    assert_eq!(
        cross_entropy(&logits, &lab, -100).unwrap().to_f64_vec(),
        [0.0]
    );
    let g = cross_entropy_grad(&logits, &lab, &dloss, -100).unwrap();
    assert!(g.to_f64_vec().iter().all(|&v| v == 0.0));
}

#[test]
fn cross_entropy_is_stable_and_f32_gives_an_f32_scalar() {
    let logits = Tensor::f32(vec![1, 2, 3], vec![1000.0, 0.0, -1000.0, 0.0, 0.0, 0.0]);
    let lab = Tensor::i64(vec![1, 2], vec![0, 0]);
    let loss = cross_entropy(&logits, &lab, -100).unwrap();
    assert_eq!(loss.dtype, DType::F32);
    assert_eq!(loss.shape, Vec::<usize>::new());
    assert!(loss.to_f64_vec()[0].abs() < 1e-6);
    let g = cross_entropy_grad(&logits, &lab, &Tensor::scalar_f32(1.0), -100).unwrap();
    assert!(g.to_f64_vec().iter().all(|v| v.is_finite()));
}

#[test]
fn cross_entropy_rejects_bad_labels_and_shapes() {
    let logits = Tensor::f32(vec![1, 2, 3], vec![0.0; 6]);
    let e = cross_entropy(&logits, &Tensor::i64(vec![1, 2], vec![0, 3]), -100).unwrap_err();
    assert!(
        e.contains("outside the vocabulary") && e.contains("ignore_index"),
        "{e}"
    );
    let e = cross_entropy(&logits, &Tensor::i64(vec![2, 1], vec![0, 0]), -100).unwrap_err();
    assert!(e.contains("do not match"), "{e}");
    let e = cross_entropy(
        &Tensor::f32(vec![6], vec![0.0; 6]),
        &Tensor::i64(vec![6], vec![0; 6]),
        -100,
    )
    .unwrap_err();
    assert!(e.contains("[batch, seq, vocab]"), "{e}");
    let e = cross_entropy_grad(
        &logits,
        &Tensor::i64(vec![1, 2], vec![0, 0]),
        &Tensor::f32(vec![2], vec![1.0, 1.0]),
        -100,
    )
    .unwrap_err();
    assert!(e.contains("scalar"), "{e}");
}
