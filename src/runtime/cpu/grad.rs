//! Loss and backward kernels for the training ops `autodiff` emits (all but
//! attention, which lives in `attention_grad`).

use crate::ir::{RopeAttrs, Tensor};

pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
) -> Result<Tensor, String> {
    let _ = (logits, labels, ignore_index);
    Err("CrossEntropy: kernel not written yet".into())
}

pub fn cross_entropy_grad(
    logits: &Tensor,
    labels: &Tensor,
    dloss: &Tensor,
    ignore_index: i64,
) -> Result<Tensor, String> {
    let _ = (logits, labels, dloss, ignore_index);
    Err("CrossEntropyGrad: kernel not written yet".into())
}

pub fn rms_norm_grad(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor), String> {
    let _ = (x, weight, dy, eps);
    Err("RmsNormGrad: kernel not written yet".into())
}

pub fn rope_grad(
    dy: &Tensor,
    positions: Option<&Tensor>,
    attrs: &RopeAttrs,
) -> Result<Tensor, String> {
    let _ = (dy, positions, attrs);
    Err("RopeGrad: kernel not written yet".into())
}

pub fn swiglu_grad(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor), String> {
    let _ = (gate, up, dy);
    Err("SwiGluGrad: kernel not written yet".into())
}

pub fn embedding_grad(weight: &Tensor, ids: &Tensor, dy: &Tensor) -> Result<Tensor, String> {
    let _ = (weight, ids, dy);
    Err("EmbeddingGrad: kernel not written yet".into())
}

pub fn linear_grad_weight(x: &Tensor, dy: &Tensor) -> Result<Tensor, String> {
    let _ = (x, dy);
    Err("LinearGradWeight: kernel not written yet".into())
}
