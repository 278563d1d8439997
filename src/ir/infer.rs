//! Type inference: the output types of every op from its input types and
//! attributes, with symbolic dimensions (`batch`, `seq`, and expressions over
//! them such as `batch*seq` or `seq/4`).
//!
//! Shape arithmetic in ONNX graphs runs on small integer tensors (`Shape` →
//! `Gather` → `Concat` → `Reshape`), so inference also follows the *values*
//! of rank-0 and rank-1 integer tensors symbolically: `Shape` of a
//! `[batch, seq, 64]` value is the list `[batch, seq, 64]`, and a `Reshape`
//! to `Concat(Gather(that, 0), -1, 16)` gets the type `[batch, 4*seq, 16]`.
//!
//! [`infer_graph`] fills every output of a graph, [`node_types`] one node
//! (what `Graph::add_node` calls), and [`check`] re-infers and compares, for
//! `verify`. A shape that does not fit an op is an error naming the node,
//! the op and the shapes.

use super::{
    AttentionAttrs, BinaryOp, DType, Dim, DimExpr, Graph, Node, NodeIndex, Op, Tensor, TensorData,
    TensorType, Value,
};
use crate::{Error, Result};
use std::collections::HashMap;

/// The elements of a small integer tensor, when known: each an expression
/// (numbers may be negative here: `-1` in a `Reshape` target) or `None`.
type SymVal = Vec<Option<DimExpr>>;

/// Integer tensors longer than this are not followed element by element.
const MAX_SYM_LEN: usize = 64;

/// How far back `node_types` walks producers to find a shape value.
const MAX_SYM_DEPTH: usize = 48;

/// Symbolic values computed so far, by value.
#[derive(Default)]
struct Memo {
    vals: HashMap<Value, Option<SymVal>>,
}

/// Infers the type of every output of every node, in topological order,
/// and stores it. A recorded type (an importer's `value_info`) and the
/// inferred one must agree in dtype, rank and fixed sizes; per dim the
/// inferred one wins where it is known (so symbol names follow the graph
/// inputs), the recorded one fills what inference cannot know.
pub fn infer_graph(graph: &mut Graph) -> Result<()> {
    let order = graph.topo_order()?;
    let mut memo = Memo::default();
    for n in order {
        let inferred = infer_with(graph, n, &mut memo, 0)?;
        let node = &graph.g[n];
        let mut merged = Vec::with_capacity(inferred.len());
        for (slot, t) in inferred.into_iter().enumerate() {
            let recorded = node.outputs.get(slot).and_then(|o| o.ty.as_ref());
            merged.push(merge(graph, n, slot, recorded, t)?);
        }
        let node = &mut graph.g[n];
        for (o, t) in node.outputs.iter_mut().zip(merged) {
            o.ty = t;
        }
    }
    Ok(())
}

/// The types of node `n`'s outputs from its inputs' recorded types, merged
/// with the types the node already records. What `Graph::add_node` uses.
pub fn node_types(graph: &Graph, n: NodeIndex) -> Result<Vec<Option<TensorType>>> {
    let inferred = infer_with(graph, n, &mut Memo::default(), 0)?;
    let node = &graph.g[n];
    inferred
        .into_iter()
        .enumerate()
        .map(|(slot, t)| {
            let recorded = node.outputs.get(slot).and_then(|o| o.ty.as_ref());
            merge(graph, n, slot, recorded, t)
        })
        .collect()
}

/// Re-infers every node from its inputs' recorded types and compares with
/// what it records: every dim inference knows must be recorded as that.
pub fn check(graph: &Graph) -> Result<()> {
    let order = graph.topo_order()?;
    let mut memo = Memo::default();
    for n in order {
        let inferred = infer_with(graph, n, &mut memo, 0)?;
        let node = &graph.g[n];
        for (slot, t) in inferred.iter().enumerate() {
            let recorded = node.outputs.get(slot).and_then(|o| o.ty.as_ref());
            let (Some(t), Some(r)) = (t, recorded) else {
                if t.is_some() {
                    return Err(type_error(
                        graph,
                        n,
                        format!(
                            "output {slot} has no type; inference gives {}",
                            t.as_ref().unwrap()
                        ),
                    ));
                }
                continue;
            };
            if !agrees(t, r) {
                return Err(type_error(
                    graph,
                    n,
                    format!("output {slot} is typed {r}, its inputs give {t}"),
                ));
            }
        }
    }
    Ok(())
}

/// Whether `recorded` says everything `inferred` knows.
fn agrees(inferred: &TensorType, recorded: &TensorType) -> bool {
    if inferred.dtype != recorded.dtype {
        return false;
    }
    match (&inferred.shape, &recorded.shape) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.is_unknown() || x == y)
        }
    }
}

fn type_error(graph: &Graph, n: NodeIndex, msg: String) -> Error {
    Error::Verify(format!(
        "node '{}' ({}): {msg}",
        graph.display_name(n),
        graph.g[n].op.name()
    ))
}

fn merge(
    graph: &Graph,
    n: NodeIndex,
    slot: usize,
    recorded: Option<&TensorType>,
    inferred: Option<TensorType>,
) -> Result<Option<TensorType>> {
    let (r, t) = match (recorded, inferred) {
        (None, t) => return Ok(t),
        (Some(r), None) => return Ok(Some(r.clone())),
        (Some(r), Some(t)) => (r, t),
    };
    let conflict = || {
        type_error(
            graph,
            n,
            format!("output {slot} is recorded as {r}, but its inputs give {t}"),
        )
    };
    if r.dtype != t.dtype {
        return Err(conflict());
    }
    let shape = match (&r.shape, &t.shape) {
        (None, s) | (s, None) => s.clone(),
        (Some(a), Some(b)) => {
            if a.len() != b.len() {
                return Err(conflict());
            }
            let mut dims = Vec::with_capacity(a.len());
            for (rd, td) in a.iter().zip(b) {
                dims.push(match (rd, td) {
                    (Dim::Fixed(x), Dim::Fixed(y)) if x != y => return Err(conflict()),
                    (rd, td) if td.is_unknown() => rd.clone(),
                    // A number recorded for a dim inferred symbolic: an
                    // export traced at one length; the symbol is the truth.
                    (_, td) => td.clone(),
                });
            }
            Some(dims)
        }
    };
    Ok(Some(TensorType {
        dtype: t.dtype,
        shape,
    }))
}

/// Infers node `n`, computing the symbolic values of shape inputs through
/// `memo` (walking producers up to `MAX_SYM_DEPTH` deep).
fn infer_with(
    graph: &Graph,
    n: NodeIndex,
    memo: &mut Memo,
    depth: usize,
) -> Result<Vec<Option<TensorType>>> {
    let node = &graph.g[n];
    let ins = graph.inputs_of(n);
    let tys: Vec<Option<TensorType>> = ins
        .iter()
        .map(|v| v.and_then(|v| graph.value_type(v).cloned()))
        .collect();
    let mut vals: Vec<Option<SymVal>> = Vec::with_capacity(ins.len());
    for v in &ins {
        vals.push(match v {
            Some(v) if wants_value(&node.op) => sym_value(graph, *v, memo, depth + 1),
            _ => None,
        });
    }
    let cx = Cx {
        graph,
        node,
        ins: &ins,
        tys: &tys,
        vals: &vals,
    };
    rule(&cx).map_err(|msg| type_error(graph, n, msg))
}

