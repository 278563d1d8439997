//! The closed set of operators. Two levels share one graph: ONNX primitives,
//! as importers produce them, and LLaMA-level ops, as the Hugging Face builder
//! (and later the raise pass) produce them.
//!
//! Attribute forms that moved to inputs across opsets (ReduceMean `axes`,
//! Split `split`, Unsqueeze/Squeeze `axes`) keep the form they were read in:
//! the attribute is `Some` in the old form, the value arrives on an input port
//! in the new one.

use super::{DType, Tensor};
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Sqrt,
    Reciprocal,
    Exp,
    Log,
    Tanh,
    Sigmoid,
    Cos,
    Sin,
    Erf,
    Abs,
    Relu,
    Floor,
    Ceil,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
}

/// Ops that take any number of inputs and broadcast them together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VariadicOp {
    Max,
    Min,
    Sum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Mean,
    Sum,
    Max,
    Min,
}

/// How RoPE frequencies are scaled, with transformers' parameter names and
/// formulas (`rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: `inv_freq /= factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware dynamic scaling; the base grows with the run-time length once
    /// it exceeds `original_max_position_embeddings`.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: u64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: u64,
        beta_fast: f64,
        beta_slow: f64,
        /// Multiplies cos and sin; transformers' default is 0.1·ln(factor)+1.
        attention_factor: Option<f64>,
    },
    Llama3 {
        factor: f64,
        original_max_position_embeddings: u64,
        low_freq_factor: f64,
        high_freq_factor: f64,
    },
}

/// Rotary position embedding on a `[batch, seq, num_heads*head_dim]` tensor,
/// rotate-half convention (as Hugging Face LLaMA), over the first `rotary_dim`
/// channels of each head.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeAttrs {
    pub num_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The group size of shifted sparse attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GroupSize {
    /// A fraction of the run-time sequence length (LongLoRA: 1/4).
    Fraction(f64),
    /// A fixed number of tokens.
    Tokens(usize),
}

impl GroupSize {
    /// The group size in tokens for a sequence of `seq_len` (at least 1).
    pub fn tokens(&self, seq_len: usize) -> usize {
        match *self {
            GroupSize::Fraction(f) => ((seq_len as f64 * f).round() as usize).max(1),
            GroupSize::Tokens(n) => n.max(1),
        }
    }
}

/// Which keys a query may see.
#[derive(Clone, Debug, PartialEq)]
pub enum AttentionPattern {
    /// Every earlier position and itself.
    FullCausal,
    /// LongLoRA's S²-Attn (training only): causal within groups of G tokens;
    /// the second half of the heads uses groups shifted by G/2. Without
    /// `wrap`, the shifted groups are [0,G/2), [G/2,3G/2), … and nothing
    /// crosses the end of the sequence (the official flash-attention path);
    /// with `wrap`, the shifted heads are rolled by −G/2, grouped, and rolled
    /// back (the paper's Algorithm 1).
    ShiftedSparse { group: GroupSize, wrap: bool },
}

/// A LoRA branch on a projection: y = x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ, with
/// scale = alpha/rank (or alpha/√rank with rsLoRA).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAttrs {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// Dropout probability on the branch input, applied in training only.
    pub dropout: f32,
}

impl LoraAttrs {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            (self.alpha / (self.rank as f64).sqrt()) as f32
        } else {
            (self.alpha / self.rank as f64) as f32
        }
    }
}

/// LLaMA self-attention over already-projected, already-rotated q, k, v in
/// `[batch, seq, heads*head_dim]` layout; GQA when `num_kv_heads < num_heads`.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionAttrs {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub pattern: AttentionPattern,
}

/// ONNX opset-23 `Attention`, kept as ONNX defines it.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxAttentionAttrs {
    pub is_causal: bool,
    pub kv_num_heads: Option<i64>,
    pub q_num_heads: Option<i64>,
    pub scale: Option<f32>,
    pub softcap: f32,
    pub qk_matmul_output_mode: i64,
    pub softmax_precision: Option<i64>,
    /// 1 (Y), or 3 (Y, present_key, present_value).
    pub num_outputs: usize,
}

