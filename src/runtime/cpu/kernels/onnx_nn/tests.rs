//! The ONNX ops against their references (f32 loosely, f64 tightly), the
//! input forms and edge cases onnx defines, and values from onnx's own
//! reference evaluator.

// Index loops read best in test expectations.
#![allow(clippy::needless_range_loop)]

use super::super::testutil::{assert_close, t64, to_f64, Rng};
use super::attention::{onnx_attention, reference as attention_reference};
use super::*;
use crate::ir::OnnxAttentionAttrs;
// --- softmax -----------------------------------------------------------

#[test]
fn softmax_matches_reference_on_every_axis() {
    let mut rng = Rng(10);
    for shape in [vec![3, 4, 5], vec![2, 130], vec![7]] {
        let x = rng.tensor(&shape);
        for axis in -(shape.len() as i64)..shape.len() as i64 {
            for log in [false, true] {
                let got = softmax(&x, axis, log).unwrap();
                let ax = if axis < 0 {
                    axis + shape.len() as i64
                } else {
                    axis
                } as usize;
                let want = reference::softmax(&x.to_f64_vec(), &shape, ax, log);
                assert_close(
                    &got.to_f64_vec(),
                    &want,
                    1e-6,
                    &format!("{shape:?} axis {axis} log {log}"),
                );
            }
        }
    }
    let x = rng.tensor(&[4, 6]);
    let x64 = t64(&[4, 6], x.to_f64_vec());
    let got = softmax(&x64, 1, false).unwrap();
    assert_eq!(got.dtype, DType::F64);
    assert_close(
        &got.to_f64_vec(),
        &reference::softmax(&x.to_f64_vec(), &[4, 6], 1, false),
        1e-14,
        "f64",
    );
    assert!(softmax(&x, 2, false).unwrap_err().contains("out of range"));
}

#[test]
fn softmax_with_neg_infinity() {
    let inf = f32::INFINITY;
    let x = Tensor::f32(vec![2, 3], vec![-inf, 0.0, 1.0, -inf, -inf, -inf]);
    let y = softmax(&x, -1, false).unwrap().to_f64_vec();
    let (e0, e1) = (1.0f64, 1f64.exp());
    assert_eq!(y[0], 0.0);
    assert!((y[1] - e0 / (e0 + e1)).abs() < 1e-7);
    assert!((y[2] - e1 / (e0 + e1)).abs() < 1e-7);
    // A fully masked row is NaN, as in onnxruntime and torch.
    assert!(y[3..].iter().all(|v| v.is_nan()));
    let l = softmax(&x, -1, true).unwrap().to_f64_vec();
    assert_eq!(l[0], f64::NEG_INFINITY);
    assert!((l[2] - (e1 / (e0 + e1)).ln()).abs() < 1e-6);
}

// --- reduce ------------------------------------------------------------

#[test]
fn reduce_matches_reference() {
    let mut rng = Rng(11);
    let shape = [2, 3, 4];
    let x = rng.tensor(&shape);
    let axes_cases: &[Option<&[i64]>] = &[
        Some(&[0]),
        Some(&[1]),
        Some(&[2]),
        Some(&[-1]),
        Some(&[0, 2]),
        Some(&[2, 0]),
        Some(&[-2, -1]),
        Some(&[0, 1, 2]),
        Some(&[]),
        None,
    ];
    for op in [ReduceOp::Mean, ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
        for &axes in axes_cases {
            for keepdims in [false, true] {
                let got = reduce(&x, op, axes, keepdims, false).unwrap();
                let norm: Vec<usize> = match axes {
                    Some(a) if !a.is_empty() => a.iter().map(|&v| ((v + 3) % 3) as usize).collect(),
                    _ => vec![0, 1, 2],
                };
                let want_shape: Vec<usize> = (0..3)
                    .filter_map(|d| {
                        if !norm.contains(&d) {
                            Some(shape[d])
                        } else if keepdims {
                            Some(1)
                        } else {
                            None
                        }
                    })
                    .collect();
                let what = format!("{op:?} axes {axes:?} keepdims {keepdims}");
                assert_eq!(got.shape, want_shape, "{what}");
                let want = reference::reduce(&x.to_f64_vec(), &shape, &norm, op);
                assert_close(&got.to_f64_vec(), &want, 1e-6, &what);
                let got64 = reduce(&to_f64(&x), op, axes, keepdims, false).unwrap();
                assert_eq!(got64.dtype, DType::F64);
                assert_close(&got64.to_f64_vec(), &want, 1e-14, &format!("f64 {what}"));
            }
        }
    }
}