/// Ops whose output types depend on the values of their integer inputs.
fn wants_value(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Slice
            | Op::Unsqueeze { axes: None }
            | Op::Squeeze { axes: None }
            | Op::Expand
            | Op::Range
            | Op::ConstantOfShape { .. }
            | Op::Split { split: None, .. }
            | Op::Reduce { axes: None, .. }
            // Ops that pass values on, so a chain can be followed.
            | Op::Gather { .. }
            | Op::Concat { .. }
            | Op::Cast { .. }
            | Op::Identity
            | Op::Binary(_)
            | Op::Variadic(_)
            | Op::Where
    )
}

/// The symbolic value of `v`, when it is a small integer tensor whose
/// elements can be followed.
fn sym_value(graph: &Graph, v: Value, memo: &mut Memo, depth: usize) -> Option<SymVal> {
    if let Some(r) = memo.vals.get(&v) {
        return r.clone();
    }
    if depth > MAX_SYM_DEPTH {
        return None;
    }
    let r = compute_sym_value(graph, v, memo, depth);
    memo.vals.insert(v, r.clone());
    r
}

fn compute_sym_value(graph: &Graph, v: Value, memo: &mut Memo, depth: usize) -> Option<SymVal> {
    let node = graph.g.node_weight(v.node)?;
    let ty = node.outputs.get(v.slot)?.ty.as_ref();
    if let Some(t) = ty {
        if !t.dtype.is_int() && t.dtype != DType::Bool {
            return None;
        }
        if t.rank().is_some_and(|r| r > 1) {
            return None;
        }
    }
    let ins = graph.inputs_of(v.node);
    let arg = |i: usize, memo: &mut Memo| -> Option<SymVal> {
        sym_value(graph, ins.get(i).copied().flatten()?, memo, depth + 1)
    };
    let in_ty = |i: usize| -> Option<&TensorType> { graph.value_type(ins.get(i).copied()??) };
    let out = match &node.op {
        Op::Constant { value } => constant_value(value)?,
        Op::Weight { name } => {
            let w = graph.weights.get(name)?;
            if !(w.dtype.is_int() || w.dtype == DType::Bool)
                || w.numel() > MAX_SYM_LEN
                || w.shape.len() > 1
            {
                return None;
            }
            constant_value(&w.to_tensor().ok()?)?
        }
        Op::Shape { start, end } => {
            let dims = in_ty(0)?.dims()?;
            let (s, e) = shape_range(dims.len(), *start, *end);
            dims[s..e].iter().map(|d| d.expr()).collect()
        }
        Op::Size => {
            let dims = in_ty(0)?.dims()?;
            vec![Dim::product(dims).expr()]
        }
        Op::Identity | Op::Cast { .. } => arg(0, memo)?,
        Op::Unsqueeze { .. } | Op::Squeeze { .. } | Op::Reshape { .. } => arg(0, memo)?,
        Op::Concat { .. } => {
            let mut out = Vec::new();
            for i in 0..ins.len() {
                out.extend(arg(i, memo)?);
            }
            out
        }
        Op::Gather { axis } => {
            let data = arg(0, memo)?;
            let idx = arg(1, memo)?;
            if *axis != 0 && *axis != -1 {
                return None;
            }
            let mut out = Vec::with_capacity(idx.len());
            for i in idx {
                let i = i?.as_constant()?;
                let i = if i < 0 { i + data.len() as i64 } else { i };
                out.push(data.get(usize::try_from(i).ok()?)?.clone());
            }
            out
        }
        Op::Slice => {
            let data = arg(0, memo)?;
            let one = |x: Option<SymVal>| -> Option<i64> {
                match x?.as_slice() {
                    [Some(e)] => e.as_constant(),
                    _ => None,
                }
            };
            let start = one(arg(1, memo))?;
            let end = one(arg(2, memo))?;
            if ins.len() > 3 && ins[3].is_some() && one(arg(3, memo))? != 0 {
                return None;
            }
            let step = if ins.len() > 4 && ins[4].is_some() {
                one(arg(4, memo))?
            } else {
                1
            };
            let len = data.len() as i64;
            let (s, e) = slice_bounds(start, end, step, len)?;
            let mut out = Vec::new();
            let mut i = s;
            while (step > 0 && i < e) || (step < 0 && i > e) {
                out.push(data[i as usize].clone());
                i += step;
            }
            out
        }
        Op::Binary(b) => {
            let (x, y) = (arg(0, memo)?, arg(1, memo)?);
            let len = x.len().max(y.len());
            if (x.len() != len && x.len() != 1) || (y.len() != len && y.len() != 1) {
                return None;
            }
            let at = |v: &SymVal, i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
            (0..len)
                .map(|i| binary_value(*b, at(&x, i), at(&y, i)))
                .collect()
        }
        Op::Where => {
            let c = arg(0, memo)?;
            let (x, y) = (arg(1, memo)?, arg(2, memo)?);
            let len = c.len().max(x.len()).max(y.len());
            let at = |v: &SymVal, i: usize| v.get(if v.len() == 1 { 0 } else { i }).cloned();
            let mut out = Vec::with_capacity(len);
            for i in 0..len {
                out.push(match at(&c, i)??.as_constant()? {
                    0 => at(&y, i)?,
                    _ => at(&x, i)?,
                });
            }
            out
        }
        Op::Variadic(op) => {
            let mut acc = arg(0, memo)?;
            for i in 1..ins.len() {
                let y = arg(i, memo)?;
                if y.len() != acc.len() {
                    return None;
                }
                for (a, b) in acc.iter_mut().zip(y) {
                    *a = variadic_value(*op, a.take(), b);
                }
            }
            acc
        }
        Op::Range => {
            let one = |x: Option<SymVal>| match x?.as_slice() {
                [Some(e)] => e.as_constant(),
                _ => None,
            };
            let (s, l, d) = (one(arg(0, memo))?, one(arg(1, memo))?, one(arg(2, memo))?);
            if d == 0 {
                return None;
            }
            let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
            if n > MAX_SYM_LEN {
                return None;
            }
            (0..n as i64)
                .map(|i| Some(DimExpr::constant(s + i * d)))
                .collect()
        }
        Op::ConstantOfShape { value } => {
            let shape = arg(0, memo)?;
            let n = shape
                .iter()
                .map(|d| d.as_ref()?.as_constant())
                .try_fold(1i64, |a, d| a.checked_mul(d?))?;
            if !(0..=MAX_SYM_LEN as i64).contains(&n) || shape.len() > 1 {
                return None;
            }
            let fill = match value {
                Some(t) => constant_value(t)?
                    .first()
                    .cloned()
                    .flatten()?
                    .as_constant()?,
                None => 0,
            };
            vec![Some(DimExpr::constant(fill)); n as usize]
        }
        _ => return None,
    };
    (out.len() <= MAX_SYM_LEN).then_some(out)
}

