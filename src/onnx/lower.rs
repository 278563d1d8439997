//! Lowering of LLaMA-level ops to standard ONNX primitives (opset 17 and
//! later), so an exported model runs in any ONNX runtime at any batch size
//! and sequence length. Masks and positions are built from the run-time
//! sequence length (`Shape` → `Gather` → `Range`), never baked in.
//!
//! ```text
//! %y = Linear(%x, @w)            %t = Transpose{perm=[1,0]}(@w)
//!                          ==>   %y = MatMul(%x, %t)
//! ```
//!
//! Weights keep their names and their Hugging Face layout (`[out, in]`).

use crate::ir::{
    rope, AttentionAttrs, AttentionPattern, BinaryOp, DType, Graph, GroupSize, Op, ReduceOp,
    RopeAttrs, RopeScaling, Tensor, TensorData, TensorType, UnaryOp, Value, VariadicOp,
};
use crate::{Error, Result};

/// Returns a copy of `graph` with every LLaMA-level op replaced by ONNX
/// primitives valid at `opset` (17 or later). Fused ops (made by `fuse`)
/// are expanded into the ops they stand for first.
pub fn lower(graph: &Graph, opset: i64) -> Result<Graph> {
    let mut g = graph.clone();
    crate::ir::expand_all(&mut g)?;
    let order = g.topo_order()?;
    for n in order {
        if !g.node(n).op.is_llama_level() {
            continue;
        }
        let node = g.node(n).clone();
        let display = g.display_name(n);
        let ins = g.inputs_of(n);
        let input = |i: usize| -> Result<Value> {
            ins.get(i).copied().flatten().ok_or_else(|| {
                Error::invalid(format!(
                    "node '{display}' ({}): input {i} is missing",
                    node.op.name()
                ))
            })
        };
        let mut b = Builder {
            g: &mut g,
            prefix: format!("{display}/"),
            count: 0,
            opset,
        };
        let out = match &node.op {
            Op::Embedding => b.op(Op::Gather { axis: 0 }, &[input(0)?, input(1)?])?,
            Op::Linear => {
                let wt = b.op(
                    Op::Transpose {
                        perm: Some(vec![1, 0]),
                    },
                    &[input(1)?],
                )?;
                let y = b.op(Op::MatMul, &[input(0)?, wt])?;
                match ins.get(2).copied().flatten() {
                    Some(bias) => b.op(Op::Binary(BinaryOp::Add), &[y, bias])?,
                    None => y,
                }
            }
            Op::LoraLinear(l) => b.lora_linear(
                input(0)?,
                input(1)?,
                input(2)?,
                input(3)?,
                ins.get(4).copied().flatten(),
                l.scale(),
            )?,
            Op::SwiGlu => {
                let gate = input(0)?;
                let s = b.op(Op::Unary(UnaryOp::Sigmoid), &[gate])?;
                let silu = b.op(Op::Binary(BinaryOp::Mul), &[gate, s])?;
                b.op(Op::Binary(BinaryOp::Mul), &[silu, input(1)?])?
            }
            Op::RmsNorm { eps } => b.rms_norm(input(0)?, input(1)?, *eps)?,
            Op::Rope(r) => b.rope(&display, input(0)?, ins.get(1).copied().flatten(), r)?,
            Op::Attention(a) => b.attention(&display, input(0)?, input(1)?, input(2)?, a)?,
            // Filtered out above: every other level is ONNX already or has
            // no ONNX form. A new LLaMA-level op does not compile until it
            // has a lowering.
            other @ (crate::boundary_ops!()
            | crate::onnx_ops!()
            | crate::training_ops!()
            | crate::fused_ops!()) => {
                return Err(Error::invalid(format!(
                    "node '{display}': no ONNX lowering for {}",
                    other.name()
                )))
            }
        };
        // The last node takes over the original value's name and type.
        let o = &mut g.node_mut(out.node).outputs[out.slot];
        o.name = node.outputs[0].name.clone();
        o.ty = node.outputs[0].ty.clone();
        g.replace_uses(Value::new(n, 0), out);
        g.g.remove_node(n);
    }
    crate::ir::verify(&g)?;
    Ok(g)
}

