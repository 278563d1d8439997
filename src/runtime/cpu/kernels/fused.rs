//! The fusions the `fuse` pass makes: `Fused` (an elementwise expression
//! evaluated in one pass over memory) and `MergedLinear` (projections of
//! one input as one GEMM against their concatenated weight).
//!
//! Both give what their expansion into plain ops gives
//! ([`crate::ir::expand`]): every step of an expression computes in the
//! same precision as its unfused op, with the same formula, and rounds to
//! its dtype as the unfused op's output would be stored.

use super::{float_kind_error, same_data_kind};
use crate::ir::{BinaryOp, DType, FusedExpr, FusedStep, MergedLinear, Tensor, UnaryOp};
use crate::runtime::cpu::erf::erf;
use crate::runtime::cpu::layout::broadcast_shapes;
use crate::runtime::cpu::linalg::{
    broadcast_strides, finish, gemm_strided, output_numel, MatRef, Real,
};
use rayon::prelude::*;

/// Elements evaluated together: every step's block stays in L1.
const BLOCK: usize = 512;

/// The float math the expressions use, with the unfused kernels' formulas.
trait Float: Real {
    fn cos(self) -> Self;
    fn sin(self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn abs(self) -> Self;
    fn erf(self) -> Self;
}

macro_rules! float_impl {
    ($t:ty) => {
        impl Float for $t {
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            fn ceil(self) -> Self {
                <$t>::ceil(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn erf(self) -> Self {
                erf(self as f64) as $t
            }
        }
    };
}
float_impl!(f32);
float_impl!(f64);

fn unary<T: Float>(op: UnaryOp, src: &[T], dst: &mut [T]) {
    use UnaryOp::*;
    let one = T::ONE;
    macro_rules! each {
        ($f:expr) => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = $f(x);
            }
        };
    }
    match op {
        Neg => each!(|x: T| -x),
        Sqrt => each!(|x: T| x.sqrt()),
        Reciprocal => each!(|x: T| one / x),
        Exp => each!(|x: T| x.exp()),
        Log => each!(|x: T| x.ln()),
        Tanh => each!(|x: T| x.tanh()),
        Sigmoid => each!(|x: T| {
            if x >= T::ZERO {
                one / (one + (-x).exp())
            } else {
                let e = x.exp();
                e / (one + e)
            }
        }),
        Cos => each!(|x: T| Float::cos(x)),
        Sin => each!(|x: T| Float::sin(x)),
        Erf => each!(|x: T| Float::erf(x)),
        Abs => each!(|x: T| Float::abs(x)),
        Relu => each!(|x: T| if x < T::ZERO { T::ZERO } else { x }),
        Floor => each!(|x: T| Float::floor(x)),
        Ceil => each!(|x: T| Float::ceil(x)),
        // `FusedExpr::check` admits no other unary op.
        Not => dst.fill(T::ZERO),
    }
}

fn binary<T: Float>(op: BinaryOp, a: &[T], b: &[T], dst: &mut [T]) {
    macro_rules! each {
        ($o:tt) => {
            for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
                *d = x $o y;
            }
        };
    }
    match op {
        BinaryOp::Add => each!(+),
        BinaryOp::Sub => each!(-),
        BinaryOp::Mul => each!(*),
        // `FusedExpr::check` admits no other binary op.
        _ => each!(/),
    }
}

/// Where input `k`'s element for output index `i` lives.
enum Access {
    /// Same shape as the output: element `i`.
    Same,
    /// One value for every element.
    Scalar,
    /// The input is the output's trailing dims: element `i % len`.
    Suffix(usize),
    /// Any other broadcast: per-element offsets through strides.
    Strided(Vec<usize>),
}

fn access(shape: &[usize], out: &[usize]) -> Access {
    let n: usize = shape.iter().product();
    if shape == out {
        Access::Same
    } else if n == 1 {
        Access::Scalar
    } else {
        let lead = out.len() - shape.len();
        let trimmed: Vec<usize> = shape.iter().copied().skip_while(|&d| d == 1).collect();
        if out[lead..].ends_with(&trimmed) && trimmed.iter().product::<usize>() == n {
            Access::Suffix(n)
        } else {
            Access::Strided(broadcast_strides(shape, out))
        }
    }
}