fn constant_value(t: &Tensor) -> Option<SymVal> {
    if t.rank() > 1 || t.numel() > MAX_SYM_LEN {
        return None;
    }
    let ints: Vec<i64> = match &t.data {
        TensorData::I64(v) => v.clone(),
        TensorData::Bool(v) => v.iter().map(|&b| b as i64).collect(),
        _ if t.dtype.is_int() => t.to_i64_vec(),
        _ => return None,
    };
    Some(
        ints.into_iter()
            .map(|v| Some(DimExpr::constant(v)))
            .collect(),
    )
}

fn binary_value(op: BinaryOp, a: Option<DimExpr>, b: Option<DimExpr>) -> Option<DimExpr> {
    let (a, b) = (a?, b?);
    let cmp = |f: fn(i64, i64) -> bool| -> Option<DimExpr> {
        match (a.as_constant(), b.as_constant()) {
            (Some(x), Some(y)) => Some(DimExpr::constant(f(x, y) as i64)),
            // A dimension is never negative: `seq == -1` is false.
            (None, Some(y)) if y < 0 && matches!(op, BinaryOp::Equal) => Some(DimExpr::constant(0)),
            (Some(x), None) if x < 0 && matches!(op, BinaryOp::Equal) => Some(DimExpr::constant(0)),
            _ if a == b && matches!(op, BinaryOp::Equal) => Some(DimExpr::constant(1)),
            _ => None,
        }
    };
    match op {
        BinaryOp::Add => a.add(&b),
        BinaryOp::Sub => a.sub(&b),
        BinaryOp::Mul => a.mul(&b),
        BinaryOp::Div => match (a.as_constant(), b.as_constant()) {
            // ONNX integer Div truncates toward zero.
            (Some(x), Some(y)) if y != 0 => Some(DimExpr::constant(x / y)),
            _ => a.div_floor(&b),
        },
        BinaryOp::Equal => cmp(|x, y| x == y),
        BinaryOp::Less => cmp(|x, y| x < y),
        BinaryOp::LessOrEqual => cmp(|x, y| x <= y),
        BinaryOp::Greater => cmp(|x, y| x > y),
        BinaryOp::GreaterOrEqual => cmp(|x, y| x >= y),
        BinaryOp::And => cmp(|x, y| x != 0 && y != 0),
        BinaryOp::Or => cmp(|x, y| x != 0 || y != 0),
        BinaryOp::Pow => None,
    }
}

fn variadic_value(
    op: super::VariadicOp,
    a: Option<DimExpr>,
    b: Option<DimExpr>,
) -> Option<DimExpr> {
    let (a, b) = (a?, b?);
    match op {
        super::VariadicOp::Sum => a.add(&b),
        super::VariadicOp::Max | super::VariadicOp::Min => {
            if a == b {
                return Some(a);
            }
            let (x, y) = (a.as_constant()?, b.as_constant()?);
            Some(DimExpr::constant(if matches!(op, super::VariadicOp::Max) {
                x.max(y)
            } else {
                x.min(y)
            }))
        }
    }
}

/// ONNX `Shape`'s start/end, clamped.
fn shape_range(rank: usize, start: Option<i64>, end: Option<i64>) -> (usize, usize) {
    let r = rank as i64;
    let fix = |x: i64| if x < 0 { (x + r).clamp(0, r) } else { x.clamp(0, r) } as usize;
    let s = fix(start.unwrap_or(0));
    let e = fix(end.unwrap_or(r));
    (s, e.max(s))
}

/// ONNX `Slice` bounds on a known length, as the runtime computes them.
fn slice_bounds(start: i64, end: i64, step: i64, len: i64) -> Option<(i64, i64)> {
    if step == 0 {
        return None;
    }
    let fix = |x: i64| if x < 0 { x.saturating_add(len) } else { x };
    let (s, e) = (fix(start), fix(end));
    Some(if step > 0 {
        (s.clamp(0, len), e.clamp(0, len))
    } else {
        (s.clamp(-1, len - 1), e.clamp(-1, len - 1))
    })
}

/// What a rule sees of its node.
struct Cx<'a> {
    graph: &'a Graph,
    node: &'a Node,
    ins: &'a [Option<Value>],
    tys: &'a [Option<TensorType>],
    vals: &'a [Option<SymVal>],
}

type Out = std::result::Result<Vec<Option<TensorType>>, String>;

impl Cx<'_> {
    fn ty(&self, i: usize) -> Option<&TensorType> {
        self.tys.get(i).and_then(|t| t.as_ref())
    }

    fn dims(&self, i: usize) -> Option<&[Dim]> {
        self.ty(i)?.dims()
    }

    fn present(&self, i: usize) -> bool {
        self.ins.get(i).is_some_and(Option::is_some)
    }

    fn val(&self, i: usize) -> Option<&SymVal> {
        self.vals.get(i).and_then(|v| v.as_ref())
    }

    /// A constant integer list on input `i`.
    fn ints(&self, i: usize) -> Option<Vec<i64>> {
        self.val(i)?
            .iter()
            .map(|e| e.as_ref()?.as_constant())
            .collect()
    }
}

fn one(t: Option<TensorType>) -> Out {
    Ok(vec![t])
}

fn shaped(dtype: DType, dims: Option<Vec<Dim>>) -> TensorType {
    TensorType { dtype, shape: dims }
}

fn norm_axis(axis: i64, rank: usize) -> std::result::Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

fn show(d: &[Dim]) -> String {
    let parts: Vec<String> = d.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// Numpy broadcasting of two shapes. Two different symbolic dims broadcast
/// to an unknown one (either may be 1 at run time).
pub fn broadcast(a: &[Dim], b: &[Dim]) -> std::result::Result<Vec<Dim>, String> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let x = (i + a.len()).checked_sub(n).map(|j| &a[j]);
        let y = (i + b.len()).checked_sub(n).map(|j| &b[j]);
        out.push(match (x, y) {
            (Some(x), None) => x.clone(),
            (None, Some(y)) => y.clone(),
            (Some(x), Some(y)) => match (x, y) {
                _ if x == y => x.clone(),
                (Dim::Fixed(1), y) => y.clone(),
                (x, Dim::Fixed(1)) => x.clone(),
                (Dim::Fixed(p), Dim::Fixed(q)) => {
                    return Err(format!(
                        "shapes {} and {} do not broadcast ({p} vs {q})",
                        show(a),
                        show(b)
                    ))
                }
                (Dim::Fixed(_), _) => x.clone(),
                (_, Dim::Fixed(_)) => y.clone(),
                _ => Dim::unknown(),
            },
            (None, None) => unreachable!("i < max(len)"),
        });
    }
    Ok(out)
}

