//! `autodiff`: turns a forward LLaMA graph into a training step. It adds the
//! input `labels`, scores `logits` against them with `CrossEntropy`, and
//! appends the reverse-mode backward pass; the graph's outputs become `loss`
//! followed by one `grad:<weight>` per trainable weight, in store order
//! (nothing else is an output, so the executor frees `logits` and every
//! activation at its last use in the backward).
//!
//! ```text
//! before:  %0 = Input : i64[batch,seq]                                 (input_ids)
//!          %3 = LoraLinear{rank=8, alpha=16}(%2, @q_proj.weight, @q_proj.lora_A.weight, @q_proj.lora_B.weight)
//!          %7 = Attention{…}(%4, %5, %6)
//!          …   output logits
//! after:   %1 = Input : i64[batch,seq]                                 (labels)
//!          %7:2 = AttentionFwd{…}(%4, %5, %6)                          (out, lse)
//!          %40 = CrossEntropy{ignore_index=-100}(%logits, %1)          output loss
//!          %41 = CrossEntropyGrad{ignore_index=-100}(%logits, %1, 1.0)
//!          …
//!          %60:3 = AttentionGrad{…}(%4, %5, %6, %7.0, %7.1, %59)
//!          …
//!          %70 = LinearGradWeight(%2, %69)                             output grad:…lora_A.weight
//! ```
//!
//! Each forward op has a rule (the `*_rule` functions below) that says what
//! it reads from the forward and how it computes each input's gradient.
//! Gradients flow only where a trainable weight lies upstream, so a frozen
//! model part costs nothing in the backward; fan-out gradients are summed
//! in a fixed order (reverse topological order of their consumers). Forward
//! `Attention` nodes on the gradient path become `AttentionFwd`, whose
//! log-sum-exp output the backward reuses.
//!
//! LLaMA-level ops (Embedding, RmsNorm, Rope, Attention, Linear, LoraLinear,
//! SwiGlu) are covered, and the ONNX primitives a small hand-built graph
//! needs (Add, Sub, Mul, Div with broadcasting, Neg, MatMul, Reshape,
//! Transpose, Identity, float Cast). Anything else on the gradient path is an
//! error that names the node (run `raise` first on ONNX imports).

use super::{Pass, Report};
use crate::ir::{
    AttentionAttrs, BinaryOp, DType, Dim, Graph, LoraAttrs, NodeIndex, Op, Output, ReduceOp,
    Tensor, TensorData, TensorType, UnaryOp, Value,
};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};

/// Options of the `autodiff` pass.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AutodiffOptions {
    /// Labels equal to this are not scored (Hugging Face's -100).
    pub ignore_index: i64,
}

impl Default for AutodiffOptions {
    fn default() -> Self {
        AutodiffOptions { ignore_index: -100 }
    }
}

/// What `autodiff` produced: the name of the loss output and, for each
/// trainable weight (store order), the graph output holding its gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct GradInfo {
    pub loss: String,
    /// (weight name, graph output name).
    pub grads: Vec<(String, String)>,
}

/// The graph output name of a weight's gradient.
pub fn grad_output_name(weight: &str) -> String {
    format!("grad:{weight}")
}

/// The pass as the pipeline runs it.
pub struct Autodiff {
    options: AutodiffOptions,
}

impl Autodiff {
    pub fn new(options: AutodiffOptions) -> Self {
        Autodiff { options }
    }
}

impl Pass for Autodiff {
    fn needs_llama_level(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "autodiff"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let before = graph.g.node_count();
        let info = autodiff(graph, &self.options)?;
        Ok(Report {
            matched: info.grads.len(),
            notes: vec![format!(
                "outputs: {} and {} gradients; backward nodes: {}",
                info.loss,
                info.grads.len(),
                graph.g.node_count().saturating_sub(before)
            )],
            ..Default::default()
        })
    }
}