#[test]
fn reduce_noop_empty_int_and_errors() {
    let x = Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(reduce(&x, ReduceOp::Sum, None, true, true).unwrap(), x);
    assert_eq!(reduce(&x, ReduceOp::Sum, Some(&[]), true, true).unwrap(), x);
    let s = reduce(&x, ReduceOp::Sum, None, false, false).unwrap();
    assert_eq!((s.shape.clone(), s.to_f64_vec()), (vec![], vec![10.0]));

    let e = Tensor::f32(vec![2, 0], vec![]);
    let r = |op| {
        reduce(&e, op, Some(&[1]), false, false)
            .unwrap()
            .to_f64_vec()
    };
    assert_eq!(r(ReduceOp::Sum), vec![0.0, 0.0]);
    assert_eq!(r(ReduceOp::Max), vec![f64::NEG_INFINITY; 2]);
    assert_eq!(r(ReduceOp::Min), vec![f64::INFINITY; 2]);
    assert!(r(ReduceOp::Mean).iter().all(|v| v.is_nan()));
    let z = reduce(&e, ReduceOp::Sum, Some(&[0]), true, false).unwrap();
    assert_eq!(z.shape, vec![1, 0]);

    let i = Tensor::i64(vec![2, 3], vec![1, -2, 3, 4, 5, -7]);
    let sum = reduce(&i, ReduceOp::Sum, Some(&[1]), false, false).unwrap();
    assert_eq!(sum.as_i64().unwrap(), &[2, 2]);
    let mean = reduce(&i, ReduceOp::Mean, Some(&[0]), false, false).unwrap();
    assert_eq!(mean.as_i64().unwrap(), &[2, 1, -2]);
    let max = reduce(&i, ReduceOp::Max, None, true, false).unwrap();
    assert_eq!(
        (max.shape.clone(), max.as_i64().unwrap()),
        (vec![1, 1], &[5i64][..])
    );

    assert!(reduce(&x, ReduceOp::Sum, Some(&[1, -1]), true, false)
        .unwrap_err()
        .contains("twice"));
    assert!(reduce(&x, ReduceOp::Sum, Some(&[2]), true, false)
        .unwrap_err()
        .contains("out of range"));
    let b = Tensor::bool(vec![2, 2], vec![true, false, false, false]);
    let any = reduce(&b, ReduceOp::Max, Some(&[1]), false, false).unwrap();
    assert_eq!(any.as_bool().unwrap(), &[true, false]);
    let all = reduce(&b, ReduceOp::Min, Some(&[0]), false, false).unwrap();
    assert_eq!(all.as_bool().unwrap(), &[false, false]);
    assert!(reduce(&b, ReduceOp::Sum, None, false, false).is_err());
    let nan = Tensor::f32(vec![3], vec![1.0, f32::NAN, 2.0]);
    assert!(reduce(&nan, ReduceOp::Max, None, false, false)
        .unwrap()
        .to_f64_vec()[0]
        .is_nan());
}

// --- RMSNormalization --------------------------------------------------

#[test]
fn rms_normalization_matches_reference() {
    let mut rng = Rng(12);
    let shape = [2, 3, 4];
    let x = rng.tensor(&shape);
    let xv = x.to_f64_vec();
    let cases: &[(i64, &[usize])] = &[
        (-1, &[4]),
        (2, &[1, 4]),
        (1, &[3, 4]),
        (1, &[1, 4]),
        (1, &[3, 1]),
        (0, &[2, 3, 4]),
    ];
    for &(axis, sshape) in cases {
        let scale = rng.tensor(sshape);
        let sv = scale.to_f64_vec();
        let got = rms_normalization(&x, &scale, axis, 1e-5, 1).unwrap();
        let ax = ((axis + 3) % 3) as usize;
        let want = reference::rms_normalization(&xv, &shape, &sv, sshape, ax, 1e-5);
        let what = format!("axis {axis} scale {sshape:?}");
        assert_close(&got.to_f64_vec(), &want, 1e-6, &what);
        // f64 inputs compute in f64.
        let got64 = rms_normalization(&to_f64(&x), &to_f64(&scale), axis, 1e-5, 11).unwrap();
        assert_eq!(got64.dtype, DType::F64);
        assert_close(&got64.to_f64_vec(), &want, 1e-13, &format!("f64 {what}"));
    }
    let bad = rng.tensor(&[3]);
    assert!(rms_normalization(&x, &bad, -1, 1e-5, 1)
        .unwrap_err()
        .contains("broadcast"));
    assert!(rms_normalization(&x, &rng.tensor(&[4]), -1, 1e-5, 10)
        .unwrap_err()
        .contains("stash_type"));
}

