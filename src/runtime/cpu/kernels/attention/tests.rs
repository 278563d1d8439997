//! Checks of the attention kernels: the inference forward against the
//! dense f64 reference (full causal with a KV cache, GQA, across tiles),
//! the training forward against the inference forward (bitwise) and the
//! reference (lse), the backward against finite differences and the
//! reference, across patterns, GQA, and lengths that do not divide into
//! groups. (`tests/pass_s2attn.rs` checks S²-Attn against a naive masked
//! softmax of its own.)

use super::super::testutil::{assert_close, to_f64, Rng};
use super::*;
use crate::util::SplitMix64;
use std::time::Instant;

fn attrs(heads: usize, kv_heads: usize, hd: usize, pattern: AttentionPattern) -> AttentionAttrs {
    AttentionAttrs {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        pattern,
    }
}

fn s2(group: GroupSize, wrap: bool) -> AttentionPattern {
    AttentionPattern::ShiftedSparse { group, wrap }
}

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect()
}

fn f64_tensor(shape: &[usize], data: Vec<f64>) -> Tensor {
    Tensor {
        dtype: DType::F64,
        shape: shape.to_vec(),
        data: TensorData::F64(data),
    }
}

fn to_f32(t: &Tensor) -> Tensor {
    Tensor::f32(
        t.shape.clone(),
        t.to_f64_vec().iter().map(|&x| x as f32).collect(),
    )
}

/// Random q, k, v (f64) for `[batch, len, ·]`.
fn qkv(
    rng: &mut SplitMix64,
    batch: usize,
    len: usize,
    a: &AttentionAttrs,
) -> (Tensor, Tensor, Tensor) {
    let qs = [batch, len, a.num_heads * a.head_dim];
    let ks = [batch, len, a.num_kv_heads * a.head_dim];
    (
        f64_tensor(&qs, random(rng, qs.iter().product())),
        f64_tensor(&ks, random(rng, ks.iter().product())),
        f64_tensor(&ks, random(rng, ks.iter().product())),
    )
}

struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// The dense reference's forward and backward at once.
fn dense(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    batch: usize,
    len: usize,
    a: &AttentionAttrs,
) -> Reference {
    let (out, lse) = reference::attention(q, k, v, batch, (len, len), a);
    let (dq, dk, dv) = reference::attention_grad(q, k, v, dout, batch, len, a);
    Reference {
        out,
        lse,
        dq,
        dk,
        dv,
    }
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// max |got − want| / max(|want|, floor).
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / max_abs(want).max(1e-12)
}

/// Patterns exercised by most tests, with a name for messages.
fn patterns() -> Vec<(&'static str, AttentionPattern)> {
    vec![
        ("full", AttentionPattern::FullCausal),
        ("s2 G4", s2(GroupSize::Tokens(4), false)),
        ("s2 G4 wrap", s2(GroupSize::Tokens(4), true)),
        ("s2 1/4", s2(GroupSize::Fraction(0.25), false)),
        ("s2 1/4 wrap", s2(GroupSize::Fraction(0.25), true)),
        ("s2 G3", s2(GroupSize::Tokens(3), false)),
        ("s2 G3 wrap", s2(GroupSize::Tokens(3), true)),
    ]
}

#[test]
fn fast_exp_is_accurate() {
    let mut worst = 0.0f64;
    let mut x = -90.0f32;
    while x < 1.0 {
        let mut got = [x];
        <f32 as Real>::exp_sub(&mut got, 0.0);
        let want = (x as f64).exp();
        if x >= -87.0 {
            worst = worst.max((got[0] as f64 - want).abs() / want);
        } else {
            assert_eq!(got[0], 0.0);
        }
        x += 0.000_37;
    }
    assert!(worst < 3e-7, "relative error {worst}");
    let mut nan = [f32::NAN];
    <f32 as Real>::exp_sub(&mut nan, 0.0);
    assert!(nan[0].is_nan());
}