/// The pattern of every [`OpLevel::Boundary`] op.
#[macro_export]
macro_rules! boundary_ops {
    () => {
        $crate::ir::Op::Input | $crate::ir::Op::Weight { .. } | $crate::ir::Op::Constant { .. }
    };
}

/// ONNX elementwise ops that keep their input's shape or broadcast.
#[macro_export]
macro_rules! onnx_elementwise_ops {
    () => {
        $crate::ir::Op::Unary(_)
            | $crate::ir::Op::Binary(_)
            | $crate::ir::Op::Cast { .. }
            | $crate::ir::Op::Identity
    };
}

/// ONNX ops that compute across elements: matrix products, reductions,
/// softmaxes, selections.
#[macro_export]
macro_rules! onnx_math_ops {
    () => {
        $crate::ir::Op::Variadic(_)
            | $crate::ir::Op::Where
            | $crate::ir::Op::MatMul
            | $crate::ir::Op::Gemm { .. }
            | $crate::ir::Op::Softmax { .. }
            | $crate::ir::Op::LogSoftmax { .. }
            | $crate::ir::Op::Reduce { .. }
            | $crate::ir::Op::Trilu { .. }
            | $crate::ir::Op::CumSum { .. }
    };
}

/// ONNX ops that move, index or make shapes and indices.
#[macro_export]
macro_rules! onnx_shape_ops {
    () => {
        $crate::ir::Op::Reshape { .. }
            | $crate::ir::Op::Transpose { .. }
            | $crate::ir::Op::Concat { .. }
            | $crate::ir::Op::Slice
            | $crate::ir::Op::Gather { .. }
            | $crate::ir::Op::GatherNd { .. }
            | $crate::ir::Op::Unsqueeze { .. }
            | $crate::ir::Op::Squeeze { .. }
            | $crate::ir::Op::Expand
            | $crate::ir::Op::Range
            | $crate::ir::Op::Shape { .. }
            | $crate::ir::Op::Size
            | $crate::ir::Op::ConstantOfShape { .. }
            | $crate::ir::Op::Split { .. }
    };
}

/// The opset-23 ONNX ops of a transformer (RMSNorm, RoPE, Attention).
#[macro_export]
macro_rules! onnx_transformer_ops {
    () => {
        $crate::ir::Op::RmsNormalization { .. }
            | $crate::ir::Op::RotaryEmbedding { .. }
            | $crate::ir::Op::OnnxAttention(_)
    };
}

/// The pattern of every [`OpLevel::Onnx`] op.
#[macro_export]
macro_rules! onnx_ops {
    () => {
        $crate::onnx_elementwise_ops!()
            | $crate::onnx_math_ops!()
            | $crate::onnx_shape_ops!()
            | $crate::onnx_transformer_ops!()
    };
}

/// The pattern of every [`OpLevel::Llama`] op.
#[macro_export]
macro_rules! llama_ops {
    () => {
        $crate::ir::Op::Embedding
            | $crate::ir::Op::RmsNorm { .. }
            | $crate::ir::Op::Rope(_)
            | $crate::ir::Op::Attention(_)
            | $crate::ir::Op::Linear
            | $crate::ir::Op::SwiGlu
            | $crate::ir::Op::LoraLinear(_)
    };
}

/// The pattern of every [`OpLevel::Fused`] op.
#[macro_export]
macro_rules! fused_ops {
    () => {
        $crate::ir::Op::Fused(_) | $crate::ir::Op::MergedLinear(_)
    };
}

