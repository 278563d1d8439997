//! Elementwise kernels with ONNX (numpy) multidirectional broadcasting:
//! unary and binary ops, Max/Min/Sum, Where, Cast, plus the small
//! generators and scans that live beside them (CumSum, Trilu,
//! ConstantOfShape, Range).
//!
//! Values are computed in their storage type (f32, f64, i64, bool) and then
//! brought back into their logical dtype: f16/bf16 results are rounded to
//! that precision, i32/i8/u8 results wrap to that width.

use super::erf::erf;
use super::layout::{
    alloc, broadcast_shapes, broadcast_strides, map, map_data, map_inplace, norm_axis, normalize,
    numel, Walk, PAR_CHUNK, PAR_MIN,
};
use crate::ir::{BinaryOp, DType, Tensor, TensorData, UnaryOp, VariadicOp};
use rayon::prelude::*;

type KResult<T> = std::result::Result<T, String>;

// ---------------------------------------------------------------------------
// Broadcasting engines
// ---------------------------------------------------------------------------

/// `f(a, b)` over the broadcast of two operands. Same shapes and scalar
/// operands take straight-line paths; everything else walks collapsed rows
/// whose inner strides are 0 or 1, so the inner loop vectorizes.
pub fn zip_broadcast<A, B, O, F>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    f: F,
) -> KResult<(Vec<usize>, Vec<O>)>
where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Copy + Default + Send + Sync,
    F: Fn(A, B) -> O + Sync + Send,
{
    let shape = broadcast_shapes(ash, bsh)?;
    let n = numel(&shape)?;
    if ash == bsh {
        let out = if n >= PAR_MIN {
            a.par_iter()
                .zip(b.par_iter())
                .with_min_len(PAR_CHUNK)
                .map(|(&x, &y)| f(x, y))
                .collect()
        } else {
            a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
        };
        return Ok((shape, out));
    }
    if b.len() == 1 && ash == shape.as_slice() {
        let y = b[0];
        return Ok((shape, map(a, |x| f(x, y))));
    }
    if a.len() == 1 && bsh == shape.as_slice() {
        let x = a[0];
        return Ok((shape, map(b, |y| f(x, y))));
    }
    let mut out = alloc::<O>(n)?;
    if n == 0 {
        return Ok((shape, out));
    }
    let walk = Walk::<2>::new(
        &shape,
        [
            broadcast_strides(ash, &shape),
            broadcast_strides(bsh, &shape),
        ],
        [0, 0],
    );
    let [sa, sb] = walk.inner_strides;
    walk.for_each_row(&mut out, |[oa, ob], row| {
        let (oa, ob, m) = (oa as usize, ob as usize, row.len());
        match (sa, sb) {
            (1, 1) => {
                for ((o, &x), &y) in row.iter_mut().zip(&a[oa..oa + m]).zip(&b[ob..ob + m]) {
                    *o = f(x, y);
                }
            }
            (1, _) => {
                let y = b[ob];
                for (o, &x) in row.iter_mut().zip(&a[oa..oa + m]) {
                    *o = f(x, y);
                }
            }
            (_, 1) => {
                let x = a[oa];
                for (o, &y) in row.iter_mut().zip(&b[ob..ob + m]) {
                    *o = f(x, y);
                }
            }
            _ => row.fill(f(a[oa], b[ob])),
        }
    });
    Ok((shape, out))
}

/// Writes `f(a, b)` into `a` itself, `b` broadcast to `a`'s shape (which must
/// already be the broadcast result). Saves an allocation when `a` is dead
/// after this op.
pub fn zip_into<A, B, F>(a: &mut [A], ash: &[usize], b: &[B], bsh: &[usize], f: F) -> KResult<()>
where
    A: Copy + Send + Sync,
    B: Copy + Sync,
    F: Fn(A, B) -> A + Sync + Send,
{
    let shape = broadcast_shapes(ash, bsh)?;
    if shape != ash {
        return Err(format!("in-place broadcast of {bsh:?} into {ash:?}"));
    }
    if b.len() == 1 {
        let y = b[0];
        map_inplace(a, |x| f(x, y));
        return Ok(());
    }
    if ash == bsh {
        if a.len() >= PAR_MIN {
            a.par_chunks_mut(PAR_CHUNK)
                .zip(b.par_chunks(PAR_CHUNK))
                .for_each(|(ca, cb)| {
                    for (x, &y) in ca.iter_mut().zip(cb) {
                        *x = f(*x, y);
                    }
                });
        } else {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = f(*x, y);
            }
        }
        return Ok(());
    }
    if a.is_empty() {
        return Ok(());
    }
    let walk = Walk::<1>::new(&shape, [broadcast_strides(bsh, &shape)], [0]);
    let [sb] = walk.inner_strides;
    walk.for_each_row(a, |[ob], row| {
        let (ob, m) = (ob as usize, row.len());
        if sb == 1 {
            for (x, &y) in row.iter_mut().zip(&b[ob..ob + m]) {
                *x = f(*x, y);
            }
        } else {
            let y = b[ob];
            for x in row.iter_mut() {
                *x = f(*x, y);
            }
        }
    });
    Ok(())
}

/// `Where`: `c ? x : y` over the broadcast of three operands.
fn where_zip<T: Copy + Default + Send + Sync>(
    c: &[bool],
    cs: &[usize],
    x: &[T],
    xs: &[usize],
    y: &[T],
    ys: &[usize],
) -> KResult<(Vec<usize>, Vec<T>)> {
    let shape = broadcast_shapes(&broadcast_shapes(cs, xs)?, ys)?;
    let n = numel(&shape)?;
    let mut out = alloc::<T>(n)?;
    if n == 0 {
        return Ok((shape, out));
    }
    let walk = Walk::<3>::new(
        &shape,
        [
            broadcast_strides(cs, &shape),
            broadcast_strides(xs, &shape),
            broadcast_strides(ys, &shape),
        ],
        [0, 0, 0],
    );
    let [sc, sx, sy] = walk.inner_strides;
    walk.for_each_row(&mut out, |[oc, ox, oy], row| {
        let (mut pc, mut px, mut py) = (oc, ox, oy);
        for o in row.iter_mut() {
            *o = if c[pc as usize] {
                x[px as usize]
            } else {
                y[py as usize]
            };
            pc += sc;
            px += sx;
            py += sy;
        }
    });
    Ok((shape, out))
}

// ---------------------------------------------------------------------------
// Unary
// ---------------------------------------------------------------------------

/// Input storage that is either borrowed or owned (and then reused).
enum Buf<'a, T> {
    Ref(&'a [T]),
    Own(Vec<T>),
}

fn apply<T: Copy + Send + Sync>(buf: Buf<'_, T>, f: impl Fn(T) -> T + Sync + Send) -> Vec<T> {
    match buf {
        Buf::Ref(s) => map(s, f),
        Buf::Own(mut v) => {
            map_inplace(&mut v, f);
            v
        }
    }
}

