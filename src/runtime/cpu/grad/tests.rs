//! Every backward kernel against central differences of its forward kernel
//! in `nn.rs`, in f64 on tiny shapes: with `L = Σ r·forward(x)` for a random
//! cotangent `r`, the kernel fed `dy = r` must give `∂L/∂x`.

use super::super::linalg::testutil::Rng;
use super::super::nn;
use super::*;
use crate::ir::RopeScaling;

fn t64(shape: &[usize], v: Vec<f64>) -> Tensor {
    Tensor {
        dtype: DType::F64,
        shape: shape.to_vec(),
        data: TensorData::F64(v),
    }
}

fn rand64(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    t64(shape, (0..n).map(|_| rng.f32() as f64).collect())
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| x * y)
        .sum()
}

/// Central differences of `f` at every coordinate of `x`, compared with
/// `grad`; returns the largest error relative to max|grad|.
fn check_fd(what: &str, x: &Tensor, grad: &Tensor, f: impl Fn(&Tensor) -> f64) -> f64 {
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

#[test]
fn rms_norm_grad_matches_finite_differences() {
    let mut rng = Rng(11);
    let x = rand64(&mut rng, &[2, 3, 8]);
    let w = rand64(&mut rng, &[8]);
    let r = rand64(&mut rng, &[2, 3, 8]);
    let eps = 1e-5;
    let (dx, dw) = rms_norm_grad(&x, &w, &r, eps).unwrap();
    let ex = check_fd("RmsNorm dx", &x, &dx, |x| {
        dot(&nn::rms_norm(x, &w, eps).unwrap(), &r)
    });
    let ew = check_fd("RmsNorm dw", &w, &dw, |w| {
        dot(&nn::rms_norm(&x, w, eps).unwrap(), &r)
    });
    eprintln!("RmsNorm max rel err vs FD: dx {ex:.2e}, dw {ew:.2e}");
}

fn rope_attrs(heads: usize, hd: usize, rd: usize, scaling: RopeScaling) -> RopeAttrs {
    RopeAttrs {
        num_heads: heads,
        head_dim: hd,
        rotary_dim: rd,
        theta: 10000.0,
        scaling,
    }
}

#[test]
fn rope_grad_is_the_transpose_of_rope() {
    let mut rng = Rng(13);
    let cases = [
        ("plain", rope_attrs(2, 8, 8, RopeScaling::None), false),
        (
            "linear PI x4",
            rope_attrs(2, 8, 8, RopeScaling::Linear { factor: 4.0 }),
            true,
        ),
        (
            "partial rotary",
            rope_attrs(3, 8, 4, RopeScaling::None),
            true,
        ),
        (
            "yarn",
            rope_attrs(
                2,
                8,
                8,
                RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 4,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: None,
                },
            ),
            false,
        ),
    ];
    for (name, attrs, with_pos) in cases {
        let width = attrs.num_heads * attrs.head_dim;
        let x = rand64(&mut rng, &[2, 5, width]);
        let r = rand64(&mut rng, &[2, 5, width]);
        let pos = with_pos.then(|| Tensor::i64(vec![2, 5], vec![0, 1, 2, 3, 4, 7, 9, 11, 13, 30]));
        let dx = rope_grad(&r, pos.as_ref(), &attrs).unwrap();
        let e = check_fd(&format!("Rope {name}"), &x, &dx, |x| {
            dot(&nn::rope(x, pos.as_ref(), &attrs).unwrap(), &r)
        });
        eprintln!("Rope ({name}) max rel err vs FD: {e:.2e}");
    }
    let attrs = rope_attrs(2, 8, 8, RopeScaling::None);
    let e = rope_grad(&Tensor::f32(vec![1, 2, 15], vec![0.0; 30]), None, &attrs).unwrap_err();
    assert!(e.contains("heads"), "{e}");
    let e = rope_grad(
        &Tensor::f32(vec![1, 2, 16], vec![0.0; 32]),
        Some(&Tensor::i64(vec![3], vec![0, 1, 2])),
        &attrs,
    )
    .unwrap_err();
    assert!(e.contains("position_ids"), "{e}");
}

#[test]
fn swiglu_grad_matches_finite_differences() {
    let mut rng = Rng(17);
    let g = rand64(&mut rng, &[2, 3, 6]);
    let u = rand64(&mut rng, &[2, 3, 6]);
    let r = rand64(&mut rng, &[2, 3, 6]);
    let (dg, du) = swiglu_grad(&g, &u, &r).unwrap();
    let eg = check_fd("SwiGlu dgate", &g, &dg, |g| {
        dot(&nn::swiglu(g, &u).unwrap(), &r)
    });
    let eu = check_fd("SwiGlu dup", &u, &du, |u| {
        dot(&nn::swiglu(&g, u).unwrap(), &r)
    });
    eprintln!("SwiGlu max rel err vs FD: dgate {eg:.2e}, dup {eu:.2e}");
    assert!(swiglu_grad(&g, &u, &rand64(&mut rng, &[2, 6])).is_err());
}

#[test]
fn embedding_grad_matches_finite_differences_with_repeated_ids() {
    let mut rng = Rng(19);
    let w = rand64(&mut rng, &[6, 4]);
    let ids = Tensor::i64(vec![2, 5], vec![1, 3, 1, 0, 5, 5, 5, 2, 1, 0]);
    let r = rand64(&mut rng, &[2, 5, 4]);
    let dw = embedding_grad(&w, &ids, &r).unwrap();
    let e = check_fd("Embedding", &w, &dw, |w| {
        dot(&nn::embedding(w, &ids).unwrap(), &r)
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

#[test]
fn linear_grad_weight_matches_finite_differences() {
    let mut rng = Rng(23);
    let x = rand64(&mut rng, &[2, 3, 5]);
    let w = rand64(&mut rng, &[4, 5]);
    let r = rand64(&mut rng, &[2, 3, 4]);
    let dw = linear_grad_weight(&x, &r).unwrap();
    let e = check_fd("Linear dW", &w, &dw, |w| {
        dot(&nn::linear(&x, w, None).unwrap(), &r)
    });
    eprintln!("LinearGradWeight max rel err vs FD: {e:.2e}");
    let e = linear_grad_weight(&x, &rand64(&mut rng, &[3, 2, 4])).unwrap_err();
    assert!(e.contains("every axis but the last"), "{e}");
    let e = linear_grad_weight(&x, &Tensor::f32(vec![2, 3, 4], vec![0.0; 24])).unwrap_err();
    assert!(e.contains("one float type"), "{e}");
}

/// Row reductions must not depend on the number of threads.
#[test]
fn row_reductions_are_independent_of_thread_count() {
    let mut rng = Rng(29);
    let rows = 1000;
    let x = rng.tensor(&[rows, 32]);
    let w = rng.tensor(&[32]);
    let dy = rng.tensor(&[rows, 32]);
    let ids = Tensor::i64(vec![rows], (0..rows as i64).map(|i| (i * 7) % 13).collect());
    let table = rng.tensor(&[13, 32]);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (dx, dw) = rms_norm_grad(&x, &w, &dy, 1e-5).unwrap();
            let de = embedding_grad(&table, &ids, &dy).unwrap();
            let dl = linear_grad_weight(&x, &dy).unwrap();
            (dx, dw, de, dl)
        })
    };
    assert_eq!(run(1), run(4));
}
