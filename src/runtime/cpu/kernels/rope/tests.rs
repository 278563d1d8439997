//! RoPE against transformers' formula and its reference (f32 loosely, f64
//! tightly), with the positions and scalings it takes; the backward
//! against its reference and against finite differences of the forward.

// Index loops read best in test expectations.
#![allow(clippy::needless_range_loop)]

use super::super::testutil::{assert_close, check_fd, dot, rand64, to_f32, Rng};
use super::*;
use crate::ir::RopeScaling;

/// The table row of each activation row of `[b, s]`: per (batch, position)
/// when the positions are per batch, else per position.
fn table_rows(b: usize, s: usize, per_batch: bool) -> Vec<usize> {
    (0..b * s)
        .map(|r| if per_batch { r } else { r % s })
        .collect()
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
fn rope_matches_transformers_formula() {
    let mut rng = Rng(16);
    let (b, s, heads, hd) = (2, 7, 3, 8);
    for rd in [8, 4] {
        let attrs = rope_attrs(heads, hd, rd, RopeScaling::None);
        let x = rng.tensor(&[b, s, heads * hd]);
        let pos_bs: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 5) % 23).collect();
        let cases: Vec<(Option<Tensor>, Vec<i64>, bool)> = vec![
            (None, (0..s as i64).collect(), false),
            (
                Some(Tensor::i64(vec![s], (3..3 + s as i64).collect())),
                (3..3 + s as i64).collect(),
                false,
            ),
            (
                Some(Tensor::i64(vec![b, s], pos_bs.clone())),
                pos_bs.clone(),
                true,
            ),
            (
                Some(Tensor::i64(vec![1, s], pos_bs[..s].to_vec())),
                pos_bs[..s].to_vec(),
                false,
            ),
        ];
        for (pt, positions, per_batch) in cases {
            let got = rope(&x, pt.as_ref(), &attrs).unwrap();
            // Tables straight from the frequencies, in f64.
            let half = rd / 2;
            let mut cos = vec![0.0; positions.len() * rd];
            let mut sin = vec![0.0; positions.len() * rd];
            for (p, &pos) in positions.iter().enumerate() {
                for i in 0..half {
                    let inv = 1.0 / 10000f64.powf((2 * i) as f64 / rd as f64);
                    let a = pos as f64 * inv;
                    for c in [i, i + half] {
                        cos[p * rd + c] = a.cos();
                        sin[p * rd + c] = a.sin();
                    }
                }
            }
            let rows = table_rows(b, s, per_batch);
            let want = reference::rope(&x.to_f64_vec(), &attrs, &rows, &cos, &sin);
            // f32 angles at positions up to 22: ~1e-5 absolute.
            assert_close(
                &got.to_f64_vec(),
                &want,
                2e-5,
                &format!("rd {rd} positions {positions:?}"),
            );
        }
    }
}