#[test]
fn attention_is_causal_gqa_flash() {
    let mut rng = Rng(18);
    let cases = [
        (1, 1, 1, 2, 2, 4),
        (2, 7, 7, 4, 2, 8),
        (1, 65, 65, 4, 1, 16),
        (2, 130, 130, 2, 2, 8),
        (1, 3, 67, 4, 2, 8),
        (1, 64, 64, 2, 1, 32),
    ];
    for (b, sq, skv, heads, kvh, hd) in cases {
        let q = rng.tensor(&[b, sq, heads * hd]);
        let k = rng.tensor(&[b, skv, kvh * hd]);
        let v = rng.tensor(&[b, skv, kvh * hd]);
        let what = format!("b {b} sq {sq} skv {skv} heads {heads}/{kvh} hd {hd}");
        let attrs = AttentionAttrs {
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            pattern: AttentionPattern::FullCausal,
        };
        let got = attention(&q, &k, &v, &attrs).unwrap();
        let (want, _) = reference::attention(
            &q.to_f64_vec(),
            &k.to_f64_vec(),
            &v.to_f64_vec(),
            b,
            (sq, skv),
            &attrs,
        );
        assert_eq!(got.shape, q.shape);
        assert_close(&got.to_f64_vec(), &want, 1e-5, &what);
        let got64 = attention(&to_f64(&q), &to_f64(&k), &to_f64(&v), &attrs).unwrap();
        assert_close(&got64.to_f64_vec(), &want, 1e-13, &format!("f64 {what}"));
        // Same bits on a second run: no scheduling-dependent sums.
        assert_eq!(attention(&q, &k, &v, &attrs).unwrap(), got);
    }
    let q = rng.tensor(&[1, 2, 8]);
    let attrs = AttentionAttrs {
        num_heads: 3,
        num_kv_heads: 2,
        head_dim: 4,
        scale: 0.5,
        pattern: AttentionPattern::FullCausal,
    };
    assert!(attention(&q, &q, &q, &attrs)
        .unwrap_err()
        .contains("multiple"));
}

#[test]
fn training_forward_out_is_bitwise_the_inference_forward() {
    let mut rng = SplitMix64::new(1);
    // Lengths over the forward's 128-row blocks, groups that do and do not divide them.
    let cases = [
        (2, 200, 4, 4, AttentionPattern::FullCausal),
        (1, 300, 4, 2, AttentionPattern::FullCausal),
        (2, 256, 4, 2, s2(GroupSize::Fraction(0.25), false)),
        (2, 256, 4, 2, s2(GroupSize::Fraction(0.25), true)),
        (1, 300, 4, 1, s2(GroupSize::Tokens(128), false)),
        (1, 300, 4, 1, s2(GroupSize::Tokens(128), true)),
        (1, 301, 8, 4, s2(GroupSize::Tokens(150), true)),
    ];
    for (batch, len, heads, kv, pattern) in cases {
        let a = attrs(heads, kv, 8, pattern);
        let (q, k, v) = qkv(&mut rng, batch, len, &a);
        for (q, k, v) in [(to_f32(&q), to_f32(&k), to_f32(&v)), (q, k, v)] {
            let (out, lse) = attention_fwd(&q, &k, &v, &a).unwrap();
            assert_eq!(out, attention(&q, &k, &v, &a).unwrap(), "{:?}", a.pattern);
            assert_eq!(lse.shape, vec![batch, heads, len]);
            assert_eq!(lse.dtype, q.dtype);
        }
    }
}

#[test]
fn forward_lse_matches_reference() {
    let mut rng = SplitMix64::new(2);
    for len in [8, 10, 150] {
        for (name, pattern) in patterns() {
            let a = attrs(4, 2, 4, pattern);
            let (q, k, v) = qkv(&mut rng, 2, len, &a);
            let zeros = vec![0.0; q.numel()];
            let want = dense(
                &q.to_f64_vec(),
                &k.to_f64_vec(),
                &v.to_f64_vec(),
                &zeros,
                2,
                len,
                &a,
            );
            let (out, lse) = attention_fwd(&q, &k, &v, &a).unwrap();
            let e = rel_err(&lse.to_f64_vec(), &want.lse);
            assert!(e < 1e-13, "{name} len {len}: lse error {e}");
            let e = rel_err(&out.to_f64_vec(), &want.out);
            assert!(e < 1e-13, "{name} len {len}: out error {e}");
            let (q32, k32, v32) = (to_f32(&q), to_f32(&k), to_f32(&v));
            let (_, lse32) = attention_fwd(&q32, &k32, &v32, &a).unwrap();
            let e = rel_err(&lse32.to_f64_vec(), &want.lse);
            assert!(e < 1e-5, "{name} len {len}: f32 lse error {e}");
        }
    }
}