/// Evaluates `e` over the flat output indices `start..start+dst.len()`.
fn eval_block<T: Float>(
    e: &FusedExpr,
    ins: &[&[T]],
    acc: &[Access],
    out_shape: &[usize],
    start: usize,
    dst: &mut [T],
    scratch: &mut [Vec<T>],
) {
    let n = dst.len();
    for (i, step) in e.steps.iter().enumerate() {
        let (done, rest) = scratch.split_at_mut(i);
        let buf = &mut rest[0][..n];
        match step {
            FusedStep::Input(k) => {
                let src = ins[*k];
                match &acc[*k] {
                    Access::Same => buf.copy_from_slice(&src[start..start + n]),
                    Access::Scalar => buf.fill(src[0]),
                    Access::Suffix(len) => {
                        for (j, b) in buf.iter_mut().enumerate() {
                            *b = src[(start + j) % len];
                        }
                    }
                    Access::Strided(strides) => {
                        for (j, b) in buf.iter_mut().enumerate() {
                            let mut flat = start + j;
                            let mut off = 0;
                            for (d, s) in out_shape.iter().zip(strides).rev() {
                                off += (flat % d) * s;
                                flat /= d;
                            }
                            *b = src[off];
                        }
                    }
                }
            }
            FusedStep::Scalar(x) => buf.fill(T::from_f64(*x)),
            FusedStep::Unary(op, a) => unary(*op, &done[*a][..n], buf),
            FusedStep::Binary(op, a, b) => binary(*op, &done[*a][..n], &done[*b][..n], buf),
            // Between f32-held dtypes a cast is the rounding below.
            FusedStep::Cast(a) => buf.copy_from_slice(&done[*a][..n]),
        }
        let d = e.dtypes[i];
        if matches!(d, DType::F16 | DType::BF16) {
            buf.iter_mut().for_each(|x| *x = T::round_one(d, *x));
        }
    }
    let last = e.steps.len() - 1;
    dst.copy_from_slice(&scratch[last][..n]);
}

fn run_expr<T: Float>(
    e: &FusedExpr,
    ins: &[&[T]],
    shapes: &[&[usize]],
    out_shape: &[usize],
) -> Vec<T> {
    let total: usize = out_shape.iter().product();
    let acc: Vec<Access> = shapes.iter().map(|s| access(s, out_shape)).collect();
    let mut out = T::zeroed(total);
    let per_task = BLOCK * 16;
    out.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut scratch: Vec<Vec<T>> = vec![vec![T::ZERO; BLOCK]; e.steps.len()];
            for (b, blk) in chunk.chunks_mut(BLOCK).enumerate() {
                let start = c * per_task + b * BLOCK;
                eval_block(e, ins, &acc, out_shape, start, blk, &mut scratch);
            }
        });
    out
}

/// `Op::Fused`: the expression over its broadcast inputs, in one pass.
pub fn fused(e: &FusedExpr, ins: &[&Tensor]) -> Result<Tensor, String> {
    const OP: &str = "Fused";
    e.check()?;
    if ins.len() != e.num_inputs() {
        return Err(format!(
            "{OP} reads {} inputs, the node has {}",
            e.num_inputs(),
            ins.len()
        ));
    }
    let dtype = e.dtype().ok_or("the expression has no steps")?;
    let mut shape: Vec<usize> = Vec::new();
    for t in ins {
        shape = broadcast_shapes(&shape, &t.shape)?;
    }
    output_numel(&shape, 4, "Fused output")?;
    let shapes: Vec<&[usize]> = ins.iter().map(|t| t.shape.as_slice()).collect();
    let f64_steps = e.dtypes.iter().filter(|d| **d == DType::F64).count();
    if f64_steps == e.dtypes.len() {
        let xs: Vec<&[f64]> = ins
            .iter()
            .map(|t| f64::slice(&t.data).ok_or_else(|| float_kind_error(OP, "input", t)))
            .collect::<Result<_, _>>()?;
        Ok(finish(
            dtype,
            shape.clone(),
            run_expr(e, &xs, &shapes, &shape),
        ))
    } else if f64_steps == 0 {
        let xs: Vec<&[f32]> = ins
            .iter()
            .map(|t| t.as_f32().ok_or_else(|| float_kind_error(OP, "input", t)))
            .collect::<Result<_, _>>()?;
        Ok(finish(
            dtype,
            shape.clone(),
            run_expr(e, &xs, &shapes, &shape),
        ))
    } else {
        Err(format!(
            "{OP} mixes f64 and f32 steps; the fuse pass keeps such casts out of expressions"
        ))
    }
}