/// Broadcasts the shapes of every input in `idx` (unknown rank if any is).
fn broadcast_all(
    cx: &Cx,
    idx: impl IntoIterator<Item = usize>,
) -> std::result::Result<Option<Vec<Dim>>, String> {
    let mut acc: Option<Vec<Dim>> = Some(Vec::new());
    for i in idx {
        let Some(d) = cx.dims(i) else {
            return Ok(None);
        };
        acc = Some(broadcast(acc.as_deref().unwrap_or(&[]), d)?);
    }
    Ok(acc)
}

/// The dims of a `[batch, seq, width]` activation on input `i`, checked to be
/// rank 3.
fn act3<'a>(cx: &'a Cx, i: usize, what: &str) -> std::result::Result<Option<&'a [Dim]>, String> {
    match cx.dims(i) {
        Some(d) if d.len() != 3 => Err(format!(
            "{what} must be [batch, seq, width], got {}",
            show(d)
        )),
        d => Ok(d),
    }
}

/// Checks that dim `d` (of `what`) is `want` where both are fixed.
fn expect_dim(d: &Dim, want: u64, what: &str) -> std::result::Result<(), String> {
    match d.fixed() {
        Some(n) if n != want => Err(format!("{what} is {n}, must be {want}")),
        _ => Ok(()),
    }
}