macro_rules! float_unary {
    ($name:ident, $t:ty) => {
        fn $name(op: UnaryOp, buf: Buf<'_, $t>) -> KResult<Vec<$t>> {
            use UnaryOp::*;
            Ok(match op {
                Neg => apply(buf, |x| -x),
                Sqrt => apply(buf, |x| x.sqrt()),
                Reciprocal => apply(buf, |x| 1.0 / x),
                Exp => apply(buf, |x| x.exp()),
                Log => apply(buf, |x| x.ln()),
                Tanh => apply(buf, |x| x.tanh()),
                Sigmoid => apply(buf, |x| {
                    // Never exponentiates a large positive number.
                    if x >= 0.0 {
                        1.0 / (1.0 + (-x).exp())
                    } else {
                        let e = x.exp();
                        e / (1.0 + e)
                    }
                }),
                Cos => apply(buf, |x| x.cos()),
                Sin => apply(buf, |x| x.sin()),
                Erf => apply(buf, |x| erf(x as f64) as $t),
                Abs => apply(buf, |x| x.abs()),
                Relu => apply(buf, |x| if x < 0.0 { 0.0 } else { x }),
                Floor => apply(buf, |x| x.floor()),
                Ceil => apply(buf, |x| x.ceil()),
                Not => return Err("Not needs a bool tensor, got a float tensor".into()),
            })
        }
    };
}
float_unary!(unary_f32, f32);
float_unary!(unary_f64, f64);

fn unary_i64(op: UnaryOp, buf: Buf<'_, i64>) -> KResult<Vec<i64>> {
    Ok(match op {
        UnaryOp::Neg => apply(buf, |x| x.wrapping_neg()),
        UnaryOp::Abs => apply(buf, |x| x.wrapping_abs()),
        UnaryOp::Relu => apply(buf, |x| x.max(0)),
        other => {
            return Err(format!(
                "{other:?} is not defined for integer tensors; Cast to a float type first"
            ))
        }
    })
}

fn unary_data(op: UnaryOp, dtype: DType, data: TensorData) -> KResult<TensorData> {
    Ok(match data {
        TensorData::F32(v) => TensorData::F32(unary_f32(op, Buf::Own(v))?),
        TensorData::F64(v) => TensorData::F64(unary_f64(op, Buf::Own(v))?),
        TensorData::I64(v) => TensorData::I64(unary_i64(op, Buf::Own(v))?),
        TensorData::Bool(mut v) => {
            if op != UnaryOp::Not {
                return Err(format!("{op:?} is not defined for {dtype} tensors"));
            }
            map_inplace(&mut v, |x| !x);
            TensorData::Bool(v)
        }
    })
}

/// A unary op on a borrowed tensor.
pub fn unary(op: UnaryOp, x: &Tensor) -> KResult<Tensor> {
    let data = match &x.data {
        TensorData::F32(v) => TensorData::F32(unary_f32(op, Buf::Ref(v))?),
        TensorData::F64(v) => TensorData::F64(unary_f64(op, Buf::Ref(v))?),
        TensorData::I64(v) => TensorData::I64(unary_i64(op, Buf::Ref(v))?),
        TensorData::Bool(v) => {
            if op != UnaryOp::Not {
                return Err(format!("{op:?} is not defined for {} tensors", x.dtype));
            }
            TensorData::Bool(map(v, |b| !b))
        }
    };
    let mut t = Tensor {
        dtype: x.dtype,
        shape: x.shape.clone(),
        data,
    };
    normalize(&mut t);
    Ok(t)
}

/// A unary op that reuses the input's buffer.
pub fn unary_owned(op: UnaryOp, x: Tensor) -> KResult<Tensor> {
    let Tensor { dtype, shape, data } = x;
    let mut t = Tensor {
        dtype,
        shape,
        data: unary_data(op, dtype, data)?,
    };
    normalize(&mut t);
    Ok(t)
}

// ---------------------------------------------------------------------------
// Binary
// ---------------------------------------------------------------------------

fn same_dtype(what: &str, a: &Tensor, b: &Tensor) -> KResult<()> {
    if a.dtype != b.dtype {
        return Err(format!(
            "{what}: operand types differ ({} vs {}); insert a Cast",
            a.dtype, b.dtype
        ));
    }
    Ok(())
}

/// The dtype of an elementwise result: the operands' common type. Types
/// that share f32 storage (f32, f16, bf16) mix and give f32, so that f32
/// activations can meet weights stored in half precision.
fn common_dtype(what: &str, a: &Tensor, b: &Tensor) -> KResult<DType> {
    let f32_storage = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    if a.dtype == b.dtype {
        Ok(a.dtype)
    } else if f32_storage(a.dtype) && f32_storage(b.dtype) {
        Ok(DType::F32)
    } else {
        same_dtype(what, a, b).map(|_| a.dtype)
    }
}

fn max_f<T: PartialOrd + Copy>(p: T, q: T) -> T {
    // NaN propagates, as numpy's maximum.
    #[allow(clippy::eq_op)]
    let p_nan = p != p;
    if p > q || p_nan {
        p
    } else {
        q
    }
}

fn min_f<T: PartialOrd + Copy>(p: T, q: T) -> T {
    #[allow(clippy::eq_op)]
    let p_nan = p != p;
    if p < q || p_nan {
        p
    } else {
        q
    }
}

macro_rules! float_arith {
    ($op:expr, $x:expr, $xs:expr, $y:expr, $ys:expr) => {{
        use BinaryOp::*;
        match $op {
            Add => zip_broadcast($x, $xs, $y, $ys, |p, q| p + q),
            Sub => zip_broadcast($x, $xs, $y, $ys, |p, q| p - q),
            Mul => zip_broadcast($x, $xs, $y, $ys, |p, q| p * q),
            _ => zip_broadcast($x, $xs, $y, $ys, |p, q| p / q),
        }
    }};
}

fn check_int_divisor(y: &[i64]) -> KResult<()> {
    if y.contains(&0) {
        return Err("integer division by zero".into());
    }
    Ok(())
}