// --- RotaryEmbedding ---------------------------------------------------

struct RotCase {
    /// [b, h, s, d] when true, else [b, s, h*d].
    four_d: bool,
    b: usize,
    h: usize,
    s: usize,
    d: usize,
    rot: usize,
    interleaved: bool,
    /// (max positions, position-id batch) when position ids are used,
    /// else the cache batch.
    pos: Option<(usize, usize)>,
    cache_batch: usize,
}

#[test]
fn rotary_embedding_matches_reference() {
    let mut rng = Rng(13);
    let mut cases = Vec::new();
    for four_d in [true, false] {
        for interleaved in [false, true] {
            for (rot, pos, cache_batch) in [
                (8, None, 2),
                (8, None, 1),
                (4, None, 2),
                (8, Some((16, 2)), 0),
                (4, Some((9, 2)), 0),
                (6, Some((12, 1)), 0),
            ] {
                cases.push(RotCase {
                    four_d,
                    b: 2,
                    h: 3,
                    s: 5,
                    d: 8,
                    rot,
                    interleaved,
                    pos,
                    cache_batch,
                });
            }
        }
    }
    for c in &cases {
        let xshape = if c.four_d {
            vec![c.b, c.h, c.s, c.d]
        } else {
            vec![c.b, c.s, c.h * c.d]
        };
        let x = rng.tensor(&xshape);
        let half = c.rot / 2;
        let cshape = match c.pos {
            Some((max, _)) => vec![max, half],
            None => vec![c.cache_batch, c.s, half],
        };
        let cos = rng.tensor(&cshape);
        let sin = rng.tensor(&cshape);
        let pos = c.pos.map(|(max, pb)| {
            let ids: Vec<i64> = (0..pb * c.s).map(|i| ((i * 7 + 3) % max) as i64).collect();
            Tensor::i64(vec![pb, c.s], ids)
        });
        let got = rotary_embedding(
            &x,
            &cos,
            &sin,
            pos.as_ref(),
            c.interleaved,
            (!c.four_d).then_some(c.h as i64),
            if c.rot == c.d { 0 } else { c.rot as i64 },
        )
        .unwrap();
        let num_heads = (!c.four_d).then_some(c.h as i64);
        let rot_attr = if c.rot == c.d { 0 } else { c.rot as i64 };
        let want = reference::rotary_embedding(
            &x,
            &cos,
            &sin,
            pos.as_ref(),
            c.interleaved,
            num_heads,
            rot_attr,
        );
        let what = format!(
            "4d {} interleaved {} rot {} pos {:?} cache batch {}",
            c.four_d, c.interleaved, c.rot, c.pos, c.cache_batch
        );
        assert_eq!(got.shape, xshape, "{what}");
        assert_close(&got.to_f64_vec(), &want, 1e-6, &what);
        let got64 = rotary_embedding(
            &to_f64(&x),
            &to_f64(&cos),
            &to_f64(&sin),
            pos.as_ref(),
            c.interleaved,
            num_heads,
            rot_attr,
        )
        .unwrap();
        assert_close(&got64.to_f64_vec(), &want, 1e-14, &format!("f64 {what}"));
    }
}

#[test]
fn rotary_embedding_errors() {
    let x = Tensor::f32(vec![1, 2, 8], vec![0.0; 16]);
    let c = Tensor::f32(vec![4, 4], vec![0.0; 16]);
    let p = Tensor::i64(vec![1, 2], vec![0, 4]);
    let e = rotary_embedding(&x, &c, &c, Some(&p), false, None, 0).unwrap_err();
    assert!(e.contains("num_heads"), "{e}");
    let e = rotary_embedding(&x, &c, &c, Some(&p), false, Some(1), 0).unwrap_err();
    assert!(e.contains("position id 4"), "{e}");
    let e = rotary_embedding(&x, &c, &c, Some(&p), false, Some(2), 0).unwrap_err();
    assert!(e.contains("rotary_embedding_dim/2"), "{e}");
}