fn attention_qkv(cx: &Cx, a: &AttentionAttrs) -> std::result::Result<(), String> {
    let (hq, hk) = (a.num_heads as u64, a.num_kv_heads as u64);
    let hd = a.head_dim as u64;
    for (i, name, heads) in [(0, "q", hq), (1, "k", hk), (2, "v", hk)] {
        if let Some(d) = act3(cx, i, name)? {
            expect_dim(&d[2], heads * hd, &format!("the width of {name}"))?;
        }
    }
    if let (Some(q), Some(k)) = (cx.dims(0), cx.dims(1)) {
        for (i, what) in [(0, "batch"), (1, "sequence")] {
            if let (Some(x), Some(y)) = (q[i].fixed(), k[i].fixed()) {
                if x != y {
                    return Err(format!(
                        "q and k differ in {what}: {} and {}",
                        show(q),
                        show(k)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The inference rule of every op; an exhaustive match, so a new op does not
/// compile until it has one.
fn rule(cx: &Cx) -> Out {
    let same = |i: usize| one(cx.ty(i).cloned());
    match &cx.node.op {
        Op::Input => one(cx.node.outputs[0].ty.clone()),
        Op::Weight { name } => {
            let w = cx
                .graph
                .weights
                .get(name)
                .ok_or_else(|| format!("weight '{name}' is not in the model"))?;
            one(Some(TensorType::fixed(w.dtype, &w.shape)))
        }
        Op::Constant { value } => one(Some(TensorType::fixed(value.dtype, &value.shape))),
        Op::Unary(_) | Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::Identity => same(0),
        Op::Trilu { .. } | Op::CumSum { .. } => same(0),
        Op::Binary(b) => {
            let Some(a) = cx.ty(0) else {
                return one(None);
            };
            let dims = broadcast_all(cx, [0, 1])?;
            let dtype = match b {
                BinaryOp::Equal
                | BinaryOp::Less
                | BinaryOp::LessOrEqual
                | BinaryOp::Greater
                | BinaryOp::GreaterOrEqual
                | BinaryOp::And
                | BinaryOp::Or => DType::Bool,
                _ => a.dtype,
            };
            one(Some(shaped(dtype, dims)))
        }
        Op::Variadic(_) => {
            let Some(a) = cx.ty(0) else {
                return one(None);
            };
            let dims = broadcast_all(cx, 0..cx.tys.len())?;
            one(Some(shaped(a.dtype, dims)))
        }
        Op::Where => {
            let Some(x) = cx.ty(1) else {
                return one(None);
            };
            let dims = broadcast_all(cx, [0, 1, 2])?;
            one(Some(shaped(x.dtype, dims)))
        }
        Op::Cast { to } => one(cx.ty(0).map(|t| shaped(*to, t.shape.clone()))),
        Op::MatMul => {
            let Some(a) = cx.ty(0) else {
                return one(None);
            };
            let (Some(x), Some(y)) = (cx.dims(0), cx.dims(1)) else {
                return one(Some(TensorType::unranked(a.dtype)));
            };
            one(Some(shaped(a.dtype, Some(matmul_dims(x, y)?))))
        }
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let Some(a) = cx.ty(0) else {
                return one(None);
            };
            let (Some(x), Some(y)) = (cx.dims(0), cx.dims(1)) else {
                return one(Some(shaped(a.dtype, Some(vec![Dim::unknown(); 2]))));
            };
            if x.len() != 2 || y.len() != 2 {
                return Err(format!(
                    "Gemm needs 2-D inputs, got {} and {}",
                    show(x),
                    show(y)
                ));
            }
            let (m, k1) = if *trans_a {
                (&x[1], &x[0])
            } else {
                (&x[0], &x[1])
            };
            let (k2, n) = if *trans_b {
                (&y[1], &y[0])
            } else {
                (&y[0], &y[1])
            };
            if let (Some(p), Some(q)) = (k1.fixed(), k2.fixed()) {
                if p != q {
                    return Err(format!(
                        "Gemm inner sizes differ: {} and {}",
                        show(x),
                        show(y)
                    ));
                }
            }
            one(Some(shaped(a.dtype, Some(vec![m.clone(), n.clone()]))))
        }
        Op::Reduce {
            axes,
            keepdims,
            noop_with_empty_axes,
            ..
        } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let Some(d) = t.dims() else {
                return one(Some(t.clone()));
            };
            let axes: Option<Vec<i64>> = match axes {
                Some(a) => Some(a.clone()),
                None if cx.present(1) => cx.ints(1),
                None => Some(Vec::new()),
            };
            let Some(axes) = axes else {
                return one(Some(if *keepdims {
                    shaped(t.dtype, Some(vec![Dim::unknown(); d.len()]))
                } else {
                    TensorType::unranked(t.dtype)
                }));
            };
            if axes.is_empty() && *noop_with_empty_axes {
                return one(Some(t.clone()));
            }
            let mut reduced = vec![axes.is_empty(); d.len()];
            for &a in &axes {
                reduced[norm_axis(a, d.len())?] = true;
            }
            let dims: Vec<Dim> = d
                .iter()
                .zip(&reduced)
                .filter_map(|(x, &r)| match (r, *keepdims) {
                    (false, _) => Some(x.clone()),
                    (true, true) => Some(Dim::Fixed(1)),
                    (true, false) => None,
                })
                .collect();
            one(Some(shaped(t.dtype, Some(dims))))
        }
        Op::Reshape { allowzero } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            one(Some(shaped(t.dtype, reshape_dims(cx, t, *allowzero)?)))
        }
        Op::Transpose { perm } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let Some(d) = t.dims() else {
                return one(Some(t.clone()));
            };
            let perm: Vec<usize> = match perm {
                Some(p) => {
                    if p.len() != d.len() {
                        return Err(format!("perm {p:?} does not fit a rank-{} input", d.len()));
                    }
                    p.iter()
                        .map(|&a| norm_axis(a, d.len()))
                        .collect::<std::result::Result<_, _>>()?
                }
                None => (0..d.len()).rev().collect(),
            };
            one(Some(shaped(
                t.dtype,
                Some(perm.iter().map(|&a| d[a].clone()).collect()),
            )))
        }
        Op::Concat { axis } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let mut acc: Option<Vec<Dim>> = None;
            for i in 0..cx.tys.len() {
                let Some(d) = cx.dims(i) else {
                    return one(Some(TensorType::unranked(t.dtype)));
                };
                acc = Some(match acc {
                    None => d.to_vec(),
                    Some(mut a) => {
                        if a.len() != d.len() {
                            return Err(format!(
                                "inputs have different ranks: {} and {}",
                                show(&a),
                                show(d)
                            ));
                        }
                        let ax = norm_axis(*axis, a.len())?;
                        for (j, (x, y)) in a.iter_mut().zip(d).enumerate() {
                            if j == ax {
                                *x = x.plus(y);
                            } else if let (Some(p), Some(q)) = (x.fixed(), y.fixed()) {
                                if p != q {
                                    return Err(format!(
                                        "inputs differ off the concat axis: {p} vs {q} in dim {j}"
                                    ));
                                }
                            } else if x.is_unknown() {
                                *x = y.clone();
                            }
                        }
                        a
                    }
                });
            }
            one(Some(shaped(t.dtype, acc)))
        }
        Op::Slice => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            one(Some(shaped(t.dtype, slice_dims(cx, t)?)))
        }
        Op::Gather { axis } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let (Some(d), Some(idx)) = (t.dims(), cx.dims(1)) else {
                return one(Some(TensorType::unranked(t.dtype)));
            };
            let ax = norm_axis(*axis, d.len())?;
            let mut dims = d[..ax].to_vec();
            dims.extend(idx.iter().cloned());
            dims.extend(d[ax + 1..].iter().cloned());
            one(Some(shaped(t.dtype, Some(dims))))
        }
        Op::GatherNd { batch_dims } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let (Some(d), Some(idx)) = (t.dims(), cx.dims(1)) else {
                return one(Some(TensorType::unranked(t.dtype)));
            };
            let b = usize::try_from(*batch_dims).map_err(|_| "negative batch_dims".to_string())?;
            let Some(last) = idx.last().and_then(|l| l.fixed()) else {
                return one(Some(TensorType::unranked(t.dtype)));
            };
            let last = last as usize;
            if b + last > d.len() {
                return Err(format!(
                    "indices {} index past the data's rank {}",
                    show(idx),
                    d.len()
                ));
            }
            let mut dims = idx[..idx.len() - 1].to_vec();
            dims.extend(d[b + last..].iter().cloned());
            one(Some(shaped(t.dtype, Some(dims))))
        }
        Op::Unsqueeze { axes } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let axes = match axes {
                Some(a) => Some(a.clone()),
                None => cx.ints(1),
            };
            let (Some(d), Some(axes)) = (t.dims(), axes) else {
                return one(Some(TensorType::unranked(t.dtype)));
            };
            let r = d.len() + axes.len();
            let mut ins = vec![false; r];
            for &a in &axes {
                let a = norm_axis(a, r)?;
                if ins[a] {
                    return Err(format!("axes {axes:?} repeat an axis"));
                }
                ins[a] = true;
            }
            let mut it = d.iter();
            let dims = ins
                .iter()
                .map(|&i| {
                    if i {
                        Dim::Fixed(1)
                    } else {
                        it.next().cloned().unwrap_or_else(Dim::unknown)
                    }
                })
                .collect();
            one(Some(shaped(t.dtype, Some(dims))))
        }
        Op::Squeeze { axes } => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let Some(d) = t.dims() else {
                return one(Some(t.clone()));
            };
            let axes = match axes {
                Some(a) => Some(a.clone()),
                None if cx.present(1) => cx.ints(1),
                None => {
                    // Every 1: known only when no dim is symbolic.
                    if d.iter().any(|x| x.fixed().is_none()) {
                        return one(Some(TensorType::unranked(t.dtype)));
                    }
                    Some(
                        (0..d.len() as i64)
                            .filter(|&i| d[i as usize] == Dim::Fixed(1))
                            .collect(),
                    )
                }
            };
            let Some(axes) = axes else {
                return one(Some(TensorType::unranked(t.dtype)));
            };
            let mut drop = vec![false; d.len()];
            for &a in &axes {
                let a = norm_axis(a, d.len())?;
                expect_dim(&d[a], 1, &format!("squeezed dim {a}"))?;
                drop[a] = true;
            }
            let dims = d
                .iter()
                .zip(&drop)
                .filter(|(_, &x)| !x)
                .map(|(x, _)| x.clone())
                .collect();
            one(Some(shaped(t.dtype, Some(dims))))
        }
        Op::Expand => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let target: Option<Vec<Dim>> = cx.val(1).map(|v| {
                v.iter()
                    .map(|e| match e {
                        Some(e) => Dim::from_expr(e.clone()),
                        None => Dim::unknown(),
                    })
                    .collect()
            });
            let (Some(d), Some(target)) = (t.dims(), target) else {
                let rank = cx.dims(1).and_then(|s| s.first()?.fixed());
                return one(Some(match (t.dims(), rank) {
                    (Some(d), Some(r)) => shaped(
                        t.dtype,
                        Some(vec![Dim::unknown(); (r as usize).max(d.len())]),
                    ),
                    _ => TensorType::unranked(t.dtype),
                }));
            };
            // A target dim of 1 keeps the input's (bidirectional broadcast).
            one(Some(shaped(t.dtype, Some(broadcast(d, &target)?))))
        }
        Op::Range => {
            let Some(t) = cx.ty(0) else {
                return one(None);
            };
            let len = match (cx.val(0), cx.val(1), cx.val(2)) {
                (Some(s), Some(l), Some(d)) => match (s.as_slice(), l.as_slice(), d.as_slice()) {
                    ([Some(s)], [Some(l)], [Some(d)]) => range_len(s, l, d),
                    _ => Dim::unknown(),
                },
                _ => Dim::unknown(),
            };
            one(Some(shaped(t.dtype, Some(vec![len]))))
        }
        Op::Shape { start, end } => {
            let n = cx
                .dims(0)
                .map(|d| {
                    let (s, e) = shape_range(d.len(), *start, *end);
                    Dim::Fixed((e - s) as u64)
                })
                .unwrap_or_else(Dim::unknown);
            one(Some(TensorType::new(DType::I64, vec![n])))
        }
        Op::Size => one(Some(TensorType::new(DType::I64, vec![]))),
        Op::ConstantOfShape { value } => {
            let dtype = value.as_ref().map(|v| v.dtype).unwrap_or(DType::F32);
            let dims = match cx.val(0) {
                Some(v) => Some(
                    v.iter()
                        .map(|e| e.clone().map(Dim::from_expr).unwrap_or_else(Dim::unknown))
                        .collect(),
                ),
                None => cx
                    .dims(0)
                    .and_then(|s| s.first()?.fixed())
                    .map(|r| vec![Dim::unknown(); r as usize]),
            };
            one(Some(shaped(dtype, dims)))
        }
        Op::Split {
            axis,
            split,
            num_outputs,
        } => {
            let Some(t) = cx.ty(0) else {
                return Ok(vec![None; *num_outputs]);
            };
            let Some(d) = t.dims() else {
                return Ok(vec![Some(t.clone()); *num_outputs]);
            };
            let ax = norm_axis(*axis, d.len())?;
            let sizes: Vec<Dim> = match split {
                Some(s) => s.iter().map(|&x| Dim::Fixed(x.max(0) as u64)).collect(),
                None if cx.present(1) => match cx.ints(1) {
                    Some(s) => s.iter().map(|&x| Dim::Fixed(x.max(0) as u64)).collect(),
                    None => vec![Dim::unknown(); *num_outputs],
                },
                None => {
                    // Equal parts, the last smaller (opset 18).
                    let k = Dim::Fixed(*num_outputs as u64);
                    let part = d[ax]
                        .plus(&Dim::Fixed(*num_outputs as u64 - 1))
                        .div_floor(&k);
                    let mut s = vec![part.clone(); num_outputs.saturating_sub(1)];
                    s.push(d[ax].minus(&part.times(&Dim::Fixed(*num_outputs as u64 - 1))));
                    s
                }
            };
            if sizes.len() != *num_outputs {
                return Err(format!(
                    "split sizes {} do not match {num_outputs} outputs",
                    show(&sizes)
                ));
            }
            if let (Some(total), true) = (d[ax].fixed(), sizes.iter().all(|s| s.fixed().is_some()))
            {
                let sum: u64 = sizes.iter().filter_map(|s| s.fixed()).sum();
                if sum != total {
                    return Err(format!(
                        "split sizes {} add up to {sum}, the axis is {total}",
                        show(&sizes)
                    ));
                }
            }
            Ok(sizes
                .into_iter()
                .map(|s| {
                    let mut dims = d.to_vec();
                    dims[ax] = s;
                    Some(shaped(t.dtype, Some(dims)))
                })
                .collect())
        }
        Op::RmsNormalization { .. } | Op::RotaryEmbedding { .. } => same(0),
        Op::OnnxAttention(a) => onnx_attention(cx, a),
        Op::Embedding => {
            let Some(w) = cx.ty(0) else {
                return one(None);
            };
            let wd = w.dims().ok_or("the embedding weight's shape is unknown")?;
            if wd.len() != 2 {
                return Err(format!(
                    "the weight is {}, must be [vocab, hidden]",
                    show(wd)
                ));
            }
            let dims = cx.dims(1).map(|ids| {
                let mut d = ids.to_vec();
                d.push(wd[1].clone());
                d
            });
            // LLaMA-level ops compute in f32 (f64 stays f64) whatever the
            // weights' storage dtype.
            one(Some(shaped(w.dtype.compute(), dims)))
        }
        Op::RmsNorm { .. } => {
            let (Some(x), Some(w)) = (cx.ty(0), cx.ty(1)) else {
                return one(None);
            };
            if let (Some(xd), Some(wd)) = (x.dims(), w.dims()) {
                if wd.len() != 1 {
                    return Err(format!("the weight is {}, must be rank 1", show(wd)));
                }
                if let (Some(a), Some(b)) = (xd.last().and_then(|d| d.fixed()), wd[0].fixed()) {
                    if a != b {
                        return Err(format!(
                            "input {} and weight {} differ in width",
                            show(xd),
                            show(wd)
                        ));
                    }
                }
            }
            one(Some(shaped(x.dtype.promote(w.dtype), x.shape.clone())))
        }
        Op::Rope(r) | Op::RopeGrad(r) => {
            if let Some(d) = act3(cx, 0, "the input")? {
                expect_dim(
                    &d[2],
                    (r.num_heads * r.head_dim) as u64,
                    "the input's width",
                )?;
            }
            same(0)
        }
        Op::Attention(a) => {
            attention_qkv(cx, a)?;
            same(0)
        }
        Op::AttentionFwd(a) => {
            attention_qkv(cx, a)?;
            let lse = cx.ty(0).map(|q| {
                let d = q
                    .dims()
                    .map(|d| vec![d[0].clone(), Dim::Fixed(a.num_heads as u64), d[1].clone()]);
                shaped(q.dtype, d)
            });
            Ok(vec![cx.ty(0).cloned(), lse])
        }
        Op::AttentionGrad(a) => {
            attention_qkv(cx, a)?;
            Ok(vec![
                cx.ty(0).cloned(),
                cx.ty(1).cloned(),
                cx.ty(2).cloned(),
            ])
        }
        Op::Linear | Op::LoraLinear(_) => {
            let (Some(x), Some(w)) = (cx.ty(0), cx.ty(1)) else {
                return one(None);
            };
            let wd = w.dims().ok_or("the weight's shape is unknown")?;
            if wd.len() != 2 {
                return Err(format!("the weight is {}, must be [out, in]", show(wd)));
            }
            let Some(xd) = x.dims() else {
                return one(Some(TensorType::unranked(x.dtype.promote(w.dtype))));
            };
            let last = xd.last().ok_or("the input is a scalar")?;
            if let (Some(a), Some(b)) = (last.fixed(), wd[1].fixed()) {
                if a != b {
                    return Err(format!(
                        "input {} does not match weight {} (in features)",
                        show(xd),
                        show(wd)
                    ));
                }
            }
            if let Op::LoraLinear(l) = &cx.node.op {
                if let (Some(ad), Some(bd)) = (cx.dims(2), cx.dims(3)) {
                    let r = l.rank as u64;
                    let ok = ad.len() == 2
                        && bd.len() == 2
                        && ad[0].fixed().is_none_or(|x| x == r)
                        && bd[1].fixed().is_none_or(|x| x == r)
                        && ad[1] == wd[1]
                        && bd[0] == wd[0];
                    if !ok {
                        return Err(format!(
                            "lora_A {} and lora_B {} do not fit weight {} at rank {r}",
                            show(ad),
                            show(bd),
                            show(wd)
                        ));
                    }
                }
            }
            let mut dims = xd.to_vec();
            *dims.last_mut().expect("rank checked") = wd[0].clone();
            one(Some(shaped(x.dtype.promote(w.dtype), Some(dims))))
        }
        Op::Fused(e) => {
            e.check()?;
            let dtype = e.dtype().ok_or("the expression has no steps")?;
            if (0..cx.tys.len()).any(|i| cx.ty(i).is_none()) {
                return one(None);
            }
            for i in 0..cx.tys.len() {
                let d = cx.ty(i).map(|t| t.dtype);
                if d.is_some_and(|d| !d.is_float()) {
                    return Err(format!(
                        "input {i} is {}; fused inputs are float",
                        d.unwrap_or(DType::F32)
                    ));
                }
            }
            let dims = broadcast_all(cx, 0..cx.tys.len())?;
            one(Some(shaped(dtype, dims)))
        }
        Op::MergedLinear(m) => {
            let (Some(x), Some(w)) = (cx.ty(0), cx.ty(1)) else {
                return Ok(vec![None; m.parts.len()]);
            };
            let wd = w.dims().ok_or("the merged weight's shape is unknown")?;
            if wd.len() != 2 {
                return Err(format!(
                    "the merged weight is {}, must be [out, in]",
                    show(wd)
                ));
            }
            if let Some(o) = wd[0].fixed() {
                if o != m.total_out() as u64 {
                    return Err(format!(
                        "the merged weight {} has {o} rows, its parts {} in all",
                        show(wd),
                        m.total_out()
                    ));
                }
            }
            let dtype = x.dtype.promote(w.dtype);
            let Some(xd) = x.dims() else {
                return Ok(vec![Some(TensorType::unranked(dtype)); m.parts.len()]);
            };
            let last = xd.last().ok_or("the input is a scalar")?;
            if let (Some(a), Some(b)) = (last.fixed(), wd[1].fixed()) {
                if a != b {
                    return Err(format!(
                        "input {} does not match the merged weight {} (in features)",
                        show(xd),
                        show(wd)
                    ));
                }
            }
            let mut outs = Vec::with_capacity(m.parts.len());
            for (i, (part, ports)) in m.parts.iter().zip(m.lora_ports()).enumerate() {
                if let (Some(l), Some((pa, pb))) = (&part.lora, ports) {
                    if let (Some(ad), Some(bd)) = (cx.dims(pa), cx.dims(pb)) {
                        let r = l.rank as u64;
                        let ok = ad.len() == 2
                            && bd.len() == 2
                            && ad[0].fixed().is_none_or(|x| x == r)
                            && bd[1].fixed().is_none_or(|x| x == r)
                            && ad[1] == wd[1]
                            && bd[0].fixed().is_none_or(|x| x == part.out_features as u64);
                        if !ok {
                            return Err(format!(
                                "part {i}: lora_A {} and lora_B {} do not fit [{}, {}] at rank {r}",
                                show(ad),
                                show(bd),
                                part.out_features,
                                wd[1]
                            ));
                        }
                    }
                }
                let mut dims = xd.to_vec();
                *dims.last_mut().expect("rank checked") = Dim::Fixed(part.out_features as u64);
                outs.push(Some(shaped(dtype, Some(dims))));
            }
            Ok(outs)
        }
        Op::SwiGlu => {
            let (Some(g), Some(u)) = (cx.ty(0), cx.ty(1)) else {
                return one(None);
            };
            let dims = broadcast_all(cx, [0, 1])?;
            if let (Some(gd), Some(d)) = (g.dims(), &dims) {
                if gd != d.as_slice() && !d.iter().any(|x| x.is_unknown()) {
                    return Err(format!(
                        "gate {} and up {} differ",
                        show(gd),
                        show(u.dims().unwrap_or(&[]))
                    ));
                }
            }
            one(Some(shaped(g.dtype.promote(u.dtype), g.shape.clone())))
        }
        Op::CrossEntropy { .. } => {
            let Some(l) = cx.ty(0) else {
                return one(None);
            };
            if let Some(d) = cx.dims(0) {
                if d.len() != 3 {
                    return Err(format!(
                        "logits must be [batch, seq, vocab], got {}",
                        show(d)
                    ));
                }
            }
            one(Some(TensorType::new(l.dtype.compute(), vec![])))
        }
        Op::CrossEntropyGrad { .. } => same(0),
        Op::RmsNormGrad { .. } => Ok(vec![cx.ty(0).cloned(), cx.ty(1).cloned()]),
        Op::SwiGluGrad => Ok(vec![cx.ty(0).cloned(), cx.ty(1).cloned()]),
        Op::EmbeddingGrad => same(0),
        Op::LinearGradWeight => {
            let (Some(x), Some(dy)) = (cx.ty(0), cx.ty(1)) else {
                return one(None);
            };
            let dtype = if x.dtype == dy.dtype {
                x.dtype
            } else {
                x.dtype.compute()
            };
            let dims = match (x.dims(), dy.dims()) {
                (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => {
                    Some(vec![b[b.len() - 1].clone(), a[a.len() - 1].clone()])
                }
                _ => Some(vec![Dim::unknown(); 2]),
            };
            one(Some(shaped(dtype, dims)))
        }
    }
}