/// `a op b` with broadcasting. Comparisons produce bool; arithmetic keeps
/// the operands' dtype (integer division truncates toward zero, like C).
pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> KResult<Tensor> {
    use BinaryOp::*;
    use TensorData as D;
    if op == Pow {
        return pow(a, b);
    }
    let dtype = common_dtype(&format!("{op:?}"), a, b)?;
    let (xs, ys) = (&a.shape[..], &b.shape[..]);
    let (shape, data) = match op {
        Add | Sub | Mul | Div => match (&a.data, &b.data) {
            (D::F32(x), D::F32(y)) => {
                let (s, v) = float_arith!(op, x, xs, y, ys)?;
                (s, D::F32(v))
            }
            (D::F64(x), D::F64(y)) => {
                let (s, v) = float_arith!(op, x, xs, y, ys)?;
                (s, D::F64(v))
            }
            (D::I64(x), D::I64(y)) => {
                let (s, v) = match op {
                    Add => zip_broadcast(x, xs, y, ys, |p: i64, q: i64| p.wrapping_add(q)),
                    Sub => zip_broadcast(x, xs, y, ys, |p: i64, q: i64| p.wrapping_sub(q)),
                    Mul => zip_broadcast(x, xs, y, ys, |p: i64, q: i64| p.wrapping_mul(q)),
                    _ => {
                        check_int_divisor(y)?;
                        zip_broadcast(x, xs, y, ys, |p: i64, q: i64| p.wrapping_div(q))
                    }
                }?;
                (s, D::I64(v))
            }
            _ => return Err(format!("{op:?} is not defined for {} tensors", a.dtype)),
        },
        Equal | Less | LessOrEqual | Greater | GreaterOrEqual => {
            let (s, v) = match (&a.data, &b.data) {
                (D::F32(x), D::F32(y)) => compare(op, x, xs, y, ys),
                (D::F64(x), D::F64(y)) => compare(op, x, xs, y, ys),
                (D::I64(x), D::I64(y)) => compare(op, x, xs, y, ys),
                (D::Bool(x), D::Bool(y)) => compare(op, x, xs, y, ys),
                _ => unreachable!("same dtype implies same storage"),
            }?;
            return Ok(Tensor::bool(s, v));
        }
        And | Or => match (&a.data, &b.data) {
            (D::Bool(x), D::Bool(y)) => {
                let (s, v) = if op == And {
                    zip_broadcast(x, xs, y, ys, |p: bool, q: bool| p && q)?
                } else {
                    zip_broadcast(x, xs, y, ys, |p: bool, q: bool| p || q)?
                };
                return Ok(Tensor::bool(s, v));
            }
            _ => return Err(format!("{op:?} needs bool tensors, got {}", a.dtype)),
        },
        Pow => unreachable!("handled above"),
    };
    let mut t = Tensor { dtype, shape, data };
    normalize(&mut t);
    Ok(t)
}

/// `a op b` writing into `a`'s buffer when `a` already has the result's
/// shape; falls back to [`binary`] otherwise. Arithmetic only.
pub fn binary_owned(op: BinaryOp, a: Tensor, b: &Tensor) -> KResult<Tensor> {
    use BinaryOp::*;
    use TensorData as D;
    let arith = matches!(op, Add | Sub | Mul | Div);
    let fits = broadcast_shapes(&a.shape, &b.shape).is_ok_and(|s| s == a.shape);
    let dtype = match common_dtype(&format!("{op:?}"), &a, b) {
        Ok(d) if arith && fits => d,
        _ => return binary(op, &a, b),
    };
    let Tensor {
        shape, mut data, ..
    } = a;
    let (xs, ys) = (&shape[..], &b.shape[..]);
    match (&mut data, &b.data) {
        (D::F32(x), D::F32(y)) => match op {
            Add => zip_into(x, xs, y, ys, |p, q| p + q),
            Sub => zip_into(x, xs, y, ys, |p, q| p - q),
            Mul => zip_into(x, xs, y, ys, |p, q| p * q),
            _ => zip_into(x, xs, y, ys, |p, q| p / q),
        }?,
        (D::F64(x), D::F64(y)) => match op {
            Add => zip_into(x, xs, y, ys, |p, q| p + q),
            Sub => zip_into(x, xs, y, ys, |p, q| p - q),
            Mul => zip_into(x, xs, y, ys, |p, q| p * q),
            _ => zip_into(x, xs, y, ys, |p, q| p / q),
        }?,
        (D::I64(x), D::I64(y)) => match op {
            Add => zip_into(x, xs, y, ys, |p: i64, q: i64| p.wrapping_add(q)),
            Sub => zip_into(x, xs, y, ys, |p: i64, q: i64| p.wrapping_sub(q)),
            Mul => zip_into(x, xs, y, ys, |p: i64, q: i64| p.wrapping_mul(q)),
            _ => {
                check_int_divisor(y)?;
                zip_into(x, xs, y, ys, |p: i64, q: i64| p.wrapping_div(q))
            }
        }?,
        _ => return Err(format!("{op:?} is not defined for {dtype} tensors")),
    }
    let mut t = Tensor { dtype, shape, data };
    normalize(&mut t);
    Ok(t)
}

fn compare<T: PartialOrd + Copy + Sync>(
    op: BinaryOp,
    x: &[T],
    xs: &[usize],
    y: &[T],
    ys: &[usize],
) -> KResult<(Vec<usize>, Vec<bool>)> {
    use BinaryOp::*;
    match op {
        Equal => zip_broadcast(x, xs, y, ys, |p, q| p == q),
        Less => zip_broadcast(x, xs, y, ys, |p, q| p < q),
        LessOrEqual => zip_broadcast(x, xs, y, ys, |p, q| p <= q),
        Greater => zip_broadcast(x, xs, y, ys, |p, q| p > q),
        _ => zip_broadcast(x, xs, y, ys, |p, q| p >= q),
    }
}

/// Integer power by squaring, wrapping like fixed-width arithmetic.
fn ipow(base: i64, exp: i64) -> i64 {
    if exp < 0 {
        // What numpy would compute through floats: 1/base^|exp|, truncated.
        return match base {
            1 => 1,
            -1 => {
                if exp % 2 == 0 {
                    1
                } else {
                    -1
                }
            }
            _ => 0,
        };
    }
    let (mut result, mut b, mut e) = (1i64, base, exp as u64);
    while e > 0 {
        if e & 1 == 1 {
            result = result.wrapping_mul(b);
        }
        b = b.wrapping_mul(b);
        e >>= 1;
    }
    result
}

/// `Pow`: the result has the base's type; the exponent may be any numeric
/// type (ONNX opset 12+). Mixed-type powers are computed in f64, as numpy
/// promotes them, then converted back (truncating for integer bases).
fn pow(a: &Tensor, b: &Tensor) -> KResult<Tensor> {
    use TensorData as D;
    let (xs, ys) = (&a.shape[..], &b.shape[..]);
    let (shape, data) = match (&a.data, &b.data) {
        (D::F32(x), D::F32(y)) => {
            // x² is by far the most common power (RMSNorm, variance).
            let (s, v) = if y.len() == 1 && y[0] == 2.0 && ys.len() <= xs.len() {
                let shape = broadcast_shapes(xs, ys)?;
                (shape, map(x, |p| p * p))
            } else {
                zip_broadcast(x, xs, y, ys, |p: f32, q: f32| p.powf(q))?
            };
            (s, D::F32(v))
        }
        (D::F32(x), D::F64(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: f32, q: f64| (p as f64).powf(q) as f32)?;
            (s, D::F32(v))
        }
        (D::F32(x), D::I64(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: f32, q: i64| {
                (p as f64).powf(q as f64) as f32
            })?;
            (s, D::F32(v))
        }
        (D::F64(x), D::F32(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: f64, q: f32| p.powf(q as f64))?;
            (s, D::F64(v))
        }
        (D::F64(x), D::F64(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: f64, q: f64| p.powf(q))?;
            (s, D::F64(v))
        }
        (D::F64(x), D::I64(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: f64, q: i64| p.powf(q as f64))?;
            (s, D::F64(v))
        }
        (D::I64(x), D::I64(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, ipow)?;
            (s, D::I64(v))
        }
        (D::I64(x), D::F32(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: i64, q: f32| {
                (p as f64).powf(q as f64) as i64
            })?;
            (s, D::I64(v))
        }
        (D::I64(x), D::F64(y)) => {
            let (s, v) = zip_broadcast(x, xs, y, ys, |p: i64, q: f64| (p as f64).powf(q) as i64)?;
            (s, D::I64(v))
        }
        _ => {
            return Err(format!(
                "Pow is not defined for a {} base and a {} exponent",
                a.dtype, b.dtype
            ))
        }
    };
    let mut t = Tensor {
        dtype: a.dtype,
        shape,
        data,
    };
    normalize(&mut t);
    Ok(t)
}

