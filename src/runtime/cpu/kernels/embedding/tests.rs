//! The embedding lookup and its backward against their references, the
//! backward against finite differences of the forward too.

use super::super::testutil::{assert_close, check_fd, dot, rand64, to_f32, with_threads, Rng};
use super::*;
use crate::ir::DType;

#[test]
fn embedding_gathers_rows_and_rejects_bad_ids() {
    let w = Tensor::f32(vec![3, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let mut ids = Tensor::i64(vec![2, 2], vec![2, 0, 1, 2]);
    ids.dtype = DType::I32;
    let e = embedding(&w, &ids).unwrap();
    assert_eq!(e.shape, vec![2, 2, 2]);
    assert_eq!(
        e.as_f32().unwrap(),
        &[4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
    let bad = Tensor::i64(vec![1, 2], vec![1, 3]);
    let msg = embedding(&w, &bad).unwrap_err();
    assert!(
        msg.contains("token id 3") && msg.contains("size 3"),
        "{msg}"
    );
    let neg = Tensor::i64(vec![1], vec![-1]);
    assert!(embedding(&w, &neg).unwrap_err().contains("token id -1"));
    let fl = Tensor::f32(vec![1], vec![0.0]);
    assert!(embedding(&w, &fl).unwrap_err().contains("integers"));
}

#[test]
fn embedding_and_its_grad_match_reference() {
    let mut rng = Rng(24);
    let (vocab, hidden) = (13, 70);
    let w = rand64(&mut rng, &[vocab, hidden]);
    let id_vals: Vec<i64> = (0..300).map(|i| (i * 7 + i / 5) % 11).collect();
    let ids = Tensor::i64(vec![3, 100], id_vals.clone());
    let dy = rand64(&mut rng, &[3, 100, hidden]);
    let want = reference::embedding(&w.to_f64_vec(), hidden, &id_vals);
    let got = embedding(&w, &ids).unwrap();
    assert_eq!(got.shape, vec![3, 100, hidden]);
    // A gather: exact in every dtype.
    assert_close(&got.to_f64_vec(), &want, 0.0, "f64 embedding");
    let got = embedding(&to_f32(&w), &ids).unwrap();
    assert_close(&got.to_f64_vec(), &want, 0.0, "f32 embedding");
    let want = reference::embedding_grad(&id_vals, &dy.to_f64_vec(), vocab, hidden);
    let got = embedding_grad(&w, &ids, &dy).unwrap();
    assert_eq!(
        (got.dtype, got.shape.clone()),
        (DType::F64, vec![vocab, hidden])
    );
    assert_close(&got.to_f64_vec(), &want, 1e-13, "f64 embedding_grad");
    let got = embedding_grad(&to_f32(&w), &ids, &to_f32(&dy)).unwrap();
    assert_close(&got.to_f64_vec(), &want, 1e-6, "f32 embedding_grad");
}

#[test]
fn embedding_grad_matches_finite_differences_with_repeated_ids() {
    let mut rng = Rng(19);
    let w = rand64(&mut rng, &[6, 4]);
    let ids = Tensor::i64(vec![2, 5], vec![1, 3, 1, 0, 5, 5, 5, 2, 1, 0]);
    let r = rand64(&mut rng, &[2, 5, 4]);
    let dw = embedding_grad(&w, &ids, &r).unwrap();
    let e = check_fd("Embedding", &w, &dw, |w| {
        dot(&embedding(w, &ids).unwrap(), &r)
    });
    eprintln!("Embedding max rel err vs FD: {e:.2e}");
    // Row 4 is never looked up.
    assert!(dw.to_f64_vec()[16..20].iter().all(|&v| v == 0.0));
    let e = embedding_grad(
        &w,
        &Tensor::i64(vec![1, 1], vec![6]),
        &rand64(&mut rng, &[1, 1, 4]),
    )
    .unwrap_err();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = embedding_grad(&w, &ids, &rand64(&mut rng, &[2, 5, 3])).unwrap_err();
    assert!(e.contains("does not match"), "{e}");
}

/// The scatter-add sums over tokens; that must not depend on the number
/// of threads.
#[test]
fn embedding_grad_is_independent_of_thread_count() {
    let mut rng = Rng(29);
    let rows = 1000;
    let dy = rng.tensor(&[rows, 32]);
    let ids = Tensor::i64(vec![rows], (0..rows as i64).map(|i| (i * 7) % 13).collect());
    let table = rng.tensor(&[13, 32]);
    let run = |threads| with_threads(threads, || embedding_grad(&table, &ids, &dy).unwrap());
    assert_eq!(run(1), run(4));
}