fn range_len(s: &DimExpr, l: &DimExpr, d: &DimExpr) -> Dim {
    let Some(step) = d.as_constant() else {
        return Dim::unknown();
    };
    if step <= 0 {
        if let (Some(a), Some(b)) = (s.as_constant(), l.as_constant()) {
            if step < 0 {
                let n = ((a - b) as f64 / (-step) as f64).ceil().max(0.0);
                return Dim::Fixed(n as u64);
            }
        }
        return Dim::unknown();
    }
    // ceil((l - s) / step) = floor((l - s + step - 1) / step)
    let Some(span) = l.sub(s) else {
        return Dim::unknown();
    };
    match span
        .add(&DimExpr::constant(step - 1))
        .and_then(|x| x.div_floor(&DimExpr::constant(step)))
    {
        Some(e) => Dim::from_expr(e),
        None => Dim::unknown(),
    }
}

fn matmul_dims(a: &[Dim], b: &[Dim]) -> std::result::Result<Vec<Dim>, String> {
    if a.is_empty() || b.is_empty() {
        return Err("MatMul does not take scalars".into());
    }
    let (a2, pa) = if a.len() == 1 {
        (vec![Dim::Fixed(1), a[0].clone()], true)
    } else {
        (a.to_vec(), false)
    };
    let (b2, pb) = if b.len() == 1 {
        (vec![b[0].clone(), Dim::Fixed(1)], true)
    } else {
        (b.to_vec(), false)
    };
    let (m, k1) = (&a2[a2.len() - 2], &a2[a2.len() - 1]);
    let (k2, n) = (&b2[b2.len() - 2], &b2[b2.len() - 1]);
    if let (Some(x), Some(y)) = (k1.fixed(), k2.fixed()) {
        if x != y {
            return Err(format!(
                "inner sizes differ: {} and {} ({x} vs {y})",
                show(a),
                show(b)
            ));
        }
    }
    let mut dims = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if !pa {
        dims.push(m.clone());
    }
    if !pb {
        dims.push(n.clone());
    }
    Ok(dims)
}

