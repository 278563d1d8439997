//! The CPU's neural-network kernels, one file per concern, forward and
//! backward together:
//!
//! | file | ops |
//! |---|---|
//! | [`onnx_nn`] | ONNX Softmax/LogSoftmax, Reduce*, RMSNormalization, RotaryEmbedding, Attention |
//! | [`rms_norm`] | RmsNorm, RmsNormGrad |
//! | [`rope`] | Rope, RopeGrad (one rotation, two directions) |
//! | [`attention`] | Attention (full causal, S²-Attn), AttentionFwd, AttentionGrad |
//! | [`linear`] | Linear, LoraLinear, LinearGradWeight |
//! | [`swiglu`] | SwiGlu, SwiGluGrad |
//! | [`embedding`] | Embedding, EmbeddingGrad |
//! | [`cross_entropy`] | CrossEntropy, CrossEntropyGrad |
//! | [`fused`] | Fused (elementwise expressions), MergedLinear |
//!
//! Each file also has a `reference` module: the op written as plain index
//! loops in f64, slow and obviously right. It is what the op means, and
//! every backend's tests compare their kernels against it.
//!
//! Conventions the kernels share: f32/f16/bf16 tensors compute in f32
//! (f16/bf16 results are rounded to their storage precision), f64 tensors
//! in f64. Sums that feed a normalisation (softmax denominators, means of
//! squares, ReduceSum/Mean) accumulate in f64. Work is split over rows with
//! rayon, each row computed by one task in a fixed order, and sums over
//! rows add fixed-size partials in a fixed order, so results never depend
//! on scheduling or on the number of threads. Each backward is the exact
//! derivative of its forward, with the forward's f16/bf16 roundings taken
//! as identities.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod fused;
pub mod linear;
pub mod onnx_nn;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
mod testutil;

pub use attention::{attention, attention_fwd, attention_grad};
pub use cross_entropy::{cross_entropy, cross_entropy_grad};
pub use embedding::{embedding, embedding_grad};
pub use fused::{fused, merged_linear};
pub use linear::{linear, linear_grad_weight, lora_linear};
pub use onnx_nn::{onnx_attention, reduce, rms_normalization, rotary_embedding, softmax};
pub use rms_norm::{rms_norm, rms_norm_grad};
pub use rope::{rope, rope_grad};
pub use swiglu::{swiglu, swiglu_grad};

use crate::ir::{DType, Tensor, TensorData};

/// Below this many elements per task, rayon's overhead outweighs the split.
const MIN_TASK_ELEMS: usize = 1 << 13;

/// Rows per rayon task for rows of `row_len` elements.
fn min_rows(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

fn float_kind_error(op: &str, what: &str, t: &Tensor) -> String {
    format!("{op} needs a float {what}, got {}", t.dtype)
}

/// The result dtype of combining two float tensors ([`DType::promote`], the
/// rule type inference uses too).
fn promote(a: DType, b: DType) -> DType {
    a.promote(b)
}

/// Whether two tensors hold the same kind of data (both f32-held, both f64…).
fn same_data_kind(a: &Tensor, b: &Tensor) -> bool {
    std::mem::discriminant(&a.data) == std::mem::discriminant(&b.data)
}

/// The compute dtype of a float result: f64 stays f64, the rest is f32 (or
/// their own f16/bf16 type where a kernel keeps it).
fn compute_dtype(t: &Tensor) -> DType {
    match t.data {
        TensorData::F64(_) => DType::F64,
        _ => DType::F32,
    }
}