/// The pattern of every [`OpLevel::Training`] op.
#[macro_export]
macro_rules! training_ops {
    () => {
        $crate::ir::Op::CrossEntropy { .. }
            | $crate::ir::Op::CrossEntropyGrad { .. }
            | $crate::ir::Op::AttentionFwd(_)
            | $crate::ir::Op::AttentionGrad(_)
            | $crate::ir::Op::RmsNormGrad { .. }
            | $crate::ir::Op::RopeGrad(_)
            | $crate::ir::Op::SwiGluGrad
            | $crate::ir::Op::EmbeddingGrad
            | $crate::ir::Op::LinearGradWeight
    };
}

/// The levels that share one graph (see [`Op::level`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpLevel {
    /// Inputs, weights and constants.
    Boundary,
    /// ONNX primitives, as importers produce them.
    Onnx,
    /// The LLaMA forward's ops, as the HF builder and `raise` produce them.
    Llama,
    /// Loss and backward ops, made by `autodiff`.
    Training,
    /// Kernel fusions, made by `fuse` (after `autodiff`); each has a
    /// reference meaning in the other levels' ops ([`crate::ir::expand`]).
    Fused,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    // --- graph boundary ---------------------------------------------------
    /// A graph input; its name and type are the node's output value.
    Input,
    /// A reference to a weight in the graph's `WeightStore`.
    Weight {
        name: String,
    },
    /// A small constant (ONNX `Constant` node or folded value).
    Constant {
        value: Tensor,
    },

    // --- ONNX primitives --------------------------------------------------
    Unary(UnaryOp),
    Binary(BinaryOp),
    Variadic(VariadicOp),
    Where,
    MatMul,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    Softmax {
        axis: i64,
    },
    LogSoftmax {
        axis: i64,
    },
    /// `axes` is `Some` in the attribute form; in the input form the axes are
    /// input 1 (absent = all axes, unless `noop_with_empty_axes`).
    Reduce {
        op: ReduceOp,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_with_empty_axes: bool,
    },
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Concat {
        axis: i64,
    },
    /// Inputs: data, starts, ends, [axes], [steps].
    Slice,
    Gather {
        axis: i64,
    },
    GatherNd {
        batch_dims: i64,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Expand,
    /// Inputs: start, limit, delta.
    Range,
    Shape {
        start: Option<i64>,
        end: Option<i64>,
    },
    Size,
    Cast {
        to: DType,
    },
    ConstantOfShape {
        value: Option<Tensor>,
    },
    Trilu {
        upper: bool,
    },
    CumSum {
        exclusive: bool,
        reverse: bool,
    },
    /// `split` is `Some` in the attribute form; else input 1 or equal parts.
    Split {
        axis: i64,
        split: Option<Vec<i64>>,
        num_outputs: usize,
    },
    Identity,
    /// ONNX opset-23 `RMSNormalization`.
    RmsNormalization {
        axis: i64,
        epsilon: f32,
        stash_type: i64,
    },
    /// ONNX opset-23 `RotaryEmbedding`; inputs x, cos_cache, sin_cache, [position_ids].
    RotaryEmbedding {
        interleaved: bool,
        num_heads: Option<i64>,
        rotary_embedding_dim: i64,
    },
    /// ONNX opset-23 `Attention`; inputs Q, K, V, [attn_mask], [past_key], [past_value].
    OnnxAttention(OnnxAttentionAttrs),

    // --- LLaMA level ------------------------------------------------------
    /// Inputs: weight [vocab, hidden], ids [batch, seq] (i64) → [batch, seq, hidden].
    Embedding,
    /// Inputs: x, weight. x·rsqrt(mean(x²)+eps)·weight, computed in f32.
    RmsNorm {
        eps: f32,
    },
    /// Inputs: x [batch, seq, heads*head_dim], [position_ids i64 [batch, seq]].
    Rope(RopeAttrs),
    /// Inputs: q, k, v.
    Attention(AttentionAttrs),
    /// Inputs: x, weight [out, in] (Hugging Face layout), [bias]. x·Wᵀ + b.
    Linear,
    /// Inputs: gate, up. silu(gate)·up.
    SwiGlu,
    /// Inputs: x, weight [out, in], lora_A [rank, in], lora_B [out, rank], [bias].
    LoraLinear(LoraAttrs),

    // --- training (loss and backward ops, made by `autodiff`) -------------
    /// Mean next-token cross-entropy. Inputs: logits [batch, seq, vocab],
    /// labels i64 [batch, seq]. Position t is scored against label t+1 (the
    /// last position predicts nothing); labels equal to `ignore_index` are
    /// skipped. Output: f32 scalar, the mean over scored positions (0 when
    /// there are none).
    CrossEntropy {
        ignore_index: i64,
    },
    /// Inputs: logits, labels, dloss (scalar) → dlogits (the shape of logits).
    CrossEntropyGrad {
        ignore_index: i64,
    },
    /// Attention that also returns the log-sum-exp of each query's scaled
    /// scores, for the backward pass. Inputs: q, k, v (as `Attention`).
    /// Outputs: out [batch, seq, heads*head_dim], lse [batch, heads, seq] in
    /// q's dtype (f32, or f64 for finite-difference checks).
    AttentionFwd(AttentionAttrs),
    /// Inputs: q, k, v, out, lse, dout → dq, dk, dv.
    AttentionGrad(AttentionAttrs),
    /// Inputs: x, weight, dy → dx, dweight.
    RmsNormGrad {
        eps: f32,
    },
    /// The transpose of `Rope` (rotation by −θ). Inputs: dy, [position_ids].
    RopeGrad(RopeAttrs),
    /// Inputs: gate, up, dy → dgate, dup.
    SwiGluGrad,
    /// Inputs: weight [vocab, hidden] (read for its shape), ids, dy
    /// [batch, seq, hidden] → dweight [vocab, hidden] (rows scatter-added
    /// in a fixed order).
    EmbeddingGrad,
    /// Inputs: x [..., in], dy [..., out] → dW [out, in] = Σ_rows dyᵀ·x.
    LinearGradWeight,

    // --- fusions (made by `fuse`, after `autodiff`) -----------------------
    /// A chain of elementwise ops as one expression DAG over the inputs.
    Fused(super::FusedExpr),
    /// Projections of one input as one GEMM against their concatenated
    /// weight, one output per projection (see [`super::MergedLinear`]).
    MergedLinear(super::MergedLinear),
}