#[test]
fn rope_uses_max_position_for_dynamic_scaling() {
    let mut rng = Rng(17);
    let (b, s, heads, hd) = (1, 5, 2, 8);
    let scaling = RopeScaling::Dynamic {
        factor: 2.0,
        original_max_position_embeddings: 8,
    };
    let attrs = rope_attrs(heads, hd, hd, scaling);
    let x = rng.tensor(&[b, s, heads * hd]);
    let positions: Vec<i64> = vec![0, 4, 9, 12, 3];
    let pt = Tensor::i64(vec![1, s], positions.clone());
    let got = rope(&x, Some(&pt), &attrs).unwrap();
    let (cos, sin) = crate::ir::rope::cos_sin(&attrs, &positions, 13);
    let to64 = |v: Vec<f32>| v.into_iter().map(|x| x as f64).collect::<Vec<f64>>();
    let rows = table_rows(b, s, false);
    let want = reference::rope(&x.to_f64_vec(), &attrs, &rows, &to64(cos), &to64(sin));
    assert_close(&got.to_f64_vec(), &want, 1e-6, "dynamic");
    // Not what the unscaled tables would give.
    let (c0, s0) = crate::ir::rope::cos_sin(&attrs, &positions, 8);
    let plain = reference::rope(&x.to_f64_vec(), &attrs, &rows, &to64(c0), &to64(s0));
    assert!(got
        .to_f64_vec()
        .iter()
        .zip(&plain)
        .any(|(a, b)| (a - b).abs() > 1e-3));
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
            dot(&rope(x, pos.as_ref(), &attrs).unwrap(), &r)
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

/// Both directions against the reference, through the kernels' own tables
/// (scalings, partial rotary, positions per batch and broadcast).
#[test]
fn rope_and_rope_grad_match_reference() {
    let mut rng = Rng(18);
    let (b, s) = (2, 6);
    let cases = [
        rope_attrs(2, 8, 8, RopeScaling::None),
        rope_attrs(3, 8, 4, RopeScaling::Linear { factor: 4.0 }),
        rope_attrs(
            2,
            8,
            8,
            RopeScaling::Dynamic {
                factor: 2.0,
                original_max_position_embeddings: 8,
            },
        ),
    ];
    let per_batch: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 5) % 19).collect();
    for attrs in cases {
        let width = attrs.num_heads * attrs.head_dim;
        for (ids, per_batch) in [
            (None, false),
            (Some(Tensor::i64(vec![b, s], per_batch.clone())), true),
            (
                Some(Tensor::i64(vec![1, s], per_batch[..s].to_vec())),
                false,
            ),
        ] {
            let positions: Vec<i64> = match &ids {
                None => (0..s as i64).collect(),
                Some(t) => t.to_i64_vec(),
            };
            let (cos, sin) = reference::tables(&attrs, &positions);
            let rows = table_rows(b, s, per_batch);
            let x = rand64(&mut rng, &[b, s, width]);
            let what = format!("{:?} per batch {per_batch}", attrs.scaling);
            let want = reference::rope(&x.to_f64_vec(), &attrs, &rows, &cos, &sin);
            let got = rope(&x, ids.as_ref(), &attrs).unwrap();
            assert_close(&got.to_f64_vec(), &want, 1e-14, &format!("rope {what}"));
            let got = rope(&to_f32(&x), ids.as_ref(), &attrs).unwrap();
            assert_close(&got.to_f64_vec(), &want, 1e-6, &format!("f32 rope {what}"));
            let want = reference::rope_grad(&x.to_f64_vec(), &attrs, &rows, &cos, &sin);
            let got = rope_grad(&x, ids.as_ref(), &attrs).unwrap();
            assert_close(
                &got.to_f64_vec(),
                &want,
                1e-14,
                &format!("rope_grad {what}"),
            );
            let got = rope_grad(&to_f32(&x), ids.as_ref(), &attrs).unwrap();
            assert_close(
                &got.to_f64_vec(),
                &want,
                1e-6,
                &format!("f32 rope_grad {what}"),
            );
        }
    }
}

/// A half-precision forward rounds each product and sum as transformers
/// does; the backward, as every backward here, rounds only its result.
#[test]
fn rope_rounds_half_precision_in_the_forward_only() {
    let mut rng = Rng(19);
    let attrs = rope_attrs(2, 8, 8, RopeScaling::None);
    let pos = Tensor::i64(vec![4], vec![3, 17, 40, 101]);
    let r = |v: f32| half::bf16::from_f32(v).to_f32();
    let xv: Vec<f32> = rng.vec(64).into_iter().map(r).collect();
    let x = Tensor {
        dtype: DType::BF16,
        shape: vec![1, 4, 16],
        data: TensorData::F32(xv.clone()),
    };
    // The tables as a bf16 model holds them.
    let (cos, sin) = reference::tables(&attrs, &pos.to_i64_vec());
    let c: Vec<f32> = cos.iter().map(|&v| r(v as f32)).collect();
    let s: Vec<f32> = sin.iter().map(|&v| r(v as f32)).collect();
    let mut fwd = vec![0f32; 64];
    let mut bwd = vec![0f32; 64];
    for p in 0..4 {
        for h in 0..2 {
            let base = (p * 2 + h) * 8;
            for i in 0..4 {
                let (x1, x2) = (xv[base + i], xv[base + i + 4]);
                let (ci, si) = (c[p * 8 + i], s[p * 8 + i]);
                fwd[base + i] = r(r(x1 * ci) - r(x2 * si));
                fwd[base + i + 4] = r(r(x2 * ci) + r(x1 * si));
                bwd[base + i] = r(x1 * ci + x2 * si);
                bwd[base + i + 4] = r(x2 * ci - x1 * si);
            }
        }
    }
    let got = rope(&x, Some(&pos), &attrs).unwrap();
    assert_eq!(got.dtype, DType::BF16);
    assert_eq!(got.as_f32().unwrap(), fwd.as_slice());
    let got = rope_grad(&x, Some(&pos), &attrs).unwrap();
    assert_eq!(got.dtype, DType::BF16);
    assert_eq!(got.as_f32().unwrap(), bwd.as_slice());
}