/// Σ out·R for the finite differences.
fn loss(q: &Tensor, k: &Tensor, v: &Tensor, a: &AttentionAttrs, r: &[f64]) -> f64 {
    let (out, _) = attention_fwd(q, k, v, a).unwrap();
    out.to_f64_vec().iter().zip(r).map(|(x, y)| x * y).sum()
}

fn grads(q: &Tensor, k: &Tensor, v: &Tensor, a: &AttentionAttrs, dout: &Tensor) -> [Tensor; 3] {
    let (out, lse) = attention_fwd(q, k, v, a).unwrap();
    let (dq, dk, dv) = attention_grad(q, k, v, &out, &lse, dout, a).unwrap();
    [dq, dk, dv]
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = SplitMix64::new(3);
    let (batch, heads, hd) = (2, 4, 4);
    for (len, kv) in [(8, 2), (6, 4), (10, 2), (9, 1)] {
        for (name, pattern) in patterns() {
            if matches!(pattern, AttentionPattern::ShiftedSparse { group, .. } if group.tokens(len) > len)
            {
                continue;
            }
            let a = attrs(heads, kv, hd, pattern);
            let (q, k, v) = qkv(&mut rng, batch, len, &a);
            let r = random(&mut rng, q.numel());
            let dout = f64_tensor(&q.shape, r.clone());
            let got = grads(&q, &k, &v, &a, &dout);
            let h = 1e-6;
            let inputs = [&q, &k, &v];
            for (which, g) in got.iter().enumerate() {
                let x = inputs[which];
                let mut fd = vec![0.0; x.numel()];
                for (e, slot) in fd.iter_mut().enumerate() {
                    let at = |delta: f64| {
                        let mut data = x.to_f64_vec();
                        data[e] += delta;
                        let t = f64_tensor(&x.shape, data);
                        let mut args = [q.clone(), k.clone(), v.clone()];
                        args[which] = t;
                        loss(&args[0], &args[1], &args[2], &a, &r)
                    };
                    *slot = (at(h) - at(-h)) / (2.0 * h);
                }
                let e = rel_err(&g.to_f64_vec(), &fd);
                assert!(
                    e < 1e-6,
                    "{name} len {len} kv {kv}: d{} error {e}",
                    ["q", "k", "v"][which]
                );
            }
        }
    }
}