/// `Op::MergedLinear`: one GEMM of `x` against the concatenated weight
/// `[Σ out, in]`, split into one output per part, and each part's LoRA
/// branch added as `LoraLinear` adds it. `loras[i]` is part `i`'s
/// (`lora_A`, `lora_B`) when it has one.
pub fn merged_linear(
    m: &MergedLinear,
    x: &Tensor,
    weight: &Tensor,
    loras: &[Option<(&Tensor, &Tensor)>],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "MergedLinear";
    let total = m.total_out();
    let in_f = match *weight.shape.as_slice() {
        [o, i] if o == total => i,
        _ => {
            return Err(format!(
                "{OP} weight must be [{total}, in] (the parts' rows), got {:?}",
                weight.shape
            ))
        }
    };
    if x.shape.last() != Some(&in_f) {
        return Err(format!(
            "{OP} input {:?} does not end in the weight's in-features {in_f}",
            x.shape
        ));
    }
    if !same_data_kind(x, weight) {
        return Err(format!(
            "{OP} input ({}) and weight ({}) have different types",
            x.dtype, weight.dtype
        ));
    }
    let rows: usize = x.shape[..x.rank() - 1].iter().product();
    output_numel(&[rows, total], 4, "MergedLinear output")?;
    let dtype = x.dtype.promote(weight.dtype);
    for (i, (part, l)) in m.parts.iter().zip(loras).enumerate() {
        if let (Some(attrs), Some((a, b))) = (&part.lora, l) {
            let r = attrs.rank;
            if a.shape != [r, in_f] || b.shape != [part.out_features, r] {
                return Err(format!(
                    "{OP} part {i}: lora_A {:?} and lora_B {:?} do not fit [{}, {in_f}] at rank {r}",
                    a.shape, b.shape, part.out_features
                ));
            }
            if !same_data_kind(x, a) || !same_data_kind(x, b) {
                return Err(format!(
                    "{OP} part {i}: lora_A and lora_B must have the input's type"
                ));
            }
        } else if part.lora.is_some() || l.is_some() {
            return Err(format!(
                "{OP} part {i}: its LoRA inputs do not match its attributes"
            ));
        }
    }

    fn run<T: Real>(
        m: &MergedLinear,
        x: &[T],
        w: &[T],
        loras: &[Option<(&[T], &[T])>],
        rows: usize,
        in_f: usize,
        dtype: DType,
    ) -> Vec<Vec<T>> {
        let total = m.total_out();
        let mut all = T::zeroed(rows * total);
        gemm_strided(
            rows,
            total,
            in_f,
            &mut all,
            total,
            false,
            MatRef::row_major(x, 0, in_f),
            MatRef::row_major(w, 0, in_f).t(),
            T::ONE,
            true,
        );
        let mut outs = Vec::with_capacity(m.parts.len());
        for ((part, off), l) in m.parts.iter().zip(m.offsets()).zip(loras) {
            let of = part.out_features;
            let mut y = T::zeroed(rows * of);
            y.par_chunks_mut(of.max(1))
                .zip(all.par_chunks(total.max(1)))
                .for_each(|(dst, src)| dst.copy_from_slice(&src[off..off + of]));
            T::round_storage(dtype, &mut y);
            if let (Some(attrs), Some((a, b))) = (&part.lora, l) {
                let r = attrs.rank;
                let mut down = T::zeroed(rows * r);
                gemm_strided(
                    rows,
                    r,
                    in_f,
                    &mut down,
                    r,
                    false,
                    MatRef::row_major(x, 0, in_f),
                    MatRef::row_major(a, 0, in_f).t(),
                    T::ONE,
                    true,
                );
                T::round_storage(dtype, &mut down);
                gemm_strided(
                    rows,
                    of,
                    r,
                    &mut y,
                    of,
                    true,
                    MatRef::row_major(&down, 0, r),
                    MatRef::row_major(b, 0, r).t(),
                    T::from_f64(attrs.scale() as f64),
                    true,
                );
                T::round_storage(dtype, &mut y);
                T::recycle(down);
            }
            outs.push(y);
        }
        T::recycle(all);
        outs
    }

    // The inputs' kind was checked above: all f32-held, or all f64.
    fn typed<T: Real>(
        m: &MergedLinear,
        x: &Tensor,
        weight: &Tensor,
        loras: &[Option<(&Tensor, &Tensor)>],
        rows: usize,
        in_f: usize,
        dtype: DType,
    ) -> Option<Vec<Tensor>> {
        let (xv, wv) = (T::slice(&x.data)?, T::slice(&weight.data)?);
        let ls: Vec<Option<(&[T], &[T])>> = loras
            .iter()
            .map(|l| l.and_then(|(a, b)| Some((T::slice(&a.data)?, T::slice(&b.data)?))))
            .collect();
        let outs = run(m, xv, wv, &ls, rows, in_f, dtype);
        Some(
            outs.into_iter()
                .zip(&m.parts)
                .map(|(v, p)| {
                    let mut s = x.shape.clone();
                    if let Some(last) = s.last_mut() {
                        *last = p.out_features;
                    }
                    finish(dtype, s, v)
                })
                .collect(),
        )
    }
    let outs = typed::<f32>(m, x, weight, loras, rows, in_f, dtype)
        .or_else(|| typed::<f64>(m, x, weight, loras, rows, in_f, dtype))
        .ok_or_else(|| float_kind_error(OP, "input", x))?;
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cpu::elementwise as ew;

    fn t(dtype: DType, shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 + seed * 11) % 101) as f32 / 25.0 - 2.0)
            .collect();
        let mut x = Tensor::f32(shape.to_vec(), v);
        x.dtype = dtype;
        crate::runtime::cpu::layout::normalize(&mut x);
        x
    }

    /// `sigmoid(i0 * i1 + 0.5) - i2`, cast to `out`, unfused, op by op.
    fn unfused(a: &Tensor, b: &Tensor, c: &Tensor, out: DType) -> Tensor {
        let m = ew::binary(BinaryOp::Mul, a, b).unwrap();
        let half = Tensor::scalar_of(a.dtype, 0.5);
        let s = ew::binary(BinaryOp::Add, &m, &half).unwrap();
        let g = ew::unary(UnaryOp::Sigmoid, &s).unwrap();
        let d = ew::binary(BinaryOp::Sub, &g, c).unwrap();
        ew::cast(&d, out).unwrap()
    }

    fn expr(d: DType, out: DType) -> FusedExpr {
        use FusedStep::*;
        FusedExpr {
            steps: vec![
                Input(0),
                Input(1),
                Binary(BinaryOp::Mul, 0, 1),
                Scalar(0.5),
                Binary(BinaryOp::Add, 2, 3),
                Unary(UnaryOp::Sigmoid, 4),
                Input(2),
                Binary(BinaryOp::Sub, 5, 6),
                Cast(7),
            ],
            dtypes: vec![d, d, d, d, d, d, d, d, out],
        }
    }

    #[test]
    fn an_expression_equals_its_ops_run_one_by_one_bit_for_bit() {
        // Same shape, scalar, trailing and general broadcasts; f32, bf16
        // (every step rounded as stored), f64.
        let shapes: [(&[usize], &[usize], &[usize]); 4] = [
            (&[3, 700], &[3, 700], &[3, 700]),
            (&[2, 5, 300], &[1], &[300]),
            (&[2, 5, 7], &[5, 1], &[2, 1, 7]),
            (&[4, 1], &[1, 6], &[4, 6]),
        ];
        for (d, out) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::F32),
            (DType::F32, DType::F16),
        ] {
            for (sa, sb, sc) in shapes {
                let (a, b, c) = (t(d, sa, 1), t(d, sb, 2), t(d, sc, 3));
                let want = unfused(&a, &b, &c, out);
                let got = fused(&expr(d, out), &[&a, &b, &c]).unwrap();
                assert_eq!(got, want, "{d}→{out} shapes {sa:?} {sb:?} {sc:?}");
            }
        }
        let f64t = |s: &[usize], seed| {
            let x = t(DType::F32, s, seed);
            ew::cast(&x, DType::F64).unwrap()
        };
        let (a, b, c) = (f64t(&[3, 9], 1), f64t(&[9], 2), f64t(&[3, 1], 3));
        let want = unfused(&a, &b, &c, DType::F64);
        let got = fused(&expr(DType::F64, DType::F64), &[&a, &b, &c]).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn malformed_expressions_are_refused() {
        let mut e = expr(DType::F32, DType::F32);
        e.steps[2] = FusedStep::Binary(BinaryOp::Mul, 0, 5);
        assert!(e.check().unwrap_err().contains("not before it"));
        let mut e = expr(DType::F32, DType::F32);
        e.steps[2] = FusedStep::Binary(BinaryOp::Equal, 0, 1);
        assert!(e.check().unwrap_err().contains("cannot be fused"));
        let e = expr(DType::F32, DType::F32);
        let a = t(DType::F32, &[2], 0);
        assert!(fused(&e, &[&a, &a]).unwrap_err().contains("reads 3 inputs"));
        let (x, y) = (t(DType::F32, &[2, 3], 0), t(DType::F32, &[4], 0));
        assert!(fused(&e, &[&x, &y, &x]).is_err());
    }

    #[test]
    fn merged_linear_equals_separate_projections() {
        use crate::ir::{LoraAttrs, MergedPart};
        use crate::runtime::cpu::kernels::{linear, lora_linear};
        let x = t(DType::F32, &[2, 9, 16], 1);
        let wq = t(DType::F32, &[16, 16], 2);
        let wk = t(DType::F32, &[8, 16], 3);
        let (a, b) = (t(DType::F32, &[4, 16], 4), t(DType::F32, &[16, 4], 5));
        let lora = LoraAttrs {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            dropout: 0.0,
        };
        let m = MergedLinear {
            parts: vec![
                MergedPart {
                    out_features: 16,
                    lora: Some(lora.clone()),
                },
                MergedPart {
                    out_features: 8,
                    lora: None,
                },
            ],
        };
        let mut cat = wq.as_f32().unwrap().to_vec();
        cat.extend_from_slice(wk.as_f32().unwrap());
        let w = Tensor::f32(vec![24, 16], cat);
        let outs = merged_linear(&m, &x, &w, &[Some((&a, &b)), None]).unwrap();
        let q = lora_linear(&x, &wq, &a, &b, None, lora.scale()).unwrap();
        let k = linear(&x, &wk, None).unwrap();
        for (got, want) in outs.iter().zip([q, k]) {
            assert_eq!(got.shape, want.shape);
            let d = got
                .to_f64_vec()
                .iter()
                .zip(want.to_f64_vec())
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-5, "{d}");
        }
        let bad = Tensor::f32(vec![20, 16], vec![0.0; 320]);
        assert!(merged_linear(&m, &x, &bad, &[Some((&a, &b)), None])
            .unwrap_err()
            .contains("[24, in]"));
    }
}