struct Builder<'g> {
    g: &'g mut Graph,
    prefix: String,
    count: usize,
    opset: i64,
}

impl Builder<'_> {
    fn name(&mut self, what: &str) -> String {
        self.count += 1;
        format!("{}{what}_{}", self.prefix, self.count)
    }

    fn op(&mut self, op: Op, ins: &[Value]) -> Result<Value> {
        let name = self.name(op.name());
        self.g.add(name, op, ins, None)
    }

    fn typed(&mut self, op: Op, ins: &[Value], ty: TensorType) -> Result<Value> {
        let name = self.name(op.name());
        self.g.add(name, op, ins, Some(ty))
    }

    fn constant(&mut self, value: Tensor) -> Result<Value> {
        let ty = TensorType::fixed(value.dtype, &value.shape);
        let name = self.name("Constant");
        self.g.add(name, Op::Constant { value }, &[], Some(ty))
    }

    fn ints(&mut self, v: &[i64]) -> Result<Value> {
        self.constant(Tensor::i64(vec![v.len()], v.to_vec()))
    }

    fn scalar_i64(&mut self, v: i64) -> Result<Value> {
        self.constant(Tensor::scalar_i64(v))
    }

    /// A float constant of logical type `dtype` (values held as f32).
    fn floats(&mut self, dtype: DType, shape: Vec<usize>, v: Vec<f32>) -> Result<Value> {
        let data = if dtype == DType::F64 {
            TensorData::F64(v.iter().map(|&x| x as f64).collect())
        } else {
            TensorData::F32(v)
        };
        self.constant(Tensor { dtype, shape, data })
    }

    fn dtype_of(&self, v: Value) -> DType {
        self.g.value_type(v).map_or(DType::F32, |t| t.dtype)
    }

    fn cast(&mut self, v: Value, to: DType) -> Result<Value> {
        if self.dtype_of(v) == to && self.g.value_type(v).is_some() {
            return Ok(v);
        }
        self.op(Op::Cast { to }, &[v])
    }

    /// `x·Wᵀ + (x·Aᵀ)·Bᵀ·scale (+ bias)`; A and B keep their PEFT names and
    /// layouts (`[rank, in]`, `[out, rank]`) and are transposed in the graph.
    fn lora_linear(
        &mut self,
        x: Value,
        w: Value,
        a: Value,
        b: Value,
        bias: Option<Value>,
        scale: f32,
    ) -> Result<Value> {
        let t = |s: &mut Self, v: Value| {
            s.op(
                Op::Transpose {
                    perm: Some(vec![1, 0]),
                },
                &[v],
            )
        };
        let wt = t(self, w)?;
        let base = self.op(Op::MatMul, &[x, wt])?;
        let at = t(self, a)?;
        let down = self.op(Op::MatMul, &[x, at])?;
        let bt = t(self, b)?;
        let up = self.op(Op::MatMul, &[down, bt])?;
        let dtype = self.dtype_of(x);
        let s = self.floats(dtype, vec![], vec![scale])?;
        let scaled = self.op(Op::Binary(BinaryOp::Mul), &[up, s])?;
        let y = self.op(Op::Binary(BinaryOp::Add), &[base, scaled])?;
        match bias {
            Some(bias) => self.op(Op::Binary(BinaryOp::Add), &[y, bias]),
            None => Ok(y),
        }
    }

    fn unsqueeze(&mut self, v: Value, axes: &[i64]) -> Result<Value> {
        let a = self.ints(axes)?;
        self.op(Op::Unsqueeze { axes: None }, &[v, a])
    }

    fn reshape(&mut self, v: Value, shape: &[i64]) -> Result<Value> {
        let s = self.ints(shape)?;
        self.op(Op::Reshape { allowzero: false }, &[v, s])
    }

    fn transpose(&mut self, v: Value, perm: &[i64]) -> Result<Value> {
        self.op(
            Op::Transpose {
                perm: Some(perm.to_vec()),
            },
            &[v],
        )
    }

    fn slice(&mut self, v: Value, start: i64, end: i64, axis: i64) -> Result<Value> {
        let s = self.ints(&[start])?;
        let e = self.ints(&[end])?;
        let a = self.ints(&[axis])?;
        self.op(Op::Slice, &[v, s, e, a])
    }

    fn bin(&mut self, op: BinaryOp, a: Value, b: Value) -> Result<Value> {
        self.op(Op::Binary(op), &[a, b])
    }

    fn reduce(
        &mut self,
        op: ReduceOp,
        v: Value,
        axes: Option<&[i64]>,
        keepdims: bool,
    ) -> Result<Value> {
        match axes {
            None => self.op(
                Op::Reduce {
                    op,
                    axes: None,
                    keepdims,
                    noop_with_empty_axes: false,
                },
                &[v],
            ),
            Some(ax) if self.opset >= 18 => {
                let a = self.ints(ax)?;
                self.op(
                    Op::Reduce {
                        op,
                        axes: None,
                        keepdims,
                        noop_with_empty_axes: false,
                    },
                    &[v, a],
                )
            }
            Some(ax) => self.op(
                Op::Reduce {
                    op,
                    axes: Some(ax.to_vec()),
                    keepdims,
                    noop_with_empty_axes: false,
                },
                &[v],
            ),
        }
    }

    /// The run-time length of axis 1 of `v`, as an i64 scalar.
    fn seq_len(&mut self, v: Value) -> Result<Value> {
        let shape = self.typed(
            Op::Shape {
                start: None,
                end: None,
            },
            &[v],
            TensorType::new(DType::I64, vec![crate::ir::Dim::Sym(String::new())]),
        )?;
        let one = self.scalar_i64(1)?;
        self.typed(
            Op::Gather { axis: 0 },
            &[shape, one],
            TensorType::new(DType::I64, vec![]),
        )
    }

    /// `0..len` as i64.
    fn arange(&mut self, len: Value) -> Result<Value> {
        let zero = self.scalar_i64(0)?;
        let one = self.scalar_i64(1)?;
        self.op(Op::Range, &[zero, len, one])
    }

    /// x·(1/sqrt(mean(x²)+eps))·w, the statistics in f32.
    fn rms_norm(&mut self, x: Value, w: Value, eps: f32) -> Result<Value> {
        let dtype = self.dtype_of(x);
        let xf = if dtype == DType::F32 {
            x
        } else {
            self.cast(x, DType::F32)?
        };
        let sq = self.bin(BinaryOp::Mul, xf, xf)?;
        let mean = self.reduce(ReduceOp::Mean, sq, Some(&[-1]), true)?;
        let e = self.floats(DType::F32, vec![], vec![eps])?;
        let var = self.bin(BinaryOp::Add, mean, e)?;
        let sd = self.op(Op::Unary(UnaryOp::Sqrt), &[var])?;
        let inv = self.op(Op::Unary(UnaryOp::Reciprocal), &[sd])?;
        let y = self.bin(BinaryOp::Mul, xf, inv)?;
        let y = if dtype == DType::F32 {
            y
        } else {
            self.cast(y, dtype)?
        };
        let w = if self.g.value_type(w).is_some_and(|t| t.dtype != dtype) {
            self.cast(w, dtype)?
        } else {
            w
        };
        self.bin(BinaryOp::Mul, y, w)
    }

    /// Rotate-half RoPE on `[batch, seq, heads*head_dim]`.
    fn rope(&mut self, who: &str, x: Value, pos: Option<Value>, r: &RopeAttrs) -> Result<Value> {
        let (h, d, rot) = (r.num_heads, r.head_dim, r.rotary_dim);
        if rot == 0 || rot % 2 != 0 || rot > d {
            return Err(Error::invalid(format!(
                "node '{who}' (Rope): rotary_dim {rot} must be even, positive and at most \
                 head_dim {d}"
            )));
        }
        let half = rot / 2;
        let dtype = self.dtype_of(x);
        // Positions as f32, [batch, seq] or [1, seq].
        let (pos_f, len) = match pos {
            Some(p) => {
                let pf = self.cast(p, DType::F32)?;
                (pf, None)
            }
            None => {
                let s = self.seq_len(x)?;
                let idx = self.arange(s)?;
                let f = self.cast(idx, DType::F32)?;
                (self.unsqueeze(f, &[0])?, Some(s))
            }
        };
        let (static_inv, attention_factor) = rope::inv_freq(r, 0);
        let inv = match &r.scaling {
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => {
                // transformers' dynamic NTK: the base grows with the longest
                // position seen (max position + 1), once past the original
                // context; below it the ratio is 1 and the base unchanged.
                let run_len = match (len, pos) {
                    (Some(s), _) => s,
                    (None, Some(p)) => {
                        let m = self.reduce(ReduceOp::Max, p, None, false)?;
                        let one = self.scalar_i64(1)?;
                        self.bin(BinaryOp::Add, m, one)?
                    }
                    (None, None) => unreachable!("positions are given or derived"),
                };
                let run_f = self.cast(run_len, DType::F32)?;
                let orig = *original_max_position_embeddings as f32;
                let orig_c = self.floats(DType::F32, vec![], vec![orig])?;
                let m = self.op(Op::Variadic(VariadicOp::Max), &[run_f, orig_c])?;
                let k = self.floats(DType::F32, vec![], vec![*factor as f32 / orig])?;
                let scaled = self.bin(BinaryOp::Mul, m, k)?;
                let fm1 = self.floats(DType::F32, vec![], vec![(*factor - 1.0) as f32])?;
                let ratio = self.bin(BinaryOp::Sub, scaled, fm1)?;
                let dd = rot as f64;
                let ex = self.floats(DType::F32, vec![], vec![(dd / (dd - 2.0)) as f32])?;
                let p = self.bin(BinaryOp::Pow, ratio, ex)?;
                let theta = self.floats(DType::F32, vec![], vec![r.theta as f32])?;
                let base = self.bin(BinaryOp::Mul, theta, p)?;
                let exps: Vec<f32> = (0..half).map(|i| (2 * i) as f32 / rot as f32).collect();
                let ec = self.floats(DType::F32, vec![half], exps)?;
                let powed = self.bin(BinaryOp::Pow, base, ec)?;
                self.op(Op::Unary(UnaryOp::Reciprocal), &[powed])?
            }
            _ => self.floats(DType::F32, vec![half], static_inv)?,
        };
        let p3 = self.unsqueeze(pos_f, &[-1])?;
        let freqs = self.bin(BinaryOp::Mul, p3, inv)?;
        let emb = self.op(Op::Concat { axis: -1 }, &[freqs, freqs])?;
        let mut cos = self.op(Op::Unary(UnaryOp::Cos), &[emb])?;
        let mut sin = self.op(Op::Unary(UnaryOp::Sin), &[emb])?;
        if attention_factor != 1.0 {
            let af = self.floats(DType::F32, vec![], vec![attention_factor])?;
            cos = self.bin(BinaryOp::Mul, cos, af)?;
            sin = self.bin(BinaryOp::Mul, sin, af)?;
        }
        if dtype != DType::F32 {
            cos = self.op(Op::Cast { to: dtype }, &[cos])?;
            sin = self.op(Op::Cast { to: dtype }, &[sin])?;
        }
        let cos = self.unsqueeze(cos, &[2])?;
        let sin = self.unsqueeze(sin, &[2])?;
        let x4 = self.reshape(x, &[0, 0, h as i64, d as i64])?;
        let (x_rot, x_pass) = if rot < d {
            (
                self.slice(x4, 0, rot as i64, 3)?,
                Some(self.slice(x4, rot as i64, d as i64, 3)?),
            )
        } else {
            (x4, None)
        };
        let x1 = self.slice(x_rot, 0, half as i64, 3)?;
        let x2 = self.slice(x_rot, half as i64, rot as i64, 3)?;
        let nx2 = self.op(Op::Unary(UnaryOp::Neg), &[x2])?;
        let rotated = self.op(Op::Concat { axis: 3 }, &[nx2, x1])?;
        let a = self.bin(BinaryOp::Mul, x_rot, cos)?;
        let bsin = self.bin(BinaryOp::Mul, rotated, sin)?;
        let mut y = self.bin(BinaryOp::Add, a, bsin)?;
        if let Some(pass) = x_pass {
            y = self.op(Op::Concat { axis: 3 }, &[y, pass])?;
        }
        self.reshape(y, &[0, 0, (h * d) as i64])
    }

    /// Full causal attention with GQA on `[batch, seq, heads*head_dim]`.
    fn attention(
        &mut self,
        who: &str,
        q: Value,
        k: Value,
        v: Value,
        a: &AttentionAttrs,
    ) -> Result<Value> {
        let (h, kv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
        if matches!(a.pattern, AttentionPattern::ShiftedSparse { .. }) && h % 2 != 0 {
            return Err(Error::invalid(format!(
                "node '{who}' (Attention): shifted sparse attention splits the heads in halves, but there are {h} (odd)"
            )));
        }
        if kv == 0 || h % kv != 0 {
            return Err(Error::invalid(format!(
                "node '{who}' (Attention): {h} heads cannot be grouped over {kv} kv heads"
            )));
        }
        let n_rep = (h / kv) as i64;
        let dtype = self.dtype_of(q);
        let split_heads = |b: &mut Self, x: Value, heads: usize| -> Result<Value> {
            let x4 = b.reshape(x, &[0, 0, heads as i64, d as i64])?;
            b.transpose(x4, &[0, 2, 1, 3])
        };
        let q4 = split_heads(self, q, h)?;
        let mut k4 = split_heads(self, k, kv)?;
        let mut v4 = split_heads(self, v, kv)?;
        if n_rep > 1 {
            // transformers' repeat_kv: [b, kv, s, d] → [b, kv, n_rep, s, d] → [b, h, s, d].
            for t in [&mut k4, &mut v4] {
                let u = self.unsqueeze(*t, &[2])?;
                let shape = self.ints(&[1, 1, n_rep, 1, 1])?;
                let e = self.op(Op::Expand, &[u, shape])?;
                *t = self.reshape(e, &[0, h as i64, -1, d as i64])?;
            }
        }
        let kt = self.transpose(k4, &[0, 1, 3, 2])?;
        let qk = self.op(Op::MatMul, &[q4, kt])?;
        let scale = self.floats(dtype, vec![], vec![a.scale])?;
        let mut scores = self.bin(BinaryOp::Mul, qk, scale)?;
        if dtype != DType::F32 {
            scores = self.op(Op::Cast { to: DType::F32 }, &[scores])?;
        }
        // Causal mask from the run-time length: -inf above the diagonal.
        let s = self.seq_len(q)?;
        let idx = self.arange(s)?;
        let ninf = self.floats(DType::F32, vec![], vec![f32::NEG_INFINITY])?;
        let zero = self.floats(DType::F32, vec![], vec![0.0])?;
        let mask = match &a.pattern {
            AttentionPattern::FullCausal => {
                let rows = self.unsqueeze(idx, &[1])?;
                let cols = self.unsqueeze(idx, &[0])?;
                let future = self.bin(BinaryOp::Greater, cols, rows)?;
                self.op(Op::Where, &[future, ninf, zero])?
            }
            AttentionPattern::ShiftedSparse { group, wrap } => {
                let allowed = self.shifted_sparse_allowed(s, idx, *group, *wrap, h)?;
                self.op(Op::Where, &[allowed, zero, ninf])?
            }
        };
        let masked = self.bin(BinaryOp::Add, scores, mask)?;
        let mut probs = self.op(Op::Softmax { axis: -1 }, &[masked])?;
        if dtype != DType::F32 {
            probs = self.op(Op::Cast { to: dtype }, &[probs])?;
        }
        let o = self.op(Op::MatMul, &[probs, v4])?;
        let o = self.transpose(o, &[0, 2, 1, 3])?;
        self.reshape(o, &[0, 0, (h * d) as i64])
    }

    /// The group size G as an int64 scalar from the run-time length `len`,
    /// rounded as `GroupSize::tokens` (half away from zero, at least 1):
    /// x = len·fraction in f64, G = floor(x) + (x − floor(x) ≥ 0.5).
    fn group_tokens(&mut self, len: Value, group: GroupSize) -> Result<Value> {
        match group {
            GroupSize::Tokens(n) => self.scalar_i64(n.max(1) as i64),
            GroupSize::Fraction(f) => {
                let len_f = self.cast(len, DType::F64)?;
                let fc = self.constant(Tensor {
                    dtype: DType::F64,
                    shape: vec![],
                    data: TensorData::F64(vec![f]),
                })?;
                let x = self.bin(BinaryOp::Mul, len_f, fc)?;
                let fl = self.op(Op::Unary(UnaryOp::Floor), &[x])?;
                let frac = self.bin(BinaryOp::Sub, x, fl)?;
                let half = self.constant(Tensor {
                    dtype: DType::F64,
                    shape: vec![],
                    data: TensorData::F64(vec![0.5]),
                })?;
                let up = self.bin(BinaryOp::GreaterOrEqual, frac, half)?;
                let up = self.op(Op::Cast { to: DType::F64 }, &[up])?;
                let r = self.bin(BinaryOp::Add, fl, up)?;
                let gi = self.op(Op::Cast { to: DType::I64 }, &[r])?;
                let one = self.scalar_i64(1)?;
                self.op(Op::Variadic(VariadicOp::Max), &[gi, one])
            }
        }
    }

    /// `[heads, L, L]` bool: may query i see key j under S²-Attn. The first
    /// half of the heads: j ≤ i within groups [0,G), [G,2G), …; the second
    /// half: within [0,G/2), [G/2,3G/2), … — or, with `wrap`, in the
    /// rolled order p = (i − G/2) mod L: p(j) ≤ p(i) within G-groups of p.
    fn shifted_sparse_allowed(
        &mut self,
        len: Value,
        idx: Value,
        group: GroupSize,
        wrap: bool,
        heads: usize,
    ) -> Result<Value> {
        let g = self.group_tokens(len, group)?;
        let two = self.scalar_i64(2)?;
        let shift = self.bin(BinaryOp::Div, g, two)?;
        // Causal within the groups `key(pos) = (pos + offset) / G`.
        let grouped_causal = |b: &mut Self, pos: Value, offset: Option<Value>| -> Result<Value> {
            let rows = b.unsqueeze(pos, &[1])?;
            let cols = b.unsqueeze(pos, &[0])?;
            let causal = b.bin(BinaryOp::LessOrEqual, cols, rows)?;
            let (r, c) = match offset {
                Some(o) => (
                    b.bin(BinaryOp::Add, rows, o)?,
                    b.bin(BinaryOp::Add, cols, o)?,
                ),
                None => (rows, cols),
            };
            let gr = b.bin(BinaryOp::Div, r, g)?;
            let gc = b.bin(BinaryOp::Div, c, g)?;
            let same = b.bin(BinaryOp::Equal, gr, gc)?;
            b.bin(BinaryOp::And, causal, same)
        };
        let unshifted = grouped_causal(self, idx, None)?;
        let shifted = if wrap {
            let back = self.bin(BinaryOp::Sub, idx, shift)?;
            let around = self.bin(BinaryOp::Add, back, len)?;
            let early = self.bin(BinaryOp::Less, idx, shift)?;
            let rolled = self.op(Op::Where, &[early, around, back])?;
            grouped_causal(self, rolled, None)?
        } else {
            // [0,G/2) is group 0, [G/2, 3G/2) group 1, …: offset G − G/2.
            let offset = self.bin(BinaryOp::Sub, g, shift)?;
            grouped_causal(self, idx, Some(offset))?
        };
        // Per head: (second half ∧ shifted) ∨ (first half ∧ unshifted);
        // And/Or rather than Where, which onnxruntime lacks for bool.
        let second: Vec<bool> = (0..heads).map(|hh| hh >= heads / 2).collect();
        let first: Vec<bool> = second.iter().map(|&x| !x).collect();
        let second = self.constant(Tensor::bool(vec![heads, 1, 1], second))?;
        let first = self.constant(Tensor::bool(vec![heads, 1, 1], first))?;
        let a = self.bin(BinaryOp::And, second, shifted)?;
        let b = self.bin(BinaryOp::And, first, unshifted)?;
        self.bin(BinaryOp::Or, a, b)
    }
}