#[test]
fn backward_matches_dense_reference_across_tiles() {
    // Lengths over several 64-row tiles, groups that straddle tiles.
    let mut rng = SplitMix64::new(4);
    let cases = [
        (1, 200, 4, 2, AttentionPattern::FullCausal),
        (2, 150, 2, 1, AttentionPattern::FullCausal),
        (1, 300, 4, 2, s2(GroupSize::Tokens(100), false)),
        (1, 300, 4, 2, s2(GroupSize::Tokens(100), true)),
        (1, 301, 4, 4, s2(GroupSize::Tokens(128), true)),
        (2, 256, 4, 2, s2(GroupSize::Fraction(0.25), false)),
    ];
    for (batch, len, heads, kv, pattern) in cases {
        let a = attrs(heads, kv, 8, pattern);
        let (q, k, v) = qkv(&mut rng, batch, len, &a);
        let r = random(&mut rng, q.numel());
        let dout = f64_tensor(&q.shape, r.clone());
        let want = dense(
            &q.to_f64_vec(),
            &k.to_f64_vec(),
            &v.to_f64_vec(),
            &r,
            batch,
            len,
            &a,
        );
        let [dq, dk, dv] = grads(&q, &k, &v, &a, &dout);
        for (name, got, want) in [
            ("dq", &dq, &want.dq),
            ("dk", &dk, &want.dk),
            ("dv", &dv, &want.dv),
        ] {
            let e = rel_err(&got.to_f64_vec(), want);
            assert!(e < 1e-12, "{:?} len {len}: {name} error {e}", a.pattern);
        }
        // f32 stays close to f64.
        let g32 = grads(&to_f32(&q), &to_f32(&k), &to_f32(&v), &a, &to_f32(&dout));
        for (name, got, want) in [
            ("dq", &g32[0], &want.dq),
            ("dk", &g32[1], &want.dk),
            ("dv", &g32[2], &want.dv),
        ] {
            assert_eq!(got.dtype, DType::F32);
            let e = rel_err(&got.to_f64_vec(), want);
            assert!(e < 1e-4, "{:?} len {len}: f32 {name} error {e}", a.pattern);
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = SplitMix64::new(5);
    for pattern in [
        AttentionPattern::FullCausal,
        s2(GroupSize::Fraction(0.25), true),
    ] {
        let a = attrs(4, 2, 8, pattern);
        let (q, k, v) = qkv(&mut rng, 2, 260, &a);
        let (q, k, v) = (to_f32(&q), to_f32(&k), to_f32(&v));
        let dout = to_f32(&f64_tensor(&q.shape, random(&mut rng, q.numel())));
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let (out, lse) = attention_fwd(&q, &k, &v, &a).unwrap();
                    let g = attention_grad(&q, &k, &v, &out, &lse, &dout, &a).unwrap();
                    (out, lse, g)
                })
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}

#[test]
fn empty_sequence_gives_empty_gradients() {
    let a = attrs(4, 2, 4, s2(GroupSize::Fraction(0.25), true));
    for a in [a.clone(), attrs(4, 2, 4, AttentionPattern::FullCausal)] {
        let q = Tensor::f32(vec![1, 0, 16], vec![]);
        let k = Tensor::f32(vec![1, 0, 8], vec![]);
        let (out, lse) = attention_fwd(&q, &k, &k, &a).unwrap();
        assert_eq!(lse.shape, vec![1, 4, 0]);
        let (dq, dk, dv) = attention_grad(&q, &k, &k, &out, &lse, &q, &a).unwrap();
        assert_eq!(
            (dq.shape, dk.shape, dv.shape),
            (q.shape.clone(), k.shape.clone(), k.shape)
        );
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let a = attrs(4, 2, 4, AttentionPattern::FullCausal);
    let q = Tensor::f32(vec![1, 6, 16], vec![0.5; 96]);
    let k = Tensor::f32(vec![1, 6, 8], vec![0.5; 48]);
    let (out, lse) = attention_fwd(&q, &k, &k, &a).unwrap();
    let grad = |q: &Tensor, k: &Tensor, out: &Tensor, lse: &Tensor, a: &AttentionAttrs| {
        attention_grad(q, k, k, out, lse, out, a).unwrap_err()
    };
    // q and k of different lengths (a KV cache): not for training.
    let k7 = Tensor::f32(vec![1, 7, 8], vec![0.5; 56]);
    let e = attention_fwd(&q, &k7, &k7, &a).unwrap_err();
    assert!(e.contains("same batch and length"), "{e}");
    assert!(grad(&q, &k7, &out, &lse, &a).contains("same batch and length"));
    // Widths that do not match the heads.
    let e = attention_fwd(&q, &q, &q, &a).unwrap_err();
    assert!(e.contains("k must be [batch, seq, 2×4]"), "{e}");
    let e = attention_fwd(&k, &k, &k, &a).unwrap_err();
    assert!(e.contains("q must be"), "{e}");
    let e = attention_fwd(&Tensor::f32(vec![96], vec![0.5; 96]), &k, &k, &a).unwrap_err();
    assert!(e.contains("q must be"), "{e}");
    // out, dout, lse of the wrong shape or type.
    let e = grad(&q, &k, &k, &lse, &a);
    assert!(e.contains("out must be"), "{e}");
    let e = grad(&q, &k, &out, &out, &a);
    assert!(e.contains("lse must be f32 [1, 4, 6]"), "{e}");
    let lse64 = f64_tensor(&lse.shape, lse.to_f64_vec());
    assert!(grad(&q, &k, &out, &lse64, &a).contains("lse must be"));
    // Heads that do not split.
    let bad = attrs(4, 3, 4, AttentionPattern::FullCausal);
    assert!(attention_fwd(&q, &k, &k, &bad)
        .unwrap_err()
        .contains("multiple of kv_heads"));
    let odd = attrs(3, 1, 4, s2(GroupSize::Tokens(2), false));
    let q3 = Tensor::f32(vec![1, 6, 12], vec![0.5; 72]);
    let k3 = Tensor::f32(vec![1, 6, 4], vec![0.5; 24]);
    assert!(attention_fwd(&q3, &k3, &k3, &odd)
        .unwrap_err()
        .contains("odd"));
    let lse3 = Tensor::f32(vec![1, 3, 6], vec![0.0; 18]);
    assert!(grad(&q3, &k3, &q3, &lse3, &odd).contains("odd"));
    // A group longer than the sequence.
    let long = attrs(4, 2, 4, s2(GroupSize::Tokens(7), false));
    assert!(attention_fwd(&q, &k, &k, &long)
        .unwrap_err()
        .contains("group size 7"));
    assert!(grad(&q, &k, &out, &lse, &long).contains("group size 7"));
    // Data shorter than the shape.
    let short = Tensor {
        data: TensorData::F32(vec![0.5; 95]),
        ..q.clone()
    };
    assert!(attention_fwd(&short, &k, &k, &a)
        .unwrap_err()
        .contains("malformed"));
    assert!(grad(&q, &k, &short, &lse, &a).contains("malformed"));
    // Types other than f32/f64, mixed types.
    let half = Tensor {
        dtype: DType::F16,
        ..q.clone()
    };
    assert!(attention_fwd(&half, &k, &k, &a)
        .unwrap_err()
        .contains("f32 or f64"));
    let ids = Tensor::i64(vec![1, 6, 16], vec![0; 96]);
    assert!(attention_fwd(&ids, &k, &k, &a)
        .unwrap_err()
        .contains("f32 or f64"));
    let k64 = f64_tensor(&k.shape, k.to_f64_vec());
    assert!(attention_fwd(&q, &k64, &k64, &a)
        .unwrap_err()
        .contains("one type"));
}

/// Timings for batch 1, 8 heads of 32: full causal vs S²-Attn (G = L/4).
/// `cargo test --release --lib bench_attention -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_attention_grad() {
    let mut rng = SplitMix64::new(6);
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>9}",
        "seq", "pattern", "fwd ms", "bwd ms", "bwd/fwd"
    );
    for len in [512, 2048, 8192] {
        let mut full_total = 0.0;
        for (name, pattern) in [
            ("full", AttentionPattern::FullCausal),
            ("s2 G=L/4", s2(GroupSize::Fraction(0.25), false)),
        ] {
            let a = attrs(8, 8, 32, pattern);
            let (q, k, v) = qkv(&mut rng, 1, len, &a);
            let (q, k, v) = (to_f32(&q), to_f32(&k), to_f32(&v));
            let dout = to_f32(&f64_tensor(&q.shape, random(&mut rng, q.numel())));
            let reps = if len >= 8192 { 2 } else { 5 };
            let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..reps {
                let t = Instant::now();
                let (out, lse) = attention_fwd(&q, &k, &v, &a).unwrap();
                fwd = fwd.min(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                let g = attention_grad(&q, &k, &v, &out, &lse, &dout, &a).unwrap();
                bwd = bwd.min(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(g);
            }
            let total = fwd + bwd;
            let vs_full = if name == "full" {
                full_total = total;
                String::new()
            } else {
                format!("  fwd+bwd {:.2}× faster than full", full_total / total)
            };
            println!(
                "{len:>6} {name:>12} {fwd:>10.1} {bwd:>10.1} {:>9.2}{vs_full}",
                bwd / fwd
            );
        }
    }
}