impl Op {
    /// The operator's name in the canonical print and in errors. ONNX
    /// primitives use their ONNX op type.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "Input",
            Op::Weight { .. } => "Weight",
            Op::Constant { .. } => "Constant",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "Neg",
                UnaryOp::Sqrt => "Sqrt",
                UnaryOp::Reciprocal => "Reciprocal",
                UnaryOp::Exp => "Exp",
                UnaryOp::Log => "Log",
                UnaryOp::Tanh => "Tanh",
                UnaryOp::Sigmoid => "Sigmoid",
                UnaryOp::Cos => "Cos",
                UnaryOp::Sin => "Sin",
                UnaryOp::Erf => "Erf",
                UnaryOp::Abs => "Abs",
                UnaryOp::Relu => "Relu",
                UnaryOp::Floor => "Floor",
                UnaryOp::Ceil => "Ceil",
                UnaryOp::Not => "Not",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Pow => "Pow",
                BinaryOp::Equal => "Equal",
                BinaryOp::Less => "Less",
                BinaryOp::LessOrEqual => "LessOrEqual",
                BinaryOp::Greater => "Greater",
                BinaryOp::GreaterOrEqual => "GreaterOrEqual",
                BinaryOp::And => "And",
                BinaryOp::Or => "Or",
            },
            Op::Variadic(v) => match v {
                VariadicOp::Max => "Max",
                VariadicOp::Min => "Min",
                VariadicOp::Sum => "Sum",
            },
            Op::Where => "Where",
            Op::MatMul => "MatMul",
            Op::Gemm { .. } => "Gemm",
            Op::Softmax { .. } => "Softmax",
            Op::LogSoftmax { .. } => "LogSoftmax",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Mean => "ReduceMean",
                ReduceOp::Sum => "ReduceSum",
                ReduceOp::Max => "ReduceMax",
                ReduceOp::Min => "ReduceMin",
            },
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Concat { .. } => "Concat",
            Op::Slice => "Slice",
            Op::Gather { .. } => "Gather",
            Op::GatherNd { .. } => "GatherND",
            Op::Unsqueeze { .. } => "Unsqueeze",
            Op::Squeeze { .. } => "Squeeze",
            Op::Expand => "Expand",
            Op::Range => "Range",
            Op::Shape { .. } => "Shape",
            Op::Size => "Size",
            Op::Cast { .. } => "Cast",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Trilu { .. } => "Trilu",
            Op::CumSum { .. } => "CumSum",
            Op::Split { .. } => "Split",
            Op::Identity => "Identity",
            Op::RmsNormalization { .. } => "RMSNormalization",
            Op::RotaryEmbedding { .. } => "RotaryEmbedding",
            Op::OnnxAttention(_) => "onnx.Attention",
            Op::Embedding => "Embedding",
            Op::RmsNorm { .. } => "RmsNorm",
            Op::Rope(_) => "Rope",
            Op::Attention(_) => "Attention",
            Op::Linear => "Linear",
            Op::SwiGlu => "SwiGlu",
            Op::LoraLinear(_) => "LoraLinear",
            Op::CrossEntropy { .. } => "CrossEntropy",
            Op::CrossEntropyGrad { .. } => "CrossEntropyGrad",
            Op::AttentionFwd(_) => "AttentionFwd",
            Op::AttentionGrad(_) => "AttentionGrad",
            Op::RmsNormGrad { .. } => "RmsNormGrad",
            Op::RopeGrad(_) => "RopeGrad",
            Op::SwiGluGrad => "SwiGluGrad",
            Op::EmbeddingGrad => "EmbeddingGrad",
            Op::LinearGradWeight => "LinearGradWeight",
            Op::Fused(_) => "Fused",
            Op::MergedLinear(_) => "MergedLinear",
        }
    }

    /// True for the LLaMA-level ops (which ONNX export must lower).
    /// Which of the graph's levels the op belongs to: the one definition
    /// every level predicate reads. The level patterns are macros
    /// ([`boundary_ops!`], [`onnx_ops!`], [`llama_ops!`], [`training_ops!`])
    /// so that per-op tables can match a whole level; this match is
    /// exhaustive, so a new op does not compile until it joins one.
    pub fn level(&self) -> OpLevel {
        match self {
            crate::boundary_ops!() => OpLevel::Boundary,
            crate::onnx_ops!() => OpLevel::Onnx,
            crate::llama_ops!() => OpLevel::Llama,
            crate::training_ops!() => OpLevel::Training,
            crate::fused_ops!() => OpLevel::Fused,
        }
    }

    /// A fusion made by the `fuse` pass.
    pub fn is_fused(&self) -> bool {
        self.level() == OpLevel::Fused
    }

    /// An op of the LLaMA forward that ONNX has no single op for.
    pub fn is_llama_level(&self) -> bool {
        self.level() == OpLevel::Llama
    }

    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input | Op::Weight { .. } | Op::Constant { .. } => (0, 0),
            Op::Unary(_) | Op::Softmax { .. } | Op::LogSoftmax { .. } => (1, 1),
            Op::Transpose { .. } | Op::Shape { .. } | Op::Size | Op::Cast { .. } => (1, 1),
            Op::ConstantOfShape { .. } | Op::Identity => (1, 1),
            Op::Binary(_) | Op::MatMul | Op::Expand => (2, 2),
            Op::Variadic(_) | Op::Concat { .. } => (1, usize::MAX),
            Op::Where | Op::Range => (3, 3),
            Op::Gemm { .. } => (2, 3),
            Op::Reduce { axes: Some(_), .. } => (1, 1),
            Op::Reduce { axes: None, .. } => (1, 2),
            Op::Reshape { .. } | Op::Gather { .. } | Op::GatherNd { .. } => (2, 2),
            Op::Slice => (3, 5),
            Op::Unsqueeze { axes: Some(_) } | Op::Squeeze { axes: Some(_) } => (1, 1),
            Op::Unsqueeze { axes: None } => (2, 2),
            Op::Squeeze { axes: None } => (1, 2),
            Op::Trilu { .. } => (1, 2),
            Op::CumSum { .. } => (2, 2),
            Op::Split { split: Some(_), .. } => (1, 1),
            Op::Split { split: None, .. } => (1, 2),
            Op::RmsNormalization { .. } => (2, 2),
            Op::RotaryEmbedding { .. } => (3, 4),
            Op::OnnxAttention(_) => (3, 6),
            Op::Embedding => (2, 2),
            Op::RmsNorm { .. } => (2, 2),
            Op::Rope(_) => (1, 2),
            Op::Attention(_) => (3, 3),
            Op::Linear => (2, 3),
            Op::SwiGlu => (2, 2),
            Op::LoraLinear(_) => (4, 5),
            Op::CrossEntropy { .. } => (2, 2),
            Op::CrossEntropyGrad { .. } => (3, 3),
            Op::AttentionFwd(_) => (3, 3),
            Op::AttentionGrad(_) => (6, 6),
            Op::RmsNormGrad { .. } => (3, 3),
            Op::RopeGrad(_) => (1, 2),
            Op::SwiGluGrad => (3, 3),
            Op::EmbeddingGrad => (3, 3),
            Op::LinearGradWeight => (2, 2),
            Op::Fused(e) => (e.num_inputs(), e.num_inputs()),
            Op::MergedLinear(m) => (m.num_inputs(), m.num_inputs()),
        }
    }

    /// True for the loss and backward ops, which only `autodiff` makes and
    /// which no exporter writes.
    pub fn is_training(&self) -> bool {
        self.level() == OpLevel::Training
    }

    /// Number of outputs.
    pub fn num_outputs(&self) -> usize {
        match self {
            Op::Split { num_outputs, .. } => *num_outputs,
            Op::OnnxAttention(at) => at.num_outputs,
            Op::AttentionFwd(_) | Op::RmsNormGrad { .. } | Op::SwiGluGrad => 2,
            Op::AttentionGrad(_) => 3,
            Op::MergedLinear(m) => m.parts.len(),
            _ => 1,
        }
    }

    /// The attributes in a fixed order, rendered for the canonical print and
    /// for `diff-graph` (`name=value`).
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        fn ints(v: &[i64]) -> String {
            let mut s = String::from("[");
            for (i, x) in v.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                let _ = write!(s, "{x}");
            }
            s.push(']');
            s
        }
        let f = |x: f64| super::tensor::format_float(x);
        let f32s = |x: f32| super::tensor::format_f32(x);
        let mut a: Vec<(&'static str, String)> = Vec::new();
        match self {
            Op::Weight { name } => a.push(("name", name.clone())),
            Op::Constant { value } => {
                a.push(("dtype", value.dtype.to_string()));
                a.push(("shape", format!("{:?}", value.shape)));
                a.push(("value", value.summary()));
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                a.push(("alpha", f32s(*alpha)));
                a.push(("beta", f32s(*beta)));
                a.push(("transA", (*trans_a as u8).to_string()));
                a.push(("transB", (*trans_b as u8).to_string()));
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::Concat { axis } => {
                a.push(("axis", axis.to_string()))
            }
            Op::Reduce {
                axes,
                keepdims,
                noop_with_empty_axes,
                ..
            } => {
                if let Some(ax) = axes {
                    a.push(("axes", ints(ax)));
                }
                a.push(("keepdims", (*keepdims as u8).to_string()));
                if *noop_with_empty_axes {
                    a.push(("noop_with_empty_axes", "1".into()));
                }
            }
            Op::Reshape { allowzero: true } => a.push(("allowzero", "1".into())),
            Op::Transpose { perm: Some(p) } => a.push(("perm", ints(p))),
            Op::Gather { axis } => a.push(("axis", axis.to_string())),
            Op::GatherNd { batch_dims } => a.push(("batch_dims", batch_dims.to_string())),
            Op::Unsqueeze { axes } | Op::Squeeze { axes } => {
                if let Some(ax) = axes {
                    a.push(("axes", ints(ax)))
                }
            }
            Op::Shape { start, end } => {
                if let Some(s) = start {
                    a.push(("start", s.to_string()))
                }
                if let Some(e) = end {
                    a.push(("end", e.to_string()))
                }
            }
            Op::Cast { to } => a.push(("to", to.to_string())),
            Op::ConstantOfShape { value: Some(v) } => {
                a.push(("value", format!("{}{}", v.dtype, v.summary())))
            }
            Op::Trilu { upper } => a.push(("upper", (*upper as u8).to_string())),
            Op::CumSum { exclusive, reverse } => {
                a.push(("exclusive", (*exclusive as u8).to_string()));
                a.push(("reverse", (*reverse as u8).to_string()));
            }
            Op::Split {
                axis,
                split,
                num_outputs,
            } => {
                a.push(("axis", axis.to_string()));
                if let Some(s) = split {
                    a.push(("split", ints(s)));
                }
                a.push(("outputs", num_outputs.to_string()));
            }
            Op::RmsNormalization {
                axis,
                epsilon,
                stash_type,
            } => {
                a.push(("axis", axis.to_string()));
                a.push(("epsilon", f32s(*epsilon)));
                a.push(("stash_type", stash_type.to_string()));
            }
            Op::RotaryEmbedding {
                interleaved,
                num_heads,
                rotary_embedding_dim,
            } => {
                a.push(("interleaved", (*interleaved as u8).to_string()));
                if let Some(n) = num_heads {
                    a.push(("num_heads", n.to_string()));
                }
                a.push(("rotary_embedding_dim", rotary_embedding_dim.to_string()));
            }
            Op::OnnxAttention(at) => {
                a.push(("is_causal", (at.is_causal as u8).to_string()));
                if let Some(n) = at.q_num_heads {
                    a.push(("q_num_heads", n.to_string()));
                }
                if let Some(n) = at.kv_num_heads {
                    a.push(("kv_num_heads", n.to_string()));
                }
                if let Some(s) = at.scale {
                    a.push(("scale", f32s(s)));
                }
                if at.softcap != 0.0 {
                    a.push(("softcap", f32s(at.softcap)));
                }
                if at.qk_matmul_output_mode != 0 {
                    a.push((
                        "qk_matmul_output_mode",
                        at.qk_matmul_output_mode.to_string(),
                    ));
                }
                if let Some(p) = at.softmax_precision {
                    a.push(("softmax_precision", p.to_string()));
                }
                if at.num_outputs != 1 {
                    a.push(("outputs", at.num_outputs.to_string()));
                }
            }
            Op::RmsNorm { eps } | Op::RmsNormGrad { eps } => a.push(("eps", f32s(*eps))),
            Op::CrossEntropy { ignore_index } | Op::CrossEntropyGrad { ignore_index } => {
                a.push(("ignore_index", ignore_index.to_string()))
            }
            Op::Rope(r) | Op::RopeGrad(r) => {
                a.push(("heads", r.num_heads.to_string()));
                a.push(("head_dim", r.head_dim.to_string()));
                if r.rotary_dim != r.head_dim {
                    a.push(("rotary_dim", r.rotary_dim.to_string()));
                }
                a.push(("theta", f(r.theta)));
                match &r.scaling {
                    RopeScaling::None => {}
                    RopeScaling::Linear { factor } => {
                        a.push(("scaling", "linear".into()));
                        a.push(("factor", f(*factor)));
                    }
                    RopeScaling::Dynamic {
                        factor,
                        original_max_position_embeddings,
                    } => {
                        a.push(("scaling", "dynamic".into()));
                        a.push(("factor", f(*factor)));
                        a.push((
                            "original_max_position_embeddings",
                            original_max_position_embeddings.to_string(),
                        ));
                    }
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings,
                        beta_fast,
                        beta_slow,
                        attention_factor,
                    } => {
                        a.push(("scaling", "yarn".into()));
                        a.push(("factor", f(*factor)));
                        a.push((
                            "original_max_position_embeddings",
                            original_max_position_embeddings.to_string(),
                        ));
                        a.push(("beta_fast", f(*beta_fast)));
                        a.push(("beta_slow", f(*beta_slow)));
                        if let Some(af) = attention_factor {
                            a.push(("attention_factor", f(*af)));
                        }
                    }
                    RopeScaling::Llama3 {
                        factor,
                        original_max_position_embeddings,
                        low_freq_factor,
                        high_freq_factor,
                    } => {
                        a.push(("scaling", "llama3".into()));
                        a.push(("factor", f(*factor)));
                        a.push((
                            "original_max_position_embeddings",
                            original_max_position_embeddings.to_string(),
                        ));
                        a.push(("low_freq_factor", f(*low_freq_factor)));
                        a.push(("high_freq_factor", f(*high_freq_factor)));
                    }
                }
            }
            Op::Attention(at) | Op::AttentionFwd(at) | Op::AttentionGrad(at) => {
                a.push(("heads", at.num_heads.to_string()));
                a.push(("kv_heads", at.num_kv_heads.to_string()));
                a.push(("head_dim", at.head_dim.to_string()));
                a.push(("scale", f32s(at.scale)));
                match &at.pattern {
                    AttentionPattern::FullCausal => a.push(("pattern", "full_causal".into())),
                    AttentionPattern::ShiftedSparse { group, wrap } => {
                        a.push(("pattern", "shifted_sparse".into()));
                        match group {
                            GroupSize::Fraction(x) => a.push(("group_fraction", f(*x))),
                            GroupSize::Tokens(n) => a.push(("group_size", n.to_string())),
                        }
                        if *wrap {
                            a.push(("wrap", "1".into()));
                        }
                    }
                }
            }
            Op::Fused(e) => {
                a.push(("expr", e.render()));
                match e.dtypes.split_first() {
                    Some((first, rest)) if rest.iter().all(|d| d == first) => {
                        a.push(("dtype", first.to_string()))
                    }
                    _ => {
                        let d: Vec<String> = e.dtypes.iter().map(|d| d.to_string()).collect();
                        a.push(("dtypes", format!("[{}]", d.join(","))));
                    }
                }
            }
            Op::MergedLinear(m) => {
                let parts: Vec<String> = m
                    .parts
                    .iter()
                    .map(|p| match &p.lora {
                        None => p.out_features.to_string(),
                        Some(l) => {
                            let mut s = format!(
                                "{}+lora(r={},alpha={}",
                                p.out_features,
                                l.rank,
                                f(l.alpha)
                            );
                            if l.rslora {
                                s.push_str(",rslora");
                            }
                            s.push(')');
                            s
                        }
                    })
                    .collect();
                a.push(("parts", format!("[{}]", parts.join(","))));
            }
            Op::LoraLinear(l) => {
                a.push(("rank", l.rank.to_string()));
                a.push(("alpha", f(l.alpha)));
                if l.rslora {
                    a.push(("rslora", "1".into()));
                }
                if l.dropout != 0.0 {
                    a.push(("dropout", f32s(l.dropout)));
                }
            }
            _ => {}
        }
        a
    }
}