/// `Max`, `Min`, `Sum` over any number of broadcast operands.
pub fn variadic(op: VariadicOp, inputs: &[&Tensor]) -> KResult<Tensor> {
    use TensorData as D;
    let (first, rest) = inputs
        .split_first()
        .ok_or_else(|| format!("{op:?} needs at least one input"))?;
    if first.dtype == DType::Bool {
        return Err(format!("{op:?} is not defined for bool tensors"));
    }
    let mut acc = (*first).clone();
    for &x in rest {
        let dtype = common_dtype(&format!("{op:?}"), &acc, x)?;
        let (xs, ys) = (&acc.shape[..], &x.shape[..]);
        let (shape, data) = match (&acc.data, &x.data) {
            (D::F32(p), D::F32(q)) => {
                let (s, v) = match op {
                    VariadicOp::Max => zip_broadcast(p, xs, q, ys, max_f)?,
                    VariadicOp::Min => zip_broadcast(p, xs, q, ys, min_f)?,
                    VariadicOp::Sum => zip_broadcast(p, xs, q, ys, |a, b| a + b)?,
                };
                (s, D::F32(v))
            }
            (D::F64(p), D::F64(q)) => {
                let (s, v) = match op {
                    VariadicOp::Max => zip_broadcast(p, xs, q, ys, max_f)?,
                    VariadicOp::Min => zip_broadcast(p, xs, q, ys, min_f)?,
                    VariadicOp::Sum => zip_broadcast(p, xs, q, ys, |a, b| a + b)?,
                };
                (s, D::F64(v))
            }
            (D::I64(p), D::I64(q)) => {
                let (s, v) = match op {
                    VariadicOp::Max => zip_broadcast(p, xs, q, ys, |a: i64, b: i64| a.max(b))?,
                    VariadicOp::Min => zip_broadcast(p, xs, q, ys, |a: i64, b: i64| a.min(b))?,
                    VariadicOp::Sum => {
                        zip_broadcast(p, xs, q, ys, |a: i64, b: i64| a.wrapping_add(b))?
                    }
                };
                (s, D::I64(v))
            }
            _ => unreachable!("same dtype implies same storage"),
        };
        acc = Tensor { dtype, shape, data };
        normalize(&mut acc);
    }
    Ok(acc)
}

/// `Where(cond, x, y)`.
pub fn where_op(c: &Tensor, x: &Tensor, y: &Tensor) -> KResult<Tensor> {
    use TensorData as D;
    let D::Bool(cv) = &c.data else {
        return Err(format!("the condition must be bool, got {}", c.dtype));
    };
    let dtype = common_dtype("Where", x, y)?;
    let (cs, xs, ys) = (&c.shape[..], &x.shape[..], &y.shape[..]);
    let (shape, data) = match (&x.data, &y.data) {
        (D::F32(p), D::F32(q)) => {
            let (s, v) = where_zip(cv, cs, p, xs, q, ys)?;
            (s, D::F32(v))
        }
        (D::F64(p), D::F64(q)) => {
            let (s, v) = where_zip(cv, cs, p, xs, q, ys)?;
            (s, D::F64(v))
        }
        (D::I64(p), D::I64(q)) => {
            let (s, v) = where_zip(cv, cs, p, xs, q, ys)?;
            (s, D::I64(v))
        }
        (D::Bool(p), D::Bool(q)) => {
            let (s, v) = where_zip(cv, cs, p, xs, q, ys)?;
            (s, D::Bool(v))
        }
        _ => unreachable!("same dtype implies same storage"),
    };
    Ok(Tensor { dtype, shape, data })
}

// ---------------------------------------------------------------------------
// Cast
// ---------------------------------------------------------------------------

fn int_width(to: DType, x: i64) -> i64 {
    match to {
        DType::I32 => x as i32 as i64,
        DType::I8 => x as i8 as i64,
        DType::U8 => x as u8 as i64,
        _ => x,
    }
}

/// A float to an integer type: truncation toward zero, saturating at the
/// target's range (NaN becomes 0).
fn float_to_int(to: DType, x: f64) -> i64 {
    match to {
        DType::I32 => x as i32 as i64,
        DType::I8 => x as i8 as i64,
        DType::U8 => x as u8 as i64,
        _ => x as i64,
    }
}

/// `Cast` to any dtype. Floats to integers truncate toward zero; casts to
/// f16/bf16 round to nearest-even at that precision (the values stay held
/// as f32); casts to bool test `x != 0`.
pub fn cast(x: &Tensor, to: DType) -> KResult<Tensor> {
    use TensorData as D;
    let data = match to {
        DType::F32 | DType::F16 | DType::BF16 => {
            let round: fn(f64) -> f32 = match to {
                DType::F16 => |v| half::f16::from_f64(v).to_f32(),
                DType::BF16 => |v| half::bf16::from_f64(v).to_f32(),
                _ => |v| v as f32,
            };
            D::F32(match &x.data {
                D::F32(v) => match to {
                    // f32 → f16/bf16 directly (no double rounding via f64).
                    DType::F16 => map(v, |p| half::f16::from_f32(p).to_f32()),
                    DType::BF16 => map(v, |p| half::bf16::from_f32(p).to_f32()),
                    _ => v.clone(),
                },
                D::F64(v) => map(v, round),
                D::I64(v) => map(v, |p| round(p as f64)),
                D::Bool(v) => map(v, |p| p as u8 as f32),
            })
        }
        DType::F64 => D::F64(match &x.data {
            D::F32(v) => map(v, |p| p as f64),
            D::F64(v) => v.clone(),
            D::I64(v) => map(v, |p| p as f64),
            D::Bool(v) => map(v, |p| p as u8 as f64),
        }),
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => D::I64(match &x.data {
            D::F32(v) => map(v, |p| float_to_int(to, p as f64)),
            D::F64(v) => map(v, |p| float_to_int(to, p)),
            D::I64(v) => map(v, |p| int_width(to, p)),
            D::Bool(v) => map(v, |p| p as i64),
        }),
        DType::Bool => D::Bool(match &x.data {
            D::F32(v) => map(v, |p| p != 0.0),
            D::F64(v) => map(v, |p| p != 0.0),
            D::I64(v) => map(v, |p| p != 0),
            D::Bool(v) => v.clone(),
        }),
    };
    Ok(Tensor {
        dtype: to,
        shape: x.shape.clone(),
        data,
    })
}

// ---------------------------------------------------------------------------
// Scans, masks and generators
// ---------------------------------------------------------------------------