fn reshape_dims(
    cx: &Cx,
    t: &TensorType,
    allowzero: bool,
) -> std::result::Result<Option<Vec<Dim>>, String> {
    let Some(target) = cx.val(1) else {
        // Unknown values, known count: the rank at least.
        return Ok(cx
            .dims(1)
            .and_then(|s| s.first()?.fixed())
            .map(|r| vec![Dim::unknown(); r as usize]));
    };
    let input = t.dims();
    let mut dims = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, e) in target.iter().enumerate() {
        let c = e.as_ref().and_then(|e| e.as_constant());
        dims.push(match c {
            Some(-1) => {
                if infer_at.replace(i).is_some() {
                    return Err("the target shape has more than one -1".into());
                }
                Dim::unknown()
            }
            Some(0) if !allowzero => match input.and_then(|d| d.get(i)) {
                Some(d) => d.clone(),
                None if input.is_some() => {
                    return Err(format!(
                        "target dim {i} copies an input dim that does not exist"
                    ))
                }
                None => Dim::unknown(),
            },
            Some(c) if c < 0 => return Err(format!("the target shape has a negative dim {c}")),
            _ => e.clone().map(Dim::from_expr).unwrap_or_else(Dim::unknown),
        });
    }
    if let Some(at) = infer_at {
        if let Some(input) = input {
            let total = Dim::product(input);
            let rest = Dim::product(
                dims.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != at)
                    .map(|(_, d)| d),
            );
            dims[at] = total.div_floor(&rest);
        }
    } else if let Some(input) = input {
        if let (Some(a), Some(b)) = (Dim::product(input).fixed(), Dim::product(&dims).fixed()) {
            if a != b {
                return Err(format!(
                    "cannot reshape {} ({a} elements) to {} ({b})",
                    show(input),
                    show(&dims)
                ));
            }
        }
    }
    Ok(Some(dims))
}