/// Differentiates the forward graph in place (see the module doc).
pub fn autodiff(graph: &mut Graph, opts: &AutodiffOptions) -> Result<GradInfo> {
    let fail = |m: String| Error::invalid(format!("autodiff: {m}"));
    let logits = graph
        .outputs
        .iter()
        .find(|(n, _)| n == "logits")
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            fail("the graph has no output 'logits'; autodiff needs a forward LLaMA graph (hf::load, or raise on an ONNX import)".into())
        })?;
    let ids_ty = graph
        .inputs
        .iter()
        .map(|&i| &graph.node(i).outputs[0])
        .find(|o| o.name == "input_ids")
        .map(|o| o.ty.clone())
        .ok_or_else(|| fail("the graph has no input 'input_ids'".into()))?;
    if graph
        .inputs
        .iter()
        .any(|&i| graph.node(i).outputs[0].name == "labels")
    {
        return Err(fail(
            "the graph already has an input 'labels'; was autodiff run twice?".into(),
        ));
    }
    let trainable: Vec<String> = graph
        .weights
        .iter()
        .filter(|w| w.trainable)
        .map(|w| w.name.clone())
        .collect();
    if trainable.is_empty() {
        return Err(fail(
            "no weight is trainable; run the lora and/or trainable passes first".into(),
        ));
    }
    let trainable_set: HashSet<&str> = trainable.iter().map(String::as_str).collect();

    // Which values carry a gradient: those with a trainable weight upstream.
    let order = graph.topo_order()?;
    let mut needs: HashSet<Value> = HashSet::new();
    for &n in &order {
        let node = graph.node(n);
        let on_path = match &node.op {
            Op::Weight { name } => trainable_set.contains(name.as_str()),
            _ => graph
                .inputs_of(n)
                .iter()
                .flatten()
                .any(|v| needs.contains(v)),
        };
        if on_path {
            for slot in 0..node.outputs.len() {
                needs.insert(Value::new(n, slot));
            }
        }
    }

    // Attention on the gradient path keeps its log-sum-exp for the backward.
    let mut logits = logits;
    for &n in &order {
        let Op::Attention(attrs) = &graph.node(n).op else {
            continue;
        };
        if !needs.contains(&Value::new(n, 0)) {
            continue;
        }
        let attrs = attrs.clone();
        let old = graph.node(n).clone();
        let ins = graph.inputs_of(n);
        let fwd = graph.add_node(
            old.name.clone(),
            Op::AttentionFwd(attrs),
            &ins,
            vec![
                old.outputs[0].clone(),
                Output {
                    name: format!("{}.lse", old.name),
                    ty: None, // inferred: [batch, heads, seq] in q's dtype
                },
            ],
        )?;
        let (old_v, new_v) = (Value::new(n, 0), Value::new(fwd, 0));
        graph.replace_uses(old_v, new_v);
        if logits == old_v {
            logits = new_v;
        }
        graph.g.remove_node(n);
        needs.remove(&old_v);
        needs.insert(new_v);
        needs.insert(Value::new(fwd, 1));
    }
    if !needs.contains(&logits) {
        return Err(fail(
            "no trainable weight lies upstream of 'logits', so nothing has a gradient".into(),
        ));
    }

    // Loss and its gradient.
    let labels = graph.add_input(
        "labels",
        ids_ty.unwrap_or_else(|| TensorType::unranked(DType::I64)),
    );
    let loss_ty = graph.value_type(logits).map(|t| {
        TensorType::fixed(
            if t.dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            },
            &[],
        )
    });
    let ignore_index = opts.ignore_index;
    let loss = graph.add(
        "loss",
        Op::CrossEntropy { ignore_index },
        &[logits, labels],
        loss_ty,
    )?;
    let one = constant(graph, "loss.grad_seed", Tensor::scalar_f32(1.0))?;
    let dlogits = graph.add(
        "loss.grad",
        Op::CrossEntropyGrad { ignore_index },
        &[logits, labels, one],
        graph.value_type(logits).cloned(),
    )?;

    let mut cx = Backward {
        graph,
        needs,
        grads: HashMap::new(),
        weight_grads: HashMap::new(),
    };
    cx.contribute(logits, dlogits);
    let order = cx.graph.topo_order()?;
    for &n in order.iter().rev() {
        if n == loss.node || n == dlogits.node || n == one.node {
            continue;
        }
        cx.node_rule(n)?;
    }

    // Outputs: the loss, then one gradient per trainable weight.
    let Backward {
        graph,
        mut weight_grads,
        ..
    } = cx;
    graph.outputs.clear();
    graph.outputs.push(("loss".into(), loss));
    let mut grads = Vec::with_capacity(trainable.len());
    for name in &trainable {
        let parts = weight_grads.remove(name).unwrap_or_default();
        if parts.is_empty() {
            return Err(fail(format!(
                "weight '{name}' is trainable but the loss does not depend on it; freeze it (trainable pass patterns) or drop it"
            )));
        }
        let w = graph
            .weights
            .get(name)
            .expect("trainable names come from the store");
        let ty = Some(TensorType::fixed(w.dtype, &w.shape));
        let g = sum(graph, &format!("{name}.grad_sum"), &parts, ty)?;
        let out = grad_output_name(name);
        graph.outputs.push((out.clone(), g));
        grads.push((name.clone(), out));
    }
    graph.remove_dead();
    Ok(GradInfo {
        loss: "loss".into(),
        grads,
    })
}