fn scalar_i64(t: &Tensor, what: &str) -> KResult<i64> {
    if t.numel() != 1 {
        return Err(format!(
            "{what} must hold one value, got shape {:?}",
            t.shape
        ));
    }
    match &t.data {
        TensorData::I64(v) => Ok(v[0]),
        _ => Err(format!("{what} must be an integer, got {}", t.dtype)),
    }
}

fn cumsum_typed<T>(
    x: &[T],
    outer: usize,
    len: usize,
    inner: usize,
    exclusive: bool,
    reverse: bool,
    add: impl Fn(T, T) -> T + Sync + Send,
) -> KResult<Vec<T>>
where
    T: Copy + Default + Send + Sync,
{
    let mut out = alloc::<T>(outer * len * inner)?;
    let block = len * inner;
    if block == 0 {
        return Ok(out);
    }
    let scan = |src: &[T], dst: &mut [T]| {
        // Rows along the axis, in scan order; each row accumulates from the
        // previous output row, so no scratch buffer is needed.
        for step in 0..len {
            let k = if reverse { len - 1 - step } else { step };
            let row = k * inner..(k + 1) * inner;
            if step == 0 {
                if exclusive {
                    dst[row].fill(T::default());
                } else {
                    dst[row.clone()].copy_from_slice(&src[row]);
                }
                continue;
            }
            let prev = if reverse { k + 1 } else { k - 1 };
            let (lo, hi) = dst.split_at_mut(k.max(prev) * inner);
            let (cur, before) = if reverse {
                (&mut lo[k * inner..(k + 1) * inner], &hi[..inner])
            } else {
                (&mut hi[..inner], &lo[prev * inner..(prev + 1) * inner])
            };
            let addend = if exclusive {
                &src[prev * inner..(prev + 1) * inner]
            } else {
                &src[row]
            };
            for ((c, &b), &a) in cur.iter_mut().zip(before).zip(addend) {
                *c = add(b, a);
            }
        }
    };
    if out.len() >= PAR_MIN && outer > 1 {
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(d, s)| scan(s, d));
    } else {
        for (d, s) in out.chunks_mut(block).zip(x.chunks(block)) {
            scan(s, d);
        }
    }
    Ok(out)
}

/// `CumSum(x, axis)`, optionally exclusive and/or reversed.
pub fn cumsum(x: &Tensor, axis: &Tensor, exclusive: bool, reverse: bool) -> KResult<Tensor> {
    use TensorData as D;
    let axis = norm_axis(scalar_i64(axis, "the axis")?, x.rank(), "axis")?;
    let outer: usize = x.shape[..axis].iter().product();
    let len = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let data = match &x.data {
        D::F32(v) => D::F32(cumsum_typed(
            v,
            outer,
            len,
            inner,
            exclusive,
            reverse,
            |a, b| a + b,
        )?),
        D::F64(v) => D::F64(cumsum_typed(
            v,
            outer,
            len,
            inner,
            exclusive,
            reverse,
            |a, b| a + b,
        )?),
        D::I64(v) => D::I64(cumsum_typed(
            v,
            outer,
            len,
            inner,
            exclusive,
            reverse,
            |a: i64, b: i64| a.wrapping_add(b),
        )?),
        D::Bool(_) => return Err("CumSum is not defined for bool tensors".into()),
    };
    let mut t = Tensor {
        dtype: x.dtype,
        shape: x.shape.clone(),
        data,
    };
    normalize(&mut t);
    Ok(t)
}

/// `Trilu`: keeps the upper (`j - i >= k`) or lower (`j - i <= k`) triangle
/// of the last two dimensions, zeroing the rest; batched over the leading
/// dimensions.
pub fn trilu(x: &Tensor, k: Option<&Tensor>, upper: bool) -> KResult<Tensor> {
    let r = x.rank();
    if r < 2 {
        return Err(format!(
            "Trilu needs a tensor of rank 2 or more, got shape {:?}",
            x.shape
        ));
    }
    let k = match k {
        Some(t) => scalar_i64(t, "k")?,
        None => 0,
    };
    let (n, m) = (x.shape[r - 2], x.shape[r - 1]);
    let mut out = x.clone();
    if n == 0 || m == 0 {
        return Ok(out);
    }
    // For row i, the zeroed columns are [0, i+k) (upper) or [i+k+1, m) (lower).
    fn zero_row<T: Copy + Default>(row: &mut [T], i: usize, k: i64, upper: bool) {
        let m = row.len() as i64;
        let (lo, hi) = if upper {
            (0, (i as i64).saturating_add(k).clamp(0, m))
        } else {
            (
                (i as i64).saturating_add(k).saturating_add(1).clamp(0, m),
                m,
            )
        };
        row[lo as usize..hi as usize].fill(T::default());
    }
    fn apply_rows<T: Copy + Default>(v: &mut [T], n: usize, m: usize, k: i64, upper: bool) {
        for (r, row) in v.chunks_mut(m).enumerate() {
            zero_row(row, r % n, k, upper);
        }
    }
    match &mut out.data {
        TensorData::F32(v) => apply_rows(v, n, m, k, upper),
        TensorData::F64(v) => apply_rows(v, n, m, k, upper),
        TensorData::I64(v) => apply_rows(v, n, m, k, upper),
        TensorData::Bool(v) => apply_rows(v, n, m, k, upper),
    }
    Ok(out)
}

fn filled<T: Clone>(n: usize, value: T) -> KResult<Vec<T>> {
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    if let Some(why) = crate::memory::shortfall(bytes) {
        return Err(format!("an output of {n} elements needs {why}"));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| format!("cannot allocate {n} elements"))?;
    v.resize(n, value);
    Ok(v)
}

/// Reads a 1-D shape tensor (ConstantOfShape, Expand, Reshape).
pub fn shape_values(t: &Tensor, what: &str) -> KResult<Vec<i64>> {
    if t.rank() > 1 {
        return Err(format!(
            "{what} must be a 1-D tensor, got shape {:?}",
            t.shape
        ));
    }
    match &t.data {
        TensorData::I64(v) => Ok(v.clone()),
        _ => Err(format!("{what} must be an integer tensor, got {}", t.dtype)),
    }
}

/// `ConstantOfShape(shape)`: `value` (one element; default f32 0) repeated.
pub fn constant_of_shape(shape: &Tensor, value: Option<&Tensor>) -> KResult<Tensor> {
    let dims = shape_values(shape, "the shape")?;
    let mut out_shape = Vec::with_capacity(dims.len());
    for &d in &dims {
        if d < 0 {
            return Err(format!("the shape {dims:?} has a negative dimension"));
        }
        out_shape.push(usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))?);
    }
    let n = numel(&out_shape)?;
    let zero = Tensor::scalar_f32(0.0);
    let value = value.unwrap_or(&zero);
    if value.numel() != 1 {
        return Err(format!(
            "the value must hold one element, got shape {:?}",
            value.shape
        ));
    }
    let data = map_data!(&value.data, v => filled(n, v[0])?);
    Ok(Tensor {
        dtype: value.dtype,
        shape: out_shape,
        data,
    })
}