/// Expected values from onnx's reference evaluator (onnx 1.20 in
/// /work/pyenv), produced by:
///
/// ```python
/// def vals(shape, a, b):
///     n = int(np.prod(shape)); return np.sin(a*np.arange(n)+b).reshape(shape).astype(np.float32)
/// x = vals([2,3,12], 0.37, 0.1)
/// ang = 0.5*np.arange(5)[:,None]*(np.arange(2)[None,:]+1)
/// cos = np.cos(ang).astype(np.float32); sin = np.sin(ang).astype(np.float32)
/// pid = np.array([[0,2,4],[1,3,0]], dtype=np.int64)
/// node = helper.make_node("RotaryEmbedding", ["x","cos","sin","pid"], ["y"],
///                         interleaved=1, num_heads=2, rotary_embedding_dim=4)
/// # one-node opset-23 model, ReferenceEvaluator(model).run(None, {...})
/// ```
#[test]
fn rotary_embedding_matches_onnx_reference_values() {
    let vals = |n: usize, a: f64, b: f64| -> Vec<f32> {
        (0..n).map(|i| (a * i as f64 + b).sin() as f32).collect()
    };
    let x = Tensor::f32(vec![2, 3, 12], vals(72, 0.37, 0.1));
    let ang = |p: usize, k: usize| 0.5 * p as f64 * (k + 1) as f64;
    let cos: Vec<f32> = (0..10).map(|i| ang(i / 2, i % 2).cos() as f32).collect();
    let sin: Vec<f32> = (0..10).map(|i| ang(i / 2, i % 2).sin() as f32).collect();
    let cos = Tensor::f32(vec![5, 2], cos);
    let sin = Tensor::f32(vec![5, 2], sin);
    let pid = Tensor::i64(vec![2, 3], vec![0, 2, 4, 1, 3, 0]);
    let got = rotary_embedding(&x, &cos, &sin, Some(&pid), true, Some(2), 4).unwrap();
    let reference = reference::rotary_embedding(&x, &cos, &sin, Some(&pid), true, Some(2), 4);
    let want = [
        9.98334140e-02,
        4.52886283e-01,
        7.44643092e-01,
        9.35616016e-01,
        9.99957621e-01,
        9.28959727e-01,
        7.32231438e-01,
        4.36399072e-01,
        8.15021545e-02,
        -2.84425706e-01,
        -6.11857891e-01,
        -8.56477976e-01,
        2.92800784e-01,
        -1.35878563e+00,
        8.88935387e-01,
        -5.20467877e-01,
        -2.60157496e-01,
        1.06611691e-01,
        -3.82435918e-01,
        7.90974975e-01,
        -1.29952645e+00,
        4.36827481e-01,
        9.26415503e-01,
        7.27573276e-01,
        -2.46982336e-01,
        3.60142410e-01,
        -2.76945025e-01,
        6.23644412e-01,
        -8.59975696e-01,
        -9.86323893e-01,
        1.17084098e+00,
        -5.41006625e-01,
        1.91267759e-01,
        6.09389186e-01,
        1.13385022e-01,
        4.64995384e-01,
        2.10585147e-01,
        1.18655539e+00,
        -2.37213194e-01,
        1.34039807e+00,
        7.22881377e-01,
        4.24095839e-01,
        2.02209964e-01,
        -2.28492156e-01,
        3.90172213e-01,
        -9.90399003e-01,
        -9.87424135e-01,
        -9.77771580e-01,
        5.20098209e-01,
        -8.74763846e-01,
        2.27546066e-01,
        -1.53803557e-01,
        4.71017659e-01,
        7.58132219e-01,
        -9.30377126e-01,
        1.01098192e+00,
        -1.01332545e+00,
        -5.80969453e-01,
        4.17914540e-01,
        6.11104742e-02,
        -3.03964615e-01,
        -6.27899528e-01,
        -8.66851151e-01,
        -9.88478541e-01,
        -9.76320028e-01,
        -8.32021177e-01,
        -5.75112164e-01,
        -2.40364388e-01,
        1.26915559e-01,
        4.77018088e-01,
        7.62558460e-01,
        9.44890082e-01,
    ];
    assert_close(&got.to_f64_vec(), &want, 1e-6, "onnx reference");
    assert_close(&reference, &want, 1e-6, "lcc's reference against onnx's");
}

// --- ONNX Attention ----------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    /// Bool mask of rank 2 [q, total].
    Bool2,
    /// Float mask [b, 1, q, total - 1] (shorter: last key padded masked).
    FloatShort4,
    /// Bool mask [hq, q, total] (rank 3: heads, not batch).
    Bool3,
}

#[derive(Clone, Copy, Debug)]
struct AttnCase {
    three_d: bool,
    b: usize,
    hq: usize,
    hkv: usize,
    sq: usize,
    past: usize,
    skv: usize,
    d: usize,
    dv: usize,
    causal: bool,
    mask: MaskKind,
    softcap: f32,
    scale: Option<f32>,
}