fn slice_dims(cx: &Cx, t: &TensorType) -> std::result::Result<Option<Vec<Dim>>, String> {
    let Some(d) = t.dims() else {
        return Ok(None);
    };
    let (Some(starts), Some(ends)) = (cx.val(1), cx.val(2)) else {
        return Ok(Some(vec![Dim::unknown(); d.len()]));
    };
    let axes: Vec<i64> = if cx.present(3) {
        match cx.ints(3) {
            Some(a) => a,
            None => return Ok(Some(vec![Dim::unknown(); d.len()])),
        }
    } else {
        (0..starts.len() as i64).collect()
    };
    let steps: Vec<i64> = if cx.present(4) {
        match cx.ints(4) {
            Some(s) => s,
            None => return Ok(Some(vec![Dim::unknown(); d.len()])),
        }
    } else {
        vec![1; starts.len()]
    };
    if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    let mut dims = d.to_vec();
    for (j, &a) in axes.iter().enumerate() {
        let ax = norm_axis(a, d.len())?;
        dims[ax] = slice_len(&d[ax], starts[j].as_ref(), ends[j].as_ref(), steps[j])?;
    }
    Ok(Some(dims))
}

/// The length of one sliced axis. With a known length the runtime's clamping
/// applies exactly; on a symbolic one, a whole-axis slice, a slice from a
/// fixed offset to the end (`seq-1`), and a slice to a symbolic end (`[:seq]`
/// of a longer table; the runtime checks it is in range) are followed.
fn slice_len(
    dim: &Dim,
    start: Option<&DimExpr>,
    end: Option<&DimExpr>,
    step: i64,
) -> std::result::Result<Dim, String> {
    if step == 0 {
        return Err("a slice step is 0".into());
    }
    let (Some(start), Some(end)) = (start, end) else {
        return Ok(Dim::unknown());
    };
    let (s, e) = (start.as_constant(), end.as_constant());
    if let (Some(n), Some(s), Some(e)) = (dim.fixed(), s, e) {
        let (b0, b1) = slice_bounds(s, e, step, n as i64).expect("step is nonzero");
        let len = if step > 0 {
            ((b1 - b0).max(0) + step - 1) / step
        } else {
            ((b0 - b1).max(0) + (-step) - 1) / (-step)
        };
        return Ok(Dim::Fixed(len as u64));
    }
    const BIG: i64 = 1 << 40;
    let Some(len) = dim.expr() else {
        return Ok(Dim::unknown());
    };
    if step == 1 {
        let from = match s {
            Some(s) if s >= 0 => DimExpr::constant(s),
            Some(s) if s > -BIG => match len.add(&DimExpr::constant(s)) {
                Some(x) => x,
                None => return Ok(Dim::unknown()),
            },
            Some(_) => DimExpr::constant(0),
            None => start.clone(),
        };
        let to = match e {
            Some(e) if e >= BIG => len,
            Some(e) if e < 0 && e > -BIG => match len.add(&DimExpr::constant(e)) {
                Some(x) => x,
                None => return Ok(Dim::unknown()),
            },
            Some(e) if e >= 0 && dim.fixed().is_none() => DimExpr::constant(e),
            None => end.clone(),
            _ => return Ok(Dim::unknown()),
        };
        return Ok(to
            .sub(&from)
            .map(Dim::from_expr)
            .unwrap_or_else(Dim::unknown));
    }
    if step == -1 && s.is_some_and(|s| s == -1 || s >= BIG) && e.is_some_and(|e| e <= -BIG) {
        return Ok(dim.clone());
    }
    Ok(Dim::unknown())
}

fn onnx_attention(cx: &Cx, a: &super::OnnxAttentionAttrs) -> Out {
    let n = a.num_outputs;
    let Some(q) = cx.ty(0) else {
        return Ok(vec![None; n]);
    };
    let (Some(qd), Some(kd), Some(vd)) = (cx.dims(0), cx.dims(1), cx.dims(2)) else {
        return Ok(vec![Some(TensorType::unranked(q.dtype)); n]);
    };
    if qd.len() != kd.len() || qd.len() != vd.len() {
        return Err(format!(
            "Q, K and V must have the same rank, got {}, {} and {}",
            show(qd),
            show(kd),
            show(vd)
        ));
    }
    let past = cx
        .dims(4)
        .map(|p| p.get(2).cloned().unwrap_or_else(Dim::unknown));
    // (batch, heads, seq, dim) of k and v, as 4-D.
    let (y, kvh, kv_len, hd, vhd) = match qd.len() {
        4 => {
            let y = vec![qd[0].clone(), qd[1].clone(), qd[2].clone(), vd[3].clone()];
            (
                y,
                kd[1].clone(),
                kd[2].clone(),
                kd[3].clone(),
                vd[3].clone(),
            )
        }
        3 => {
            let (Some(qh), Some(kvh)) = (a.q_num_heads, a.kv_num_heads) else {
                return Err("3-D inputs need the q_num_heads and kv_num_heads attributes".into());
            };
            let (qh, kvh) = (Dim::Fixed(qh.max(1) as u64), Dim::Fixed(kvh.max(1) as u64));
            let vhd = vd[2].div_floor(&kvh);
            let y = vec![qd[0].clone(), qd[1].clone(), qh.times(&vhd)];
            (y, kvh.clone(), kd[1].clone(), kd[2].div_floor(&kvh), vhd)
        }
        r => return Err(format!("Q must be 3-D or 4-D, got rank {r}")),
    };
    let total = match past {
        Some(p) => p.plus(&kv_len),
        None => kv_len,
    };
    let mut out = vec![Some(shaped(q.dtype, Some(y)))];
    if n == 3 {
        let b = qd[0].clone();
        out.push(Some(shaped(
            q.dtype,
            Some(vec![b.clone(), kvh.clone(), total.clone(), hd]),
        )));
        out.push(Some(shaped(q.dtype, Some(vec![b, kvh, total, vhd]))));
    }
    Ok(out)
}
