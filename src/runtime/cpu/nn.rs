//! Temporary stub: the real neural-network kernels are written in another
//! branch and replace this file at merge.

use crate::ir::{AttentionAttrs, OnnxAttentionAttrs, ReduceOp, RopeAttrs, Tensor};

const NOT_HERE: &str = "not implemented in this branch";

pub fn softmax(_x: &Tensor, _axis: i64, _log: bool) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn reduce(
    _x: &Tensor,
    _op: ReduceOp,
    _axes: Option<&[i64]>,
    _keepdims: bool,
    _noop_with_empty_axes: bool,
) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn rms_normalization(
    _x: &Tensor,
    _scale: &Tensor,
    _axis: i64,
    _epsilon: f32,
    _stash_type: i64,
) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn rotary_embedding(
    _x: &Tensor,
    _cos: &Tensor,
    _sin: &Tensor,
    _position_ids: Option<&Tensor>,
    _interleaved: bool,
    _num_heads: Option<i64>,
    _rotary_embedding_dim: i64,
) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn onnx_attention(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _mask: Option<&Tensor>,
    _past_key: Option<&Tensor>,
    _past_value: Option<&Tensor>,
    _attrs: &OnnxAttentionAttrs,
) -> Result<Vec<Tensor>, String> {
    Err(NOT_HERE.into())
}

pub fn embedding(_weight: &Tensor, _ids: &Tensor) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn rms_norm(_x: &Tensor, _weight: &Tensor, _eps: f32) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn rope(
    _x: &Tensor,
    _position_ids: Option<&Tensor>,
    _attrs: &RopeAttrs,
) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn attention(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _attrs: &AttentionAttrs,
) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn linear(_x: &Tensor, _weight: &Tensor, _bias: Option<&Tensor>) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}

pub fn swiglu(_gate: &Tensor, _up: &Tensor) -> Result<Tensor, String> {
    Err(NOT_HERE.into())
}