/// `Range(start, limit, delta)`: `max(ceil((limit - start) / delta), 0)`
/// values `start + i·delta`.
pub fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> KResult<Tensor> {
    use TensorData as D;
    for (t, what) in [(start, "start"), (limit, "limit"), (delta, "delta")] {
        if t.numel() != 1 {
            return Err(format!("{what} must be a scalar, got shape {:?}", t.shape));
        }
    }
    same_dtype("Range", start, limit)?;
    same_dtype("Range", start, delta)?;
    // Refuse absurd lengths before allocating (a bad delta would otherwise
    // ask for exabytes).
    const MAX_LEN: f64 = (1u64 << 40) as f64;
    let data = match (&start.data, &limit.data, &delta.data) {
        (D::I64(s), D::I64(l), D::I64(d)) => {
            let (s, l, d) = (s[0], l[0], d[0]);
            if d == 0 {
                return Err("delta must not be zero".into());
            }
            let span = l as i128 - s as i128;
            let d128 = d as i128;
            // ceil(span / d) for either sign of d.
            let q = span / d128;
            let n = if span % d128 != 0 && ((span > 0) == (d128 > 0)) {
                q + 1
            } else {
                q
            }
            .max(0);
            if n as f64 > MAX_LEN {
                return Err(format!("Range would produce {n} values"));
            }
            let n = n as usize;
            let mut v = alloc::<i64>(n)?;
            for (i, o) in v.iter_mut().enumerate() {
                *o = s.wrapping_add((i as i64).wrapping_mul(d));
            }
            D::I64(v)
        }
        (D::F32(s), D::F32(l), D::F32(d)) => {
            let v = float_range(s[0] as f64, l[0] as f64, d[0] as f64, MAX_LEN)?;
            D::F32(v.into_iter().map(|x| x as f32).collect())
        }
        (D::F64(s), D::F64(l), D::F64(d)) => D::F64(float_range(s[0], l[0], d[0], MAX_LEN)?),
        _ => return Err(format!("Range is not defined for {} tensors", start.dtype)),
    };
    let n = data.len();
    let mut t = Tensor {
        dtype: start.dtype,
        shape: vec![n],
        data,
    };
    normalize(&mut t);
    Ok(t)
}

fn float_range(s: f64, l: f64, d: f64, max_len: f64) -> KResult<Vec<f64>> {
    if d == 0.0 {
        return Err("delta must not be zero".into());
    }
    let n = ((l - s) / d).ceil().max(0.0);
    if !n.is_finite() || n > max_len {
        return Err(format!("Range({s}, {l}, {d}) would produce {n} values"));
    }
    let n = n as usize;
    let mut v = alloc::<f64>(n)?;
    for (i, o) in v.iter_mut().enumerate() {
        *o = s + i as f64 * d;
    }
    Ok(v)
}