fn run_attn_case(c: AttnCase, rng: &mut Rng) {
    let total = c.past + c.skv;
    let qb = rng.vec(c.b * c.hq * c.sq * c.d);
    let kb = rng.vec(c.b * c.hkv * c.skv * c.d);
    let vb = rng.vec(c.b * c.hkv * c.skv * c.dv);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (q, k, v) = if c.three_d {
        (
            Tensor::f32(
                vec![c.b, c.sq, c.hq * c.d],
                attention_reference::to_bshd(&to64(&qb), c.b, c.hq, c.sq, c.d)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ),
            Tensor::f32(
                vec![c.b, c.skv, c.hkv * c.d],
                attention_reference::to_bshd(&to64(&kb), c.b, c.hkv, c.skv, c.d)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ),
            Tensor::f32(
                vec![c.b, c.skv, c.hkv * c.dv],
                attention_reference::to_bshd(&to64(&vb), c.b, c.hkv, c.skv, c.dv)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ),
        )
    } else {
        (
            Tensor::f32(vec![c.b, c.hq, c.sq, c.d], qb.clone()),
            Tensor::f32(vec![c.b, c.hkv, c.skv, c.d], kb.clone()),
            Tensor::f32(vec![c.b, c.hkv, c.skv, c.dv], vb.clone()),
        )
    };
    let (pk, pv) = if c.past > 0 {
        (
            Some(rng.tensor(&[c.b, c.hkv, c.past, c.d])),
            Some(rng.tensor(&[c.b, c.hkv, c.past, c.dv])),
        )
    } else {
        (None, None)
    };
    let mask = match c.mask {
        MaskKind::None => None,
        MaskKind::Bool2 => {
            // Keep key 0 visible so that no row is fully masked by the
            // mask alone, except row 1 which masks everything.
            let m: Vec<bool> = (0..c.sq * total)
                .map(|i| {
                    let (r, j) = (i / total, i % total);
                    r != 1 && (j == 0 || (i * 5 + 3) % 7 > 2)
                })
                .collect();
            Some(Tensor::bool(vec![c.sq, total], m))
        }
        MaskKind::FloatShort4 => Some(rng.tensor(&[c.b, 1, c.sq, total - 1])),
        MaskKind::Bool3 => {
            let m: Vec<bool> = (0..c.hq * c.sq * total)
                .map(|i| (i * 3 + 1) % 5 > 0)
                .collect();
            Some(Tensor::bool(vec![c.hq, c.sq, total], m))
        }
    };
    let attrs = OnnxAttentionAttrs {
        is_causal: c.causal,
        kv_num_heads: c.three_d.then_some(c.hkv as i64),
        q_num_heads: c.three_d.then_some(c.hq as i64),
        scale: c.scale,
        softcap: c.softcap,
        qk_matmul_output_mode: 0,
        softmax_precision: None,
        num_outputs: 3,
    };
    let outs = onnx_attention(&q, &k, &v, mask.as_ref(), pk.as_ref(), pv.as_ref(), &attrs)
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    // Reference: present = past ++ new (in [b, h, s, d]).
    let cat = |past: &Option<Tensor>, new: &[f64], dim: usize| {
        let mut out = Vec::new();
        for bi in 0..c.b {
            for h in 0..c.hkv {
                if let Some(p) = past {
                    let pv = p.to_f64_vec();
                    let o = (bi * c.hkv + h) * c.past * dim;
                    out.extend_from_slice(&pv[o..o + c.past * dim]);
                }
                let o = (bi * c.hkv + h) * c.skv * dim;
                out.extend_from_slice(&new[o..o + c.skv * dim]);
            }
        }
        out
    };
    let pk_want = cat(&pk, &to64(&kb), c.d);
    let pv_want = cat(&pv, &to64(&vb), c.dv);
    let maskv = mask.as_ref().map(|m| m.to_f64_vec());
    let bias = |bi: usize, h: usize, i: usize, j: usize| -> f64 {
        let mut x = 0.0;
        if c.causal && j > i + c.past {
            x = f64::NEG_INFINITY;
        }
        let m = match (&maskv, c.mask) {
            (Some(m), MaskKind::Bool2) => {
                if m[i * total + j] != 0.0 {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            }
            (Some(m), MaskKind::Bool3) => {
                if m[(h * c.sq + i) * total + j] != 0.0 {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            }
            (Some(m), MaskKind::FloatShort4) => {
                if j < total - 1 {
                    m[(bi * c.sq + i) * (total - 1) + j]
                } else {
                    f64::NEG_INFINITY
                }
            }
            _ => 0.0,
        };
        x + m
    };
    let scale = c
        .scale
        .map(|s| s as f64)
        .unwrap_or(1.0 / (c.d as f64).sqrt());
    let y_bhsd = attention_reference::attention_bhsd(
        &to64(&qb),
        &pk_want,
        &pv_want,
        (c.b, c.hq, c.hkv, c.sq, total, c.d, c.dv),
        scale,
        c.softcap as f64,
        &bias,
    );
    let (y_want, y_shape) = if c.three_d {
        (
            attention_reference::to_bshd(&y_bhsd, c.b, c.hq, c.sq, c.dv),
            vec![c.b, c.sq, c.hq * c.dv],
        )
    } else {
        (y_bhsd, vec![c.b, c.hq, c.sq, c.dv])
    };
    let what = format!("{c:?}");
    assert_eq!(outs.len(), 3);
    assert_eq!(outs[0].shape, y_shape, "{what}");
    assert_close(&outs[0].to_f64_vec(), &y_want, 2e-5, &what);
    assert_eq!(outs[1].shape, vec![c.b, c.hkv, total, c.d], "{what}");
    assert_close(&outs[1].to_f64_vec(), &pk_want, 0.0, &what);
    assert_close(&outs[2].to_f64_vec(), &pv_want, 0.0, &what);

    // The reference agrees with this case's expectation (to 1e-6: its
    // default scale is the attribute's f32 1/√d, here it is f64's)...
    let reference = attention_reference::onnx_attention(
        &q,
        &k,
        &v,
        mask.as_ref(),
        pk.as_ref(),
        pv.as_ref(),
        &attrs,
    );
    assert_eq!(reference[0].shape, y_shape, "reference {what}");
    assert_close(&reference[0].to_f64_vec(), &y_want, 1e-6, &what);
    assert_close(&reference[1].to_f64_vec(), &pk_want, 0.0, &what);
    assert_close(&reference[2].to_f64_vec(), &pv_want, 0.0, &what);
    // ...and the kernel on f64 inputs agrees with the reference tightly.
    let wide = |t: &Tensor| match t.data {
        TensorData::Bool(_) => t.clone(),
        _ => to_f64(t),
    };
    let outs64 = onnx_attention(
        &wide(&q),
        &wide(&k),
        &wide(&v),
        mask.as_ref().map(wide).as_ref(),
        pk.as_ref().map(wide).as_ref(),
        pv.as_ref().map(wide).as_ref(),
        &attrs,
    )
    .unwrap();
    for (got, want) in outs64.iter().zip(&reference) {
        assert_eq!((got.dtype, &got.shape), (DType::F64, &want.shape), "{what}");
        assert_close(
            &got.to_f64_vec(),
            &want.to_f64_vec(),
            1e-12,
            &format!("f64 {what}"),
        );
    }
}

#[test]
fn onnx_attention_matches_reference() {
    let mut rng = Rng(14);
    let base = AttnCase {
        three_d: false,
        b: 2,
        hq: 4,
        hkv: 2,
        sq: 7,
        past: 0,
        skv: 7,
        d: 8,
        dv: 8,
        causal: false,
        mask: MaskKind::None,
        softcap: 0.0,
        scale: None,
    };
    let cases = [
        base,
        AttnCase {
            causal: true,
            ..base
        },
        AttnCase {
            three_d: true,
            causal: true,
            ..base
        },
        AttnCase {
            mask: MaskKind::Bool2,
            ..base
        },
        AttnCase {
            mask: MaskKind::Bool2,
            causal: true,
            past: 3,
            ..base
        },
        AttnCase {
            mask: MaskKind::FloatShort4,
            three_d: true,
            ..base
        },
        AttnCase {
            mask: MaskKind::FloatShort4,
            causal: true,
            past: 2,
            skv: 5,
            sq: 5,
            ..base
        },
        AttnCase {
            mask: MaskKind::Bool3,
            hkv: 1,
            ..base
        },
        AttnCase {
            softcap: 1.5,
            scale: Some(0.3),
            ..base
        },
        AttnCase {
            dv: 5,
            three_d: true,
            past: 4,
            ..base
        },
        AttnCase {
            sq: 1,
            skv: 1,
            past: 9,
            causal: true,
            three_d: true,
            ..base
        },
        AttnCase {
            sq: 65,
            skv: 65,
            causal: true,
            b: 1,
            hq: 2,
            hkv: 1,
            ..base
        },
        AttnCase {
            sq: 130,
            skv: 130,
            causal: true,
            b: 1,
            hq: 2,
            hkv: 2,
            d: 4,
            dv: 4,
            ..base
        },
        AttnCase {
            sq: 130,
            skv: 70,
            past: 60,
            causal: true,
            b: 1,
            hq: 2,
            hkv: 1,
            mask: MaskKind::Bool2,
            ..base
        },
        AttnCase {
            sq: 7,
            skv: 130,
            causal: false,
            b: 1,
            mask: MaskKind::FloatShort4,
            ..base
        },
        // More queries than keys without a past: top-left causal.
        AttnCase {
            sq: 9,
            skv: 4,
            causal: true,
            b: 1,
            ..base
        },
    ];
    for c in cases {
        run_attn_case(c, &mut rng);
    }
}

/// Expected values from onnx's reference evaluator (onnx 1.20 in
/// /work/pyenv), produced by (`vals` as in the rotary test, one-node
/// opset-23 models run with `ReferenceEvaluator`):
///
/// ```python
/// # A: 4-D, GQA 4/2, past 1, bool mask [q, total], not causal
/// q=vals([1,4,2,3],0.31,0.2); k=vals([1,2,2,3],0.53,0.3); v=vals([1,2,2,3],0.71,0.4)
/// pk=vals([1,2,1,3],0.23,0.5); pv=vals([1,2,1,3],0.43,0.6)
/// mask=np.array([[True,False,True],[True,True,True]])
/// make_node("Attention",["q","k","v","m","pk","pv"],["y","presk","presv"])
/// # B: 3-D, heads 2/1, past 2, causal, softcap 2, scale 0.7,
/// #    float mask [3, 4] (one key shorter than total 5)
/// q=vals([1,3,4],0.29,0.1); k=vals([1,3,2],0.47,0.2); v=vals([1,3,2],0.61,0.3)
/// pk=vals([1,1,2,2],0.19,0.4); pv=vals([1,1,2,2],0.37,0.5); fm=vals([3,4],0.9,0.7)
/// make_node("Attention",[...],[...],is_causal=1,q_num_heads=2,kv_num_heads=1,softcap=2.0,scale=0.7)
/// ```
#[test]
fn onnx_attention_matches_onnx_reference_values() {
    let vals = |shape: &[usize], a: f64, b: f64| {
        let n: usize = shape.iter().product();
        Tensor::f32(
            shape.to_vec(),
            (0..n).map(|i| (a * i as f64 + b).sin() as f32).collect(),
        )
    };
    let attrs = OnnxAttentionAttrs {
        is_causal: false,
        kv_num_heads: None,
        q_num_heads: None,
        scale: None,
        softcap: 0.0,
        qk_matmul_output_mode: 0,
        softmax_precision: None,
        num_outputs: 3,
    };
    // The kernel's outputs, then the reference's.
    let both = |q: &Tensor,
                k: &Tensor,
                v: &Tensor,
                m: Option<&Tensor>,
                pk: &Tensor,
                pv: &Tensor,
                attrs: &OnnxAttentionAttrs| {
        let kernel = onnx_attention(q, k, v, m, Some(pk), Some(pv), attrs).unwrap();
        let reference = attention_reference::onnx_attention(q, k, v, m, Some(pk), Some(pv), attrs);
        [kernel, reference.to_vec()]
    };
    let mask = Tensor::bool(vec![2, 3], vec![true, false, true, true, true, true]);
    let outs = both(
        &vals(&[1, 4, 2, 3], 0.31, 0.2),
        &vals(&[1, 2, 2, 3], 0.53, 0.3),
        &vals(&[1, 2, 2, 3], 0.71, 0.4),
        Some(&mask),
        &vals(&[1, 2, 1, 3], 0.23, 0.5),
        &vals(&[1, 2, 1, 3], 0.43, 0.6),
        &attrs,
    );
    let y_a = [
        5.68901122e-01,
        4.30281788e-01,
        2.26546451e-01,
        5.05548239e-01,
        5.79939604e-01,
        4.62298274e-01,
        5.69586754e-01,
        3.61534566e-01,
        1.03012152e-01,
        5.16420662e-01,
        4.98049051e-01,
        3.20538878e-01,
        5.30111313e-01,
        9.18173552e-01,
        8.83755386e-01,
        -2.31298164e-01,
        7.12561980e-02,
        3.48685920e-01,
        6.47569776e-01,
        8.66094887e-01,
        7.43128657e-01,
        6.78772867e-01,
        6.02629840e-01,
        4.00893182e-01,
    ];
    let pk_a = [
        4.79425550e-01,
        6.66869640e-01,
        8.19191575e-01,
        2.95520216e-01,
        7.37931371e-01,
        9.77864623e-01,
        9.49485600e-01,
        6.60581172e-01,
        1.90422654e-01,
        9.28368986e-01,
        9.88651752e-01,
        9.96865034e-01,
        -3.31985176e-01,
        -7.63300955e-01,
        -9.85177755e-01,
        -9.36735749e-01,
        -6.31266654e-01,
        -1.52586907e-01,
    ];
    let pv_a = [
        5.64642489e-01,
        8.57298970e-01,
        9.93868351e-01,
        3.89418334e-01,
        8.95698667e-01,
        9.69109118e-01,
        5.74172139e-01,
        -9.82485935e-02,
        -7.23188102e-01,
        9.49485600e-01,
        7.32231438e-01,
        3.81660998e-01,
        -9.98628020e-01,
        -7.91454673e-01,
        -2.01790124e-01,
        4.85394806e-01,
        9.37999964e-01,
        9.37292039e-01,
    ];
    for out in &outs {
        assert_eq!(out[0].shape, vec![1, 4, 2, 3]);
        assert_close(&out[0].to_f64_vec(), &y_a, 1e-6, "A: Y");
        assert_close(&out[1].to_f64_vec(), &pk_a, 1e-7, "A: present_key");
        assert_close(&out[2].to_f64_vec(), &pv_a, 1e-7, "A: present_value");
    }

    let attrs = OnnxAttentionAttrs {
        is_causal: true,
        kv_num_heads: Some(1),
        q_num_heads: Some(2),
        scale: Some(0.7),
        softcap: 2.0,
        ..attrs
    };
    let outs = both(
        &vals(&[1, 3, 4], 0.29, 0.1),
        &vals(&[1, 3, 2], 0.47, 0.2),
        &vals(&[1, 3, 2], 0.61, 0.3),
        Some(&vals(&[3, 4], 0.9, 0.7)),
        &vals(&[1, 1, 2, 2], 0.19, 0.4),
        &vals(&[1, 1, 2, 2], 0.37, 0.5),
        &attrs,
    );
    let y_b = [
        6.36451423e-01,
        8.75484645e-01,
        6.64674759e-01,
        8.86174798e-01,
        8.42076540e-01,
        8.49492311e-01,
        8.40926647e-01,
        8.49365294e-01,
        6.71976268e-01,
        8.58732104e-01,
        6.40356958e-01,
        8.48269999e-01,
    ];
    let pk_b = [
        3.89418334e-01,
        5.56361020e-01,
        7.03279436e-01,
        8.24885726e-01,
        1.98669329e-01,
        6.20985985e-01,
        9.08633471e-01,
        9.99231637e-01,
        8.73133004e-01,
        5.57683706e-01,
    ];
    for out in &outs {
        assert_eq!(out[0].shape, vec![1, 3, 4]);
        assert_close(&out[0].to_f64_vec(), &y_b, 1e-6, "B: Y");
        assert_close(&out[1].to_f64_vec(), &pk_b, 1e-7, "B: present_key");
    }
}

#[test]
fn onnx_attention_errors() {
    let q = Tensor::f32(vec![1, 2, 3, 4], vec![0.0; 24]);
    let k3 = Tensor::f32(vec![1, 3, 3, 4], vec![0.0; 36]);
    let mut attrs = OnnxAttentionAttrs {
        is_causal: false,
        kv_num_heads: None,
        q_num_heads: None,
        scale: None,
        softcap: 0.0,
        qk_matmul_output_mode: 0,
        softmax_precision: None,
        num_outputs: 3,
    };
    let e = onnx_attention(&q, &k3, &k3, None, None, None, &attrs).unwrap_err();
    assert!(e.contains("multiple of kv heads"), "{e}");
    let q3 = Tensor::f32(vec![1, 3, 8], vec![0.0; 24]);
    let e = onnx_attention(&q3, &q3, &q3, None, None, None, &attrs).unwrap_err();
    assert!(e.contains("q_num_heads"), "{e}");
    attrs.qk_matmul_output_mode = 1;
    let e = onnx_attention(&q, &q, &q, None, None, None, &attrs).unwrap_err();
    assert!(e.contains("qk_matmul_output_mode"), "{e}");
    attrs.qk_matmul_output_mode = 0;
    let m = Tensor::bool(vec![3, 4], vec![true; 12]);
    let e = onnx_attention(&q, &q, &q, Some(&m), None, None, &attrs).unwrap_err();
    assert!(e.contains("attn_mask"), "{e}");
}
