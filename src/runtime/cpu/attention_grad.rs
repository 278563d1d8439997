//! Attention for training: the forward that also returns the log-sum-exp of
//! each query row, and the tiled backward (FlashAttention-2 style), for full
//! causal and shifted sparse (S²-Attn) patterns.

use crate::ir::{AttentionAttrs, Tensor};

pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<(Tensor, Tensor), String> {
    let _ = (q, k, v, attrs);
    Err("AttentionFwd: kernel not written yet".into())
}

pub fn attention_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    attrs: &AttentionAttrs,
) -> Result<(Tensor, Tensor, Tensor), String> {
    let _ = (q, k, v, out, lse, dout, attrs);
    Err("AttentionGrad: kernel not written yet".into())
}