fn constant(graph: &mut Graph, name: &str, value: Tensor) -> Result<Value> {
    let ty = Some(TensorType::fixed(value.dtype, &value.shape));
    graph.add(name, Op::Constant { value }, &[], ty)
}

/// Adds up gradient contributions left to right (a fixed order).
fn sum(graph: &mut Graph, name: &str, parts: &[Value], ty: Option<TensorType>) -> Result<Value> {
    let mut acc = parts[0];
    for (i, &p) in parts.iter().enumerate().skip(1) {
        acc = graph.add(
            format!("{name}{i}"),
            Op::Binary(BinaryOp::Add),
            &[acc, p],
            ty.clone(),
        )?;
    }
    Ok(acc)
}

/// State of the reverse sweep.
struct Backward<'g> {
    graph: &'g mut Graph,
    /// Forward values with a trainable weight upstream.
    needs: HashSet<Value>,
    /// Gradient contributions per forward value, in the order they were made.
    grads: HashMap<Value, Vec<Value>>,
    /// Gradient contributions per trainable weight name (a weight may be read
    /// by several Weight nodes, e.g. tied embeddings).
    weight_grads: HashMap<String, Vec<Value>>,
}

/// The inputs of a forward node, with their types and whether they carry a
/// gradient.
struct Fwd {
    node: NodeIndex,
    name: String,
    ins: Vec<Option<Value>>,
}

impl Fwd {
    fn input(&self, i: usize) -> Result<Value> {
        self.ins.get(i).copied().flatten().ok_or_else(|| {
            Error::invalid(format!(
                "autodiff: node '{}': input {i} is not connected",
                self.name
            ))
        })
    }
}

