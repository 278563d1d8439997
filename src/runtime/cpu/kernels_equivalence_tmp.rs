//! TEMPORARY: the old nn/grad/attention_grad kernels against the new
//! kernels/, bit for bit. Removed once the old files are gone.
#![allow(clippy::all)]
use super::linalg::testutil::Rng;
use super::{attention_grad as oa, grad as og, kernels as k, nn as on};
use crate::ir::*;

fn bits(t: &Tensor) -> (DType, Vec<usize>, Vec<u64>) {
    let b = match &t.data {
        TensorData::F32(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
        TensorData::F64(v) => v.iter().map(|x| x.to_bits()).collect(),
        TensorData::I64(v) => v.iter().map(|&x| x as u64).collect(),
        TensorData::Bool(v) => v.iter().map(|&x| x as u64).collect(),
    };
    (t.dtype, t.shape.clone(), b)
}

fn same(a: &Tensor, b: &Tensor, what: &str) {
    assert!(bits(a) == bits(b), "{what}: differs");
}

fn as_dtype(t: &Tensor, d: DType) -> Tensor {
    match d {
        DType::F64 => Tensor {
            dtype: DType::F64,
            shape: t.shape.clone(),
            data: TensorData::F64(t.to_f64_vec()),
        },
        DType::F32 => t.clone(),
        _ => {
            let mut v = t.as_f32().unwrap().to_vec();
            super::linalg::round_to_storage(d, &mut v);
            Tensor {
                dtype: d,
                shape: t.shape.clone(),
                data: TensorData::F32(v),
            }
        }
    }
}

const DTS: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

#[test]
fn onnx_ops_equivalent() {
    let mut rng = Rng(1);
    for d in DTS {
        let x = as_dtype(&rng.tensor(&[3, 5, 130]), d);
        for ax in [0, 1, 2, -1] {
            for log in [false, true] {
                same(
                    &on::softmax(&x, ax, log).unwrap(),
                    &k::softmax(&x, ax, log).unwrap(),
                    "softmax",
                );
            }
        }
        for op in [ReduceOp::Mean, ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            for axes in [None, Some(&[0i64][..]), Some(&[2][..]), Some(&[0, 2][..])] {
                same(
                    &on::reduce(&x, op, axes, true, false).unwrap(),
                    &k::reduce(&x, op, axes, true, false).unwrap(),
                    "reduce",
                );
            }
        }
        let sc = as_dtype(&rng.tensor(&[5, 130]), d);
        same(
            &on::rms_normalization(&x, &sc, 1, 1e-5, 1).unwrap(),
            &k::rms_normalization(&x, &sc, 1, 1e-5, 1).unwrap(),
            "rmsn",
        );
        let xr = as_dtype(&rng.tensor(&[2, 3, 5, 8]), d);
        let cs = as_dtype(&rng.tensor(&[16, 3]), d);
        let sn = as_dtype(&rng.tensor(&[16, 3]), d);
        let pid = Tensor::i64(vec![2, 5], (0..10).map(|i| (i * 3) % 16).collect());
        for il in [false, true] {
            same(
                &on::rotary_embedding(&xr, &cs, &sn, Some(&pid), il, None, 6).unwrap(),
                &k::rotary_embedding(&xr, &cs, &sn, Some(&pid), il, None, 6).unwrap(),
                "rotary",
            );
        }
        let q = as_dtype(&rng.tensor(&[2, 4, 140, 8]), d);
        let kk = as_dtype(&rng.tensor(&[2, 2, 140, 8]), d);
        let vv = as_dtype(&rng.tensor(&[2, 2, 140, 8]), d);
        let pk = as_dtype(&rng.tensor(&[2, 2, 3, 8]), d);
        let m = as_dtype(&rng.tensor(&[140, 143]), d);
        let attrs = OnnxAttentionAttrs {
            is_causal: true,
            kv_num_heads: None,
            q_num_heads: None,
            scale: None,
            softcap: 1.5,
            qk_matmul_output_mode: 0,
            softmax_precision: None,
            num_outputs: 3,
        };
        if matches!(d, DType::F32 | DType::F64) {
            let a =
                on::onnx_attention(&q, &kk, &vv, Some(&m), Some(&pk), Some(&pk), &attrs).unwrap();
            let b =
                k::onnx_attention(&q, &kk, &vv, Some(&m), Some(&pk), Some(&pk), &attrs).unwrap();
            for (a, b) in a.iter().zip(&b) {
                same(a, b, "onnx attention");
            }
        }
    }
}

#[test]
fn llama_ops_equivalent() {
    let mut rng = Rng(2);
    for d in DTS {
        let w = as_dtype(&rng.tensor(&[11, 48]), d);
        let ids = Tensor::i64(vec![2, 150], (0..300).map(|i| (i * 7) % 11).collect());
        same(
            &on::embedding(&w, &ids).unwrap(),
            &k::embedding(&w, &ids).unwrap(),
            "embedding",
        );
        let x = as_dtype(&rng.tensor(&[2, 150, 48]), d);
        let dy = as_dtype(&rng.tensor(&[2, 150, 48]), d);
        same(
            &og::embedding_grad(&w, &ids, &dy).unwrap(),
            &k::embedding_grad(&w, &ids, &dy).unwrap(),
            "embedding grad",
        );
        let nw = as_dtype(&rng.tensor(&[48]), d);
        same(
            &on::rms_norm(&x, &nw, 1e-6).unwrap(),
            &k::rms_norm(&x, &nw, 1e-6).unwrap(),
            "rms_norm",
        );
        let (a1, a2) = og::rms_norm_grad(&x, &nw, &dy, 1e-6).unwrap();
        let (b1, b2) = k::rms_norm_grad(&x, &nw, &dy, 1e-6).unwrap();
        same(&a1, &b1, "rms dx");
        same(&a2, &b2, "rms dw");
        for (scaling, rd) in [
            (RopeScaling::None, 12),
            (RopeScaling::Linear { factor: 4.0 }, 8),
            (
                RopeScaling::Dynamic {
                    factor: 2.0,
                    original_max_position_embeddings: 8,
                },
                12,
            ),
        ] {
            let attrs = RopeAttrs {
                num_heads: 4,
                head_dim: 12,
                rotary_dim: rd,
                theta: 10000.0,
                scaling,
            };
            let pos = Tensor::i64(vec![2, 150], (0..300).map(|i| (i * 5) % 97).collect());
            for p in [None, Some(&pos)] {
                same(
                    &on::rope(&x, p, &attrs).unwrap(),
                    &k::rope(&x, p, &attrs).unwrap(),
                    "rope",
                );
                same(
                    &og::rope_grad(&dy, p, &attrs).unwrap(),
                    &k::rope_grad(&dy, p, &attrs).unwrap(),
                    "rope grad",
                );
            }
        }
        let lw = as_dtype(&rng.tensor(&[20, 48]), d);
        let lb = as_dtype(&rng.tensor(&[20]), d);
        same(
            &on::linear(&x, &lw, Some(&lb)).unwrap(),
            &k::linear(&x, &lw, Some(&lb)).unwrap(),
            "linear",
        );
        let la = as_dtype(&rng.tensor(&[4, 48]), d);
        let lbb = as_dtype(&rng.tensor(&[20, 4]), d);
        same(
            &on::lora_linear(&x, &lw, &la, &lbb, Some(&lb), 2.0).unwrap(),
            &k::lora_linear(&x, &lw, &la, &lbb, Some(&lb), 2.0).unwrap(),
            "lora",
        );
        same(
            &og::linear_grad_weight(&x, &dy).unwrap(),
            &k::linear_grad_weight(&x, &dy).unwrap(),
            "lgw",
        );
        same(
            &on::swiglu(&x, &dy).unwrap(),
            &k::swiglu(&x, &dy).unwrap(),
            "swiglu",
        );
        let d2 = as_dtype(&rng.tensor(&[2, 150, 48]), d);
        let (a1, a2) = og::swiglu_grad(&x, &dy, &d2).unwrap();
        let (b1, b2) = k::swiglu_grad(&x, &dy, &d2).unwrap();
        same(&a1, &b1, "swiglu dg");
        same(&a2, &b2, "swiglu du");
        let logits = as_dtype(&rng.tensor(&[2, 150, 48]), d);
        let labels = Tensor::i64(
            vec![2, 150],
            (0..300)
                .map(|i| if i % 17 == 0 { -100 } else { (i * 7) % 48 })
                .collect(),
        );
        same(
            &og::cross_entropy(&logits, &labels, -100).unwrap(),
            &k::cross_entropy(&logits, &labels, -100).unwrap(),
            "ce",
        );
        let dl = Tensor::scalar_f32(1.7);
        same(
            &og::cross_entropy_grad(&logits, &labels, &dl, -100).unwrap(),
            &k::cross_entropy_grad(&logits, &labels, &dl, -100).unwrap(),
            "ce grad",
        );
    }
}

#[test]
fn attention_equivalent() {
    let mut rng = Rng(3);
    for d in [DType::F32, DType::F64] {
        for pattern in [
            AttentionPattern::FullCausal,
            AttentionPattern::ShiftedSparse {
                group: GroupSize::Fraction(0.25),
                wrap: false,
            },
            AttentionPattern::ShiftedSparse {
                group: GroupSize::Tokens(70),
                wrap: true,
            },
            AttentionPattern::ShiftedSparse {
                group: GroupSize::Tokens(3),
                wrap: false,
            },
        ] {
            let a = AttentionAttrs {
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                scale: 0.3,
                pattern,
            };
            let q = as_dtype(&rng.tensor(&[2, 300, 32]), d);
            let kk = as_dtype(&rng.tensor(&[2, 300, 16]), d);
            let vv = as_dtype(&rng.tensor(&[2, 300, 16]), d);
            let dout = as_dtype(&rng.tensor(&[2, 300, 32]), d);
            same(
                &on::attention(&q, &kk, &vv, &a).unwrap(),
                &k::attention(&q, &kk, &vv, &a).unwrap(),
                "attention",
            );
            let (o1, l1) = oa::attention_fwd(&q, &kk, &vv, &a).unwrap();
            let (o2, l2) = k::attention_fwd(&q, &kk, &vv, &a).unwrap();
            same(&o1, &o2, "fwd out");
            same(&l1, &l2, "fwd lse");
            let g1 = oa::attention_grad(&q, &kk, &vv, &o1, &l1, &dout, &a).unwrap();
            let g2 = k::attention_grad(&q, &kk, &vv, &o2, &l2, &dout, &a).unwrap();
            same(&g1.0, &g2.0, "dq");
            same(&g1.1, &g2.1, "dk");
            same(&g1.2, &g2.2, "dv");
        }
        // KV cache: more keys than queries.
        let a = AttentionAttrs {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            scale: 0.3,
            pattern: AttentionPattern::FullCausal,
        };
        let q = as_dtype(&rng.tensor(&[1, 3, 32]), d);
        let kk = as_dtype(&rng.tensor(&[1, 170, 16]), d);
        same(
            &on::attention(&q, &kk, &kk, &a).unwrap(),
            &k::attention(&q, &kk, &kk, &a).unwrap(),
            "attention kv cache",
        );
    }
}