#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    fn f(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::f32(shape.to_vec(), v.to_vec())
    }
    fn i(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::i64(shape.to_vec(), v.to_vec())
    }
    fn b(shape: &[usize], v: &[bool]) -> Tensor {
        Tensor::bool(shape.to_vec(), v.to_vec())
    }
    fn typed(dtype: DType, t: Tensor) -> Tensor {
        Tensor { dtype, ..t }
    }

    #[test]
    fn add_broadcasting_corner_cases() {
        // [2,3] + [3]
        let r = binary(
            BinaryOp::Add,
            &f(&[2, 3], &[1., 2., 3., 4., 5., 6.]),
            &f(&[3], &[10., 20., 30.]),
        )
        .unwrap();
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.as_f32().unwrap(), &[11., 22., 33., 14., 25., 36.]);
        // [2,1] + [1,3] -> outer sum
        let r = binary(
            BinaryOp::Sub,
            &f(&[2, 1], &[10., 20.]),
            &f(&[1, 3], &[1., 2., 3.]),
        )
        .unwrap();
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.as_f32().unwrap(), &[9., 8., 7., 19., 18., 17.]);
        // scalar (rank 0) on the left
        let r = binary(BinaryOp::Mul, &f(&[], &[2.]), &f(&[2], &[3., 4.])).unwrap();
        assert_eq!(r.shape, vec![2]);
        assert_eq!(r.as_f32().unwrap(), &[6., 8.]);
        // empty tensor broadcast with [1]
        let r = binary(BinaryOp::Add, &f(&[0, 3], &[]), &f(&[1], &[1.])).unwrap();
        assert_eq!(r.shape, vec![0, 3]);
        assert_eq!(r.numel(), 0);
        // middle-dim broadcast: [2,1,2] * [1,3,1]
        let r = binary(
            BinaryOp::Mul,
            &f(&[2, 1, 2], &[1., 2., 3., 4.]),
            &f(&[1, 3, 1], &[1., 10., 100.]),
        )
        .unwrap();
        assert_eq!(r.shape, vec![2, 3, 2]);
        assert_eq!(
            r.as_f32().unwrap(),
            &[1., 2., 10., 20., 100., 200., 3., 4., 30., 40., 300., 400.]
        );
        // incompatible
        let e = binary(BinaryOp::Add, &f(&[2], &[1., 2.]), &f(&[3], &[1., 2., 3.])).unwrap_err();
        assert!(e.contains("do not broadcast"), "{e}");
        // f32 activations meet a bf16-stored weight: the result is f32
        let w = typed(DType::BF16, f(&[2], &[0.5, 1.5]));
        let r = binary(BinaryOp::Mul, &f(&[2], &[2., 2.]), &w).unwrap();
        assert_eq!(r.dtype, DType::F32);
        assert_eq!(r.as_f32().unwrap(), &[1., 3.]);
        let r = binary(BinaryOp::Add, &w, &w).unwrap();
        assert_eq!(r.dtype, DType::BF16);
        // mismatched dtypes
        let e = binary(BinaryOp::Add, &f(&[1], &[1.]), &i(&[1], &[1])).unwrap_err();
        assert!(e.contains("differ"), "{e}");
    }

    #[test]
    fn large_broadcast_matches_naive() {
        let (m, n) = (300, 257);
        let a: Vec<f32> = (0..m * n).map(|k| k as f32 * 0.5).collect();
        let bv: Vec<f32> = (0..m).map(|k| k as f32).collect();
        let r = binary(BinaryOp::Sub, &f(&[m, n], &a), &f(&[m, 1], &bv)).unwrap();
        let got = r.as_f32().unwrap();
        for row in 0..m {
            for col in 0..n {
                assert_eq!(got[row * n + col], a[row * n + col] - row as f32);
            }
        }
    }

    #[test]
    fn integer_arithmetic_truncates_and_wraps() {
        let r = binary(
            BinaryOp::Div,
            &i(&[4], &[7, -7, 7, -7]),
            &i(&[4], &[2, 2, -2, -2]),
        )
        .unwrap();
        assert_eq!(r.as_i64().unwrap(), &[3, -3, -3, 3]);
        let e = binary(BinaryOp::Div, &i(&[1], &[1]), &i(&[1], &[0])).unwrap_err();
        assert!(e.contains("division by zero"));
        // u8 wraps like numpy
        let a = typed(DType::U8, i(&[2], &[3, 250]));
        let c = typed(DType::U8, i(&[2], &[5, 10]));
        let r = binary(BinaryOp::Sub, &a, &c).unwrap();
        assert_eq!(r.dtype, DType::U8);
        assert_eq!(r.as_i64().unwrap(), &[254, 240]);
        let r = binary(BinaryOp::Add, &a, &c).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[8, 4]);
    }

    #[test]
    fn owned_binary_matches_borrowed() {
        let a = f(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let c = f(&[3], &[1., 2., 4.]);
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            let want = binary(op, &a, &c).unwrap();
            assert_eq!(binary_owned(op, a.clone(), &c).unwrap(), want);
        }
        // a would have to grow: falls back.
        let r = binary_owned(BinaryOp::Add, c.clone(), &a).unwrap();
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.as_f32().unwrap(), &[2., 4., 7., 5., 7., 10.]);
    }

    #[test]
    fn comparisons_and_logic() {
        let x = f(&[3], &[1., 2., 3.]);
        let y = f(&[], &[2.]);
        let cases = [
            (BinaryOp::Equal, [false, true, false]),
            (BinaryOp::Less, [true, false, false]),
            (BinaryOp::LessOrEqual, [true, true, false]),
            (BinaryOp::Greater, [false, false, true]),
            (BinaryOp::GreaterOrEqual, [false, true, true]),
        ];
        for (op, want) in cases {
            let r = binary(op, &x, &y).unwrap();
            assert_eq!(r.dtype, DType::Bool);
            assert_eq!(r.as_bool().unwrap(), &want, "{op:?}");
        }
        let p = b(&[2, 2], &[true, true, false, false]);
        let q = b(&[2], &[true, false]);
        assert_eq!(
            binary(BinaryOp::And, &p, &q).unwrap().as_bool().unwrap(),
            &[true, false, false, false]
        );
        assert_eq!(
            binary(BinaryOp::Or, &p, &q).unwrap().as_bool().unwrap(),
            &[true, true, true, false]
        );
        assert!(binary(BinaryOp::And, &x, &x).is_err());
        // NaN compares unequal
        let n = f(&[1], &[f32::NAN]);
        assert_eq!(
            binary(BinaryOp::Equal, &n, &n).unwrap().as_bool().unwrap(),
            &[false]
        );
    }

    #[test]
    fn pow_mixed_types() {
        let r = binary(BinaryOp::Pow, &f(&[3], &[1., 2., 3.]), &f(&[], &[2.])).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[1., 4., 9.]);
        let r = binary(BinaryOp::Pow, &f(&[2], &[2., 4.]), &i(&[2], &[3, -1])).unwrap();
        assert_eq!(r.dtype, DType::F32);
        assert_eq!(r.as_f32().unwrap(), &[8., 0.25]);
        let r = binary(BinaryOp::Pow, &i(&[3], &[1, 2, 3]), &f(&[3], &[1., 2., 3.])).unwrap();
        assert_eq!(r.dtype, DType::I64);
        assert_eq!(r.as_i64().unwrap(), &[1, 4, 27]);
        let r = binary(BinaryOp::Pow, &i(&[3], &[2, -3, 5]), &i(&[3], &[10, 3, 0])).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[1024, -27, 1]);
        let r = binary(BinaryOp::Pow, &f(&[1], &[4.]), &f(&[1], &[0.5])).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[2.]);
    }

    #[test]
    fn unary_values() {
        let x = f(&[4], &[-1.5, 0., 0.5, 2.]);
        let get = |op| unary(op, &x).unwrap().as_f32().unwrap().to_vec();
        assert_eq!(get(UnaryOp::Neg), vec![1.5, -0., -0.5, -2.]);
        assert_eq!(get(UnaryOp::Abs), vec![1.5, 0., 0.5, 2.]);
        assert_eq!(get(UnaryOp::Relu), vec![0., 0., 0.5, 2.]);
        assert_eq!(get(UnaryOp::Floor), vec![-2., 0., 0., 2.]);
        assert_eq!(get(UnaryOp::Ceil), vec![-1., 0., 1., 2.]);
        let s = get(UnaryOp::Sigmoid);
        let want = [0.18242552, 0.5, 0.62245935, 0.880797];
        for (g, w) in s.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        let e = get(UnaryOp::Erf);
        let want = [-0.96610515, 0., 0.52049988, 0.99532227];
        for (g, w) in e.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{g} vs {w}");
        }
        // extreme sigmoid inputs stay finite
        let big = unary(UnaryOp::Sigmoid, &f(&[2], &[-100., 100.])).unwrap();
        let big = big.as_f32().unwrap();
        assert!(big[0] > 0.0 && big[0] < 1e-40, "{}", big[0]);
        assert_eq!(big[1], 1.0);
        let r = unary(UnaryOp::Reciprocal, &f(&[2], &[4., -0.5])).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[0.25, -2.]);
        let r = unary(UnaryOp::Sqrt, &f(&[2], &[9., -1.])).unwrap();
        assert_eq!(r.as_f32().unwrap()[0], 3.);
        assert!(r.as_f32().unwrap()[1].is_nan());
        let r = unary(UnaryOp::Not, &b(&[2], &[true, false])).unwrap();
        assert_eq!(r.as_bool().unwrap(), &[false, true]);
        assert!(unary(UnaryOp::Not, &x).is_err());
        assert!(unary(UnaryOp::Exp, &i(&[1], &[1])).is_err());
        let r = unary(UnaryOp::Neg, &i(&[2], &[3, -4])).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[-3, 4]);
        // owned form gives the same
        let pos = f(&[3], &[0.25, 1.0, 3.0]);
        for op in [
            UnaryOp::Exp,
            UnaryOp::Tanh,
            UnaryOp::Log,
            UnaryOp::Cos,
            UnaryOp::Sin,
        ] {
            assert_eq!(
                unary_owned(op, pos.clone()).unwrap(),
                unary(op, &pos).unwrap()
            );
        }
        let r = unary(UnaryOp::Log, &pos).unwrap();
        assert_eq!(r.as_f32().unwrap()[1], 0.0);
        // f16 results are rounded to f16
        let h = typed(DType::F16, f(&[1], &[1.0]));
        let r = unary(UnaryOp::Exp, &h).unwrap();
        assert_eq!(r.dtype, DType::F16);
        assert_eq!(
            r.as_f32().unwrap(),
            &[half::f16::from_f32(std::f32::consts::E).to_f32()]
        );
    }

    #[test]
    fn variadic_and_where() {
        let a = f(&[3], &[1., 5., 3.]);
        let c = f(&[3], &[4., 2., f32::NAN]);
        let d = f(&[], &[2.5]);
        let r = variadic(VariadicOp::Max, &[&a, &c, &d]).unwrap();
        let v = r.as_f32().unwrap();
        assert_eq!(&v[..2], &[4., 5.]);
        assert!(v[2].is_nan());
        let r = variadic(VariadicOp::Min, &[&a, &d]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[1., 2.5, 2.5]);
        let r = variadic(VariadicOp::Sum, &[&a, &a, &d]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[4.5, 12.5, 8.5]);
        let r = variadic(VariadicOp::Sum, &[&a]).unwrap();
        assert_eq!(r, a);
        let r = variadic(VariadicOp::Max, &[&i(&[2], &[1, 9]), &i(&[2, 1], &[5, 0])]).unwrap();
        assert_eq!(r.shape, vec![2, 2]);
        assert_eq!(r.as_i64().unwrap(), &[5, 9, 1, 9]);

        let cond = b(&[2, 2], &[true, false, false, true]);
        let r = where_op(&cond, &f(&[2], &[1., 2.]), &f(&[], &[-1.])).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[1., -1., -1., 2.]);
        let r = where_op(
            &b(&[2, 1], &[true, false]),
            &i(&[1, 3], &[1, 2, 3]),
            &i(&[3], &[7, 8, 9]),
        )
        .unwrap();
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.as_i64().unwrap(), &[1, 2, 3, 7, 8, 9]);
        assert!(where_op(&a, &a, &a).is_err());
    }

    #[test]
    fn cast_rounding_and_truncation() {
        let x = f(
            &[5],
            &[1.7, -1.7, 0.0, 65519.0, 1.0 + 1.0 / 1024.0 + 1.0 / 4096.0],
        );
        let r = cast(&x, DType::I64).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[1, -1, 0, 65519, 1]);
        let r = cast(&x, DType::Bool).unwrap();
        assert_eq!(r.as_bool().unwrap(), &[true, true, false, true, true]);
        // f16: 1.7 -> 1.7001953125; 65519 rounds to 65504; 1+2^-10+2^-12 -> 1+2^-10
        let r = cast(&x, DType::F16).unwrap();
        assert_eq!(r.dtype, DType::F16);
        assert_eq!(
            r.as_f32().unwrap(),
            &[
                1.7001953125,
                -1.7001953125,
                0.0,
                65504.0,
                1.0 + 1.0 / 1024.0
            ]
        );
        // bf16 keeps 8 bits of mantissa: 1.7 -> 1.703125
        let r = cast(&x, DType::BF16).unwrap();
        assert_eq!(r.as_f32().unwrap()[..3], [1.703125, -1.703125, 0.0]);
        assert_eq!(r.as_f32().unwrap()[3], 65536.0);
        // f64 -> f16 rounds once, from the f64 value
        let d = Tensor {
            dtype: DType::F64,
            shape: vec![1],
            data: TensorData::F64(vec![0.1]),
        };
        let r = cast(&d, DType::F16).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[0.0999755859375]);
        // ints narrow by wrapping, bools become 0/1
        let r = cast(&i(&[2], &[300, -1]), DType::U8).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[44, 255]);
        let r = cast(&b(&[2], &[true, false]), DType::F32).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[1., 0.]);
        let r = cast(&i(&[2], &[3, -2]), DType::F64).unwrap();
        assert_eq!(r.data, TensorData::F64(vec![3., -2.]));
        let r = cast(&f(&[1], &[f32::NAN]), DType::I32).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[0]);
    }

    #[test]
    fn cumsum_modes() {
        let x = Tensor {
            dtype: DType::F64,
            shape: vec![5],
            data: TensorData::F64(vec![1., 2., 3., 4., 5.]),
        };
        let ax = i(&[], &[0]);
        let get = |e, r| match cumsum(&x, &ax, e, r).unwrap().data {
            TensorData::F64(v) => v,
            _ => unreachable!(),
        };
        assert_eq!(get(false, false), vec![1., 3., 6., 10., 15.]);
        assert_eq!(get(true, false), vec![0., 1., 3., 6., 10.]);
        assert_eq!(get(false, true), vec![15., 14., 12., 9., 5.]);
        assert_eq!(get(true, true), vec![14., 12., 9., 5., 0.]);
        // 2-D along axis 1 given as -1, and axis 0
        let m = i(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let r = cumsum(&m, &i(&[1], &[-1]), false, false).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[1, 3, 6, 4, 9, 15]);
        let r = cumsum(&m, &i(&[], &[0]), true, true).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[4, 5, 6, 0, 0, 0]);
        assert!(cumsum(&m, &i(&[], &[2]), false, false).is_err());
    }

    #[test]
    fn trilu_variants() {
        let x = i(&[3, 4], &(1..=12).collect::<Vec<_>>());
        let up = trilu(&x, None, true).unwrap();
        assert_eq!(
            up.as_i64().unwrap(),
            &[1, 2, 3, 4, 0, 6, 7, 8, 0, 0, 11, 12]
        );
        let lo = trilu(&x, Some(&i(&[], &[-1])), false).unwrap();
        assert_eq!(lo.as_i64().unwrap(), &[0, 0, 0, 0, 5, 0, 0, 0, 9, 10, 0, 0]);
        let up = trilu(&x, Some(&i(&[], &[2])), true).unwrap();
        assert_eq!(up.as_i64().unwrap(), &[0, 0, 3, 4, 0, 0, 0, 8, 0, 0, 0, 0]);
        let lo = trilu(&x, Some(&i(&[], &[10])), false).unwrap();
        assert_eq!(lo, x);
        // batched: each [2,2] matrix separately
        let y = f(&[2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
        let lo = trilu(&y, None, false).unwrap();
        assert_eq!(lo.as_f32().unwrap(), &[1., 0., 3., 4., 5., 0., 7., 8.]);
        assert!(trilu(&f(&[2], &[1., 2.]), None, true).is_err());
    }

    #[test]
    fn generators() {
        let r = constant_of_shape(&i(&[2], &[2, 3]), None).unwrap();
        assert_eq!(r.dtype, DType::F32);
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.as_f32().unwrap(), &[0.; 6]);
        let v = typed(DType::I32, i(&[1], &[7]));
        let r = constant_of_shape(&i(&[1], &[3]), Some(&v)).unwrap();
        assert_eq!(r.dtype, DType::I32);
        assert_eq!(r.as_i64().unwrap(), &[7, 7, 7]);
        let r = constant_of_shape(&i(&[2], &[0, 4]), Some(&v)).unwrap();
        assert_eq!(r.shape, vec![0, 4]);
        assert!(constant_of_shape(&i(&[1], &[-1]), None).is_err());
        assert!(constant_of_shape(&i(&[2], &[1 << 40, 1 << 40]), None).is_err());

        let r = range(&i(&[], &[10]), &i(&[], &[4]), &i(&[], &[-3])).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[10, 7]);
        let r = range(&i(&[], &[0]), &i(&[], &[5]), &i(&[], &[2])).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[0, 2, 4]);
        let r = range(&i(&[], &[5]), &i(&[], &[0]), &i(&[], &[2])).unwrap();
        assert_eq!(r.shape, vec![0]);
        let r = range(&f(&[], &[1.]), &f(&[], &[2.]), &f(&[], &[0.3])).unwrap();
        let got = r.as_f32().unwrap();
        assert_eq!(got.len(), 4);
        for (g, w) in got.iter().zip([1.0, 1.3, 1.6, 1.9]) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(range(&f(&[], &[0.]), &f(&[], &[1.]), &f(&[], &[0.])).is_err());
        assert!(range(&f(&[], &[0.]), &f(&[], &[1e30]), &f(&[], &[1e-30])).is_err());
    }
}