impl Backward<'_> {
    fn contribute(&mut self, v: Value, g: Value) {
        self.grads.entry(v).or_default().push(g);
    }

    fn needs(&self, v: Option<Value>) -> bool {
        v.is_some_and(|v| self.needs.contains(&v))
    }

    fn ty(&self, v: Value) -> Option<TensorType> {
        self.graph.value_type(v).cloned()
    }

    fn add(
        &mut self,
        name: String,
        op: Op,
        ins: &[Value],
        ty: Option<TensorType>,
    ) -> Result<Value> {
        self.graph.add(name, op, ins, ty)
    }

    /// Adds a multi-output backward node; returns its output values.
    fn add_multi(
        &mut self,
        name: String,
        op: Op,
        ins: &[Value],
        tys: Vec<Option<TensorType>>,
    ) -> Result<Vec<Value>> {
        let outputs = tys
            .into_iter()
            .enumerate()
            .map(|(i, ty)| Output {
                name: format!("{name}.{i}"),
                ty,
            })
            .collect();
        let ins: Vec<Option<Value>> = ins.iter().copied().map(Some).collect();
        let n = self.graph.add_node(name, op, &ins, outputs)?;
        Ok((0..self.graph.node(n).outputs.len())
            .map(|s| Value::new(n, s))
            .collect())
    }

    /// The summed gradient of output `slot` of `n`, if any reached it.
    fn output_grad(&mut self, n: NodeIndex, slot: usize, name: &str) -> Result<Option<Value>> {
        let v = Value::new(n, slot);
        let Some(parts) = self.grads.remove(&v) else {
            return Ok(None);
        };
        let ty = self.ty(v);
        Ok(Some(sum(
            self.graph,
            &format!("{name}.grad_sum"),
            &parts,
            ty,
        )?))
    }

    /// Applies the rule of forward node `n` to the gradient of its output.
    fn node_rule(&mut self, n: NodeIndex) -> Result<()> {
        let node = self.graph.node(n);
        let op = node.op.clone();
        let name = self.graph.display_name(n);
        if let Op::Weight { name: w } = &op {
            if let Some(g) = self.output_grad(n, 0, w)? {
                self.weight_grads.entry(w.clone()).or_default().push(g);
            }
            return Ok(());
        }
        if matches!(op, Op::Input | Op::Constant { .. }) {
            return Ok(());
        }
        let Some(dy) = self.output_grad(n, 0, &name)? else {
            return Ok(());
        };
        let fwd = Fwd {
            node: n,
            name,
            ins: self.graph.inputs_of(n),
        };
        match &op {
            Op::Embedding => self.embedding_rule(&fwd, dy),
            Op::RmsNorm { eps } => self.rms_norm_rule(&fwd, dy, *eps),
            Op::Rope(attrs) => {
                let x = fwd.input(0)?;
                let mut ins = vec![dy];
                ins.extend(fwd.ins.get(1).copied().flatten());
                let dx = self.add(format!("{}.grad", fwd.name), Op::RopeGrad(attrs.clone()), &ins, self.ty(x))?;
                self.contribute(x, dx);
                Ok(())
            }
            Op::AttentionFwd(attrs) => self.attention_rule(&fwd, dy, attrs),
            Op::SwiGlu => self.swiglu_rule(&fwd, dy),
            Op::Linear => self.linear_rule(&fwd, dy),
            Op::LoraLinear(attrs) => self.lora_linear_rule(&fwd, dy, attrs),
            Op::Binary(b @ (BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div)) => {
                self.binary_rule(&fwd, dy, *b)
            }
            Op::Unary(UnaryOp::Neg) => {
                let x = fwd.input(0)?;
                let dx = self.add(format!("{}.grad", fwd.name), Op::Unary(UnaryOp::Neg), &[dy], self.ty(x))?;
                self.contribute(x, dx);
                Ok(())
            }
            Op::Identity => {
                let x = fwd.input(0)?;
                self.contribute(x, dy);
                Ok(())
            }
            Op::Cast { to } => self.cast_rule(&fwd, dy, *to),
            Op::Reshape { .. } => {
                let x = fwd.input(0)?;
                let shape = self.add(format!("{}.grad_shape", fwd.name), Op::Shape { start: None, end: None }, &[x], None)?;
                let dx = self.add(format!("{}.grad", fwd.name), Op::Reshape { allowzero: false }, &[dy, shape], self.ty(x))?;
                self.contribute(x, dx);
                Ok(())
            }
            Op::Transpose { perm } => {
                let x = fwd.input(0)?;
                let inverse = perm.as_ref().map(|p| {
                    let mut inv = vec![0i64; p.len()];
                    for (i, &a) in p.iter().enumerate() {
                        if let Some(slot) = inv.get_mut(a.rem_euclid(p.len() as i64) as usize) {
                            *slot = i as i64;
                        }
                    }
                    inv
                });
                let dx = self.add(format!("{}.grad", fwd.name), Op::Transpose { perm: inverse }, &[dy], self.ty(x))?;
                self.contribute(x, dx);
                Ok(())
            }
            Op::MatMul => self.matmul_rule(&fwd, dy),
            // Handled above: no gradient flows past the graph's boundary.
            Op::Input | Op::Weight { .. } | Op::Constant { .. } => Ok(()),
            // No rule: every op is listed, so that a new op does not compile
            // until it has a rule or is named here.
            other @ (Op::Unary(
                UnaryOp::Sqrt
                | UnaryOp::Reciprocal
                | UnaryOp::Exp
                | UnaryOp::Log
                | UnaryOp::Tanh
                | UnaryOp::Sigmoid
                | UnaryOp::Cos
                | UnaryOp::Sin
                | UnaryOp::Erf
                | UnaryOp::Abs
                | UnaryOp::Relu
                | UnaryOp::Floor
                | UnaryOp::Ceil
                | UnaryOp::Not,
            )
            | Op::Binary(
                BinaryOp::Pow
                | BinaryOp::Equal
                | BinaryOp::Less
                | BinaryOp::LessOrEqual
                | BinaryOp::Greater
                | BinaryOp::GreaterOrEqual
                | BinaryOp::And
                | BinaryOp::Or,
            )
            | Op::Variadic(_)
            | Op::Where
            | Op::Gemm { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::Reduce { .. }
            | Op::Trilu { .. }
            | Op::CumSum { .. }
            | Op::Concat { .. }
            | Op::Slice
            | Op::Gather { .. }
            | Op::GatherNd { .. }
            | Op::Unsqueeze { .. }
            | Op::Squeeze { .. }
            | Op::Expand
            | Op::Range
            | Op::Shape { .. }
            | Op::Size
            | Op::ConstantOfShape { .. }
            | Op::Split { .. }
            | crate::onnx_transformer_ops!()
            | Op::Attention(_)
            | Op::CrossEntropy { .. }
            | Op::CrossEntropyGrad { .. }
            | Op::AttentionGrad(_)
            | Op::RmsNormGrad { .. }
            | Op::RopeGrad(_)
            | Op::SwiGluGrad
            | Op::EmbeddingGrad
            | Op::LinearGradWeight) => Err(Error::invalid(format!(
                "autodiff: node '{}' ({}) lies on the gradient path but autodiff has no rule for it; \
                 run the raise pass first so that the model is made of LLaMA-level ops",
                fwd.name,
                other.name()
            ))),
            // Fusions come after autodiff, never before.
            other @ crate::fused_ops!() => Err(Error::invalid(format!(
                "autodiff: node '{}' ({}) is a fusion; run `fuse` after autodiff, not before",
                fwd.name,
                other.name()
            ))),
        }
    }

    /// Embedding reads the ids; the table gets `EmbeddingGrad` (ids never
    /// have a gradient).
    fn embedding_rule(&mut self, f: &Fwd, dy: Value) -> Result<()> {
        let (w, ids) = (f.input(0)?, f.input(1)?);
        if self.needs(Some(w)) {
            let dw = self.add(
                format!("{}.grad_weight", f.name),
                Op::EmbeddingGrad,
                &[w, ids, dy],
                self.ty(w),
            )?;
            self.contribute(w, dw);
        }
        Ok(())
    }

    /// RmsNorm reads x and the weight; one `RmsNormGrad` gives both.
    fn rms_norm_rule(&mut self, f: &Fwd, dy: Value, eps: f32) -> Result<()> {
        let (x, w) = (f.input(0)?, f.input(1)?);
        let outs = self.add_multi(
            format!("{}.grad", f.name),
            Op::RmsNormGrad { eps },
            &[x, w, dy],
            vec![self.ty(x), self.ty(w)],
        )?;
        if self.needs(Some(x)) {
            self.contribute(x, outs[0]);
        }
        if self.needs(Some(w)) {
            self.contribute(w, outs[1]);
        }
        Ok(())
    }

    /// Attention reads q, k, v, its output and log-sum-exp.
    fn attention_rule(&mut self, f: &Fwd, dy: Value, attrs: &AttentionAttrs) -> Result<()> {
        let (q, k, v) = (f.input(0)?, f.input(1)?, f.input(2)?);
        let (out, lse) = (Value::new(f.node, 0), Value::new(f.node, 1));
        let outs = self.add_multi(
            format!("{}.grad", f.name),
            Op::AttentionGrad(attrs.clone()),
            &[q, k, v, out, lse, dy],
            vec![self.ty(q), self.ty(k), self.ty(v)],
        )?;
        for (x, g) in [q, k, v].into_iter().zip(outs) {
            if self.needs(Some(x)) {
                self.contribute(x, g);
            }
        }
        Ok(())
    }

    /// SwiGlu reads gate and up.
    fn swiglu_rule(&mut self, f: &Fwd, dy: Value) -> Result<()> {
        let (g, u) = (f.input(0)?, f.input(1)?);
        let outs = self.add_multi(
            format!("{}.grad", f.name),
            Op::SwiGluGrad,
            &[g, u, dy],
            vec![self.ty(g), self.ty(u)],
        )?;
        if self.needs(Some(g)) {
            self.contribute(g, outs[0]);
        }
        if self.needs(Some(u)) {
            self.contribute(u, outs[1]);
        }
        Ok(())
    }

    /// The bias gradient: dy summed over every axis but the last.
    fn bias_grad(&mut self, f: &Fwd, dy: Value, bias: Value) -> Result<()> {
        let rank = self
            .ty(dy)
            .and_then(|t| t.rank())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "autodiff: node '{}': the rank of its output is unknown, so its bias gradient cannot be reduced",
                    f.name
                ))
            })?;
        let axes = (0..rank.saturating_sub(1) as i64).collect();
        let db = self.add(
            format!("{}.grad_bias", f.name),
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: Some(axes),
                keepdims: false,
                noop_with_empty_axes: false,
            },
            &[dy],
            self.ty(bias),
        )?;
        self.contribute(bias, db);
        Ok(())
    }

    /// Linear reads x and W: `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ dy`.
    fn linear_rule(&mut self, f: &Fwd, dy: Value) -> Result<()> {
        let (x, w) = (f.input(0)?, f.input(1)?);
        if self.needs(Some(x)) {
            let dx = self.add(
                format!("{}.grad_input", f.name),
                Op::MatMul,
                &[dy, w],
                self.ty(x),
            )?;
            self.contribute(x, dx);
        }
        if self.needs(Some(w)) {
            let dw = self.add(
                format!("{}.grad_weight", f.name),
                Op::LinearGradWeight,
                &[x, dy],
                self.ty(w),
            )?;
            self.contribute(w, dw);
        }
        if let Some(b) = f.ins.get(2).copied().flatten() {
            if self.needs(Some(b)) {
                self.bias_grad(f, dy, b)?;
            }
        }
        Ok(())
    }

    /// LoraLinear reads x, W, A, B. With `s` the scale and `g = s·dy·B`:
    /// `dA = gᵀ·x`, `dB = s·dyᵀ·(x·Aᵀ)`, `dx = dy·W + g·A`, `dW = dyᵀ·x`.
    fn lora_linear_rule(&mut self, f: &Fwd, dy: Value, attrs: &LoraAttrs) -> Result<()> {
        if attrs.dropout > 0.0 {
            return Err(Error::invalid(format!(
                "autodiff: node '{}' (LoraLinear) has LoRA dropout {}, which training does not support yet; \
                 set the lora pass's dropout to 0",
                f.name, attrs.dropout
            )));
        }
        let (x, w, a, b) = (f.input(0)?, f.input(1)?, f.input(2)?, f.input(3)?);
        let (need_x, need_w, need_a, need_b) = (
            self.needs(Some(x)),
            self.needs(Some(w)),
            self.needs(Some(a)),
            self.needs(Some(b)),
        );
        // The scale as a constant of A's compute type.
        let scale_dtype = match self.ty(a).map(|t| t.dtype) {
            Some(DType::F64) => DType::F64,
            _ => DType::F32,
        };
        let s = attrs.scale();
        let scale = Tensor {
            dtype: scale_dtype,
            shape: vec![],
            data: if scale_dtype == DType::F64 {
                TensorData::F64(vec![s as f64])
            } else {
                TensorData::F32(vec![s])
            },
        };
        let mut g = None;
        if need_x || need_a {
            let s = constant(self.graph, &format!("{}.lora_scale", f.name), scale.clone())?;
            let db_ = self.add(
                format!("{}.grad_lora_mid", f.name),
                Op::MatMul,
                &[dy, b],
                None,
            )?;
            g = Some(self.add(
                format!("{}.grad_lora", f.name),
                Op::Binary(BinaryOp::Mul),
                &[db_, s],
                None,
            )?);
        }
        if need_a {
            let g = g.expect("made above");
            let da = self.add(
                format!("{}.grad_lora_A", f.name),
                Op::LinearGradWeight,
                &[x, g],
                self.ty(a),
            )?;
            self.contribute(a, da);
        }
        if need_b {
            let s = constant(self.graph, &format!("{}.lora_scale_B", f.name), scale)?;
            let u = self.add(format!("{}.lora_down", f.name), Op::Linear, &[x, a], None)?;
            let raw = self.add(
                format!("{}.grad_lora_B_unscaled", f.name),
                Op::LinearGradWeight,
                &[u, dy],
                None,
            )?;
            let db = self.add(
                format!("{}.grad_lora_B", f.name),
                Op::Binary(BinaryOp::Mul),
                &[raw, s],
                self.ty(b),
            )?;
            self.contribute(b, db);
        }
        if need_x {
            let g = g.expect("made above");
            let base = self.add(
                format!("{}.grad_input_base", f.name),
                Op::MatMul,
                &[dy, w],
                self.ty(x),
            )?;
            let lora = self.add(
                format!("{}.grad_input_lora", f.name),
                Op::MatMul,
                &[g, a],
                self.ty(x),
            )?;
            let dx = self.add(
                format!("{}.grad_input", f.name),
                Op::Binary(BinaryOp::Add),
                &[base, lora],
                self.ty(x),
            )?;
            self.contribute(x, dx);
        }
        if need_w {
            let dw = self.add(
                format!("{}.grad_weight", f.name),
                Op::LinearGradWeight,
                &[x, dy],
                self.ty(w),
            )?;
            self.contribute(w, dw);
        }
        if let Some(bias) = f.ins.get(4).copied().flatten() {
            if self.needs(Some(bias)) {
                self.bias_grad(f, dy, bias)?;
            }
        }
        Ok(())
    }

    /// A float-to-float Cast sends the gradient back through the inverse cast.
    fn cast_rule(&mut self, f: &Fwd, dy: Value, to: DType) -> Result<()> {
        let x = f.input(0)?;
        let from = self.ty(x).map(|t| t.dtype);
        match from {
            Some(d) if d == to => self.contribute(x, dy),
            Some(d) if d.is_float() && to.is_float() => {
                let dx = self.add(format!("{}.grad", f.name), Op::Cast { to: d }, &[dy], self.ty(x))?;
                self.contribute(x, dx);
            }
            _ => {
                return Err(Error::invalid(format!(
                    "autodiff: node '{}' (Cast to {to}): only casts between float types of known input type carry a gradient",
                    f.name
                )))
            }
        }
        Ok(())
    }

    /// The shape of a value, or an error saying autodiff needs it.
    fn shape_of(&self, f: &Fwd, v: Value, what: &str) -> Result<Vec<Dim>> {
        self.ty(v).and_then(|t| t.shape).ok_or_else(|| {
            Error::invalid(format!(
                "autodiff: node '{}' ({}): the shape of its {what} is unknown, so broadcasting cannot be undone",
                f.name,
                self.graph.node(f.node).op.name()
            ))
        })
    }

    /// Sums a gradient of shape `from` down to the (broadcast) shape of
    /// forward value `to`: over the leading axes `to` lacks and the axes
    /// where `to` has size 1.
    fn reduce_to(
        &mut self,
        name: String,
        g: Value,
        from: &[Dim],
        to: Value,
        to_shape: &[Dim],
    ) -> Result<Value> {
        if from == to_shape {
            return Ok(g);
        }
        let lead = from.len().saturating_sub(to_shape.len());
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        let mut inner = false;
        for (i, d) in to_shape.iter().enumerate() {
            if *d == Dim::Fixed(1) && from.get(lead + i) != Some(&Dim::Fixed(1)) {
                axes.push((lead + i) as i64);
                inner = true;
            }
        }
        if axes.is_empty() {
            return Ok(g);
        }
        let ty = self.ty(to);
        let reduced = self.add(
            if inner {
                format!("{name}_sum")
            } else {
                name.clone()
            },
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: Some(axes),
                keepdims: inner,
                noop_with_empty_axes: false,
            },
            &[g],
            if inner { None } else { ty.clone() },
        )?;
        if !inner {
            return Ok(reduced);
        }
        let shape = self.add(
            format!("{name}_shape"),
            Op::Shape {
                start: None,
                end: None,
            },
            &[to],
            None,
        )?;
        self.add(
            name,
            Op::Reshape { allowzero: false },
            &[reduced, shape],
            ty,
        )
    }

    /// Add, Sub, Mul, Div with numpy broadcasting.
    fn binary_rule(&mut self, f: &Fwd, dy: Value, op: BinaryOp) -> Result<()> {
        let (a, b) = (f.input(0)?, f.input(1)?);
        let out = Value::new(f.node, 0);
        let out_shape = self.shape_of(f, out, "output")?;
        let mul = |cx: &mut Self, name: String, x: Value, y: Value| {
            cx.add(name, Op::Binary(BinaryOp::Mul), &[x, y], None)
        };
        for (port, x) in [(0usize, a), (1, b)] {
            if !self.needs(Some(x)) {
                continue;
            }
            let side = if port == 0 { "lhs" } else { "rhs" };
            let name = format!("{}.grad_{side}", f.name);
            let full = match (op, port) {
                (BinaryOp::Add, _) | (BinaryOp::Sub, 0) => dy,
                (BinaryOp::Sub, _) => {
                    self.add(format!("{name}_neg"), Op::Unary(UnaryOp::Neg), &[dy], None)?
                }
                (BinaryOp::Mul, 0) => mul(self, format!("{name}_full"), dy, b)?,
                (BinaryOp::Mul, _) => mul(self, format!("{name}_full"), dy, a)?,
                (BinaryOp::Div, 0) => self.add(
                    format!("{name}_full"),
                    Op::Binary(BinaryOp::Div),
                    &[dy, b],
                    None,
                )?,
                // d(a/b)/db = −(a/b)/b
                (_, _) => {
                    let t = mul(self, format!("{name}_prod"), dy, out)?;
                    let t = self.add(
                        format!("{name}_quot"),
                        Op::Binary(BinaryOp::Div),
                        &[t, b],
                        None,
                    )?;
                    self.add(format!("{name}_full"), Op::Unary(UnaryOp::Neg), &[t], None)?
                }
            };
            let x_shape = self.shape_of(f, x, side)?;
            let dx = self.reduce_to(name, full, &out_shape, x, &x_shape)?;
            self.contribute(x, dx);
        }
        Ok(())
    }

    /// MatMul `[.., m, k]·[.., k, n]`: `dA = dy·Bᵀ`, `dB = Aᵀ·dy`, each summed
    /// over the batch axes its operand was broadcast along. Both operands
    /// must be at least 2-D with known ranks.
    fn matmul_rule(&mut self, f: &Fwd, dy: Value) -> Result<()> {
        let (a, b) = (f.input(0)?, f.input(1)?);
        let out_shape = self.shape_of(f, Value::new(f.node, 0), "output")?;
        let a_shape = self.shape_of(f, a, "lhs")?;
        let b_shape = self.shape_of(f, b, "rhs")?;
        if a_shape.len() < 2 || b_shape.len() < 2 {
            return Err(Error::invalid(format!(
                "autodiff: node '{}' (MatMul): 1-D operands are not supported; reshape them to 2-D",
                f.name
            )));
        }
        let swap = |rank: usize| -> Op {
            let mut perm: Vec<i64> = (0..rank as i64).collect();
            perm.swap(rank - 2, rank - 1);
            Op::Transpose { perm: Some(perm) }
        };
        let batch = &out_shape[..out_shape.len() - 2];
        if self.needs(Some(a)) {
            let bt = self.add(
                format!("{}.grad_lhs_bt", f.name),
                swap(b_shape.len()),
                &[b],
                None,
            )?;
            let full = self.add(
                format!("{}.grad_lhs_full", f.name),
                Op::MatMul,
                &[dy, bt],
                None,
            )?;
            let mut from = batch.to_vec();
            from.extend_from_slice(&a_shape[a_shape.len() - 2..]);
            let da = self.reduce_to(format!("{}.grad_lhs", f.name), full, &from, a, &a_shape)?;
            self.contribute(a, da);
        }
        if self.needs(Some(b)) {
            let at = self.add(
                format!("{}.grad_rhs_at", f.name),
                swap(a_shape.len()),
                &[a],
                None,
            )?;
            let full = self.add(
                format!("{}.grad_rhs_full", f.name),
                Op::MatMul,
                &[at, dy],
                None,
            )?;
            let mut from = batch.to_vec();
            from.extend_from_slice(&b_shape[b_shape.len() - 2..]);
            let db = self.reduce_to(format!("{}.grad_rhs", f.name), full, &from, b, &b_shape)?;
            self.contribute(b, db);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
