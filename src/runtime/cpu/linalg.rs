//! Matrix products on the CPU: ONNX `MatMul` (numpy semantics) and `Gemm`,
//! and the strided product every f32/f64 kernel goes through (the `gemm`
//! crate, rayon-parallel for large products).
//!
//! Also home of [`Real`], the small float trait the kernels here and in
//! [`super::kernels`] are generic over (f32 for f32/f16/bf16 tensors, f64
//! for f64).

use super::vmath;
use crate::ir::tensor::checked_numel;
use crate::ir::{DType, Tensor, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

/// A float type the kernels compute in. f16/bf16 tensors are held as f32 and
/// computed in f32; their results are rounded back by [`Real::round_storage`].
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    const INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn is_nan(self) -> bool;
    /// The tensor's values if they are held in this type.
    fn slice(data: &TensorData) -> Option<&[Self]>;
    fn into_data(v: Vec<Self>) -> TensorData;
    /// Rounds to the precision of the logical dtype (f16/bf16 held as f32).
    fn round_storage(dtype: DType, v: &mut [Self]);
    /// Rounds one value to the precision of the logical dtype.
    fn round_one(dtype: DType, x: Self) -> Self;

    /// A zeroed output buffer (f32 ones come from the session's buffer
    /// pool when there is one; see `pool`).
    fn zeroed(len: usize) -> Vec<Self> {
        vec![Self::ZERO; len]
    }
    /// A copy of `src` in an output buffer.
    fn copy_of(src: &[Self]) -> Vec<Self> {
        src.to_vec()
    }
    /// Gives a scratch buffer back (f32 ones to the session's pool).
    fn recycle(v: Vec<Self>) {
        drop(v)
    }

    // Slice kernels of the hot loops. The defaults are the plain library
    // math (f64 keeps them: it serves exact finite-difference checks); f32
    // overrides them with the vectorised `vmath` versions.

    /// `x ← exp(x − shift)` over a row.
    fn exp_sub(row: &mut [Self], shift: Self) {
        for x in row {
            *x = (*x - shift).exp();
        }
    }
    /// `x ← exp(x − shift)` over a row; returns the sum of the new values.
    fn exp_sub_sum(row: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::ZERO;
        for x in row {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
    /// The largest element (−inf for an empty row).
    fn max_of(row: &[Self]) -> Self {
        row.iter().fold(Self::NEG_INFINITY, |a, &x| a.max(x))
    }
    /// `out = g·sigmoid(g)·u`.
    fn silu_mul(g: &[Self], u: &[Self], out: &mut [Self]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (Self::ONE + (-g).exp()) * u;
        }
    }
    /// `out = g·sigmoid(g)`.
    fn silu(g: &[Self], out: &mut [Self]) {
        for (o, &g) in out.iter_mut().zip(g) {
            *o = g / (Self::ONE + (-g).exp());
        }
    }
    /// The SwiGLU backward: with s = sigmoid(g), `du = dy·g·s` and
    /// `dg = dy·u·s·(1 + g·(1 − s))`.
    fn swiglu_grad(g: &[Self], u: &[Self], dy: &[Self], dg: &mut [Self], du: &mut [Self]) {
        for i in 0..g.len() {
            let (g, u, d) = (g[i], u[i], dy[i]);
            let s = Self::ONE / (Self::ONE + (-g).exp());
            du[i] = d * (g * s);
            dg[i] = d * u * s * (Self::ONE + g * (Self::ONE - s));
        }
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const INFINITY: Self = f32::INFINITY;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn min(self, other: Self) -> Self {
        f32::min(self, other)
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn slice(data: &TensorData) -> Option<&[Self]> {
        match data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }
    fn into_data(v: Vec<Self>) -> TensorData {
        TensorData::F32(v)
    }
    fn round_storage(dtype: DType, v: &mut [Self]) {
        round_to_storage(dtype, v)
    }
    fn round_one(dtype: DType, x: Self) -> Self {
        match dtype {
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => x,
        }
    }
    fn zeroed(len: usize) -> Vec<Self> {
        super::pool::zeroed(len)
    }
    fn copy_of(src: &[Self]) -> Vec<Self> {
        super::pool::copy_of(src)
    }
    fn recycle(v: Vec<Self>) {
        crate::runtime::cpu::pool::recycle(v)
    }
    fn exp_sub(row: &mut [Self], shift: Self) {
        vmath::exp_sub(row, shift)
    }
    fn exp_sub_sum(row: &mut [Self], shift: Self) -> Self {
        vmath::exp_sub_sum(row, shift)
    }
    fn max_of(row: &[Self]) -> Self {
        vmath::max(row)
    }
    fn silu_mul(g: &[Self], u: &[Self], out: &mut [Self]) {
        vmath::silu_mul(g, u, out)
    }
    fn silu(g: &[Self], out: &mut [Self]) {
        vmath::silu(g, out)
    }
    fn swiglu_grad(g: &[Self], u: &[Self], dy: &[Self], dg: &mut [Self], du: &mut [Self]) {
        vmath::swiglu_grad(g, u, dy, dg, du)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const INFINITY: Self = f64::INFINITY;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
    fn min(self, other: Self) -> Self {
        f64::min(self, other)
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn slice(data: &TensorData) -> Option<&[Self]> {
        match data {
            TensorData::F64(v) => Some(v),
            _ => None,
        }
    }
    fn into_data(v: Vec<Self>) -> TensorData {
        TensorData::F64(v)
    }
    fn round_storage(_dtype: DType, _v: &mut [Self]) {}
    fn round_one(_dtype: DType, x: Self) -> Self {
        x
    }
}

/// Rounds f32 values to the precision of their storage dtype (f16, bf16);
/// other dtypes are left as they are.
pub fn round_to_storage(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        _ => {}
    }
}

/// Builds a tensor from computed values, rounding f16/bf16 results.
pub fn finish<T: Real>(dtype: DType, shape: Vec<usize>, mut v: Vec<T>) -> Tensor {
    T::round_storage(dtype, &mut v);
    Tensor {
        dtype,
        shape,
        data: T::into_data(v),
    }
}

/// The number of elements of `shape`, or an error naming what overflowed.
pub fn numel_of(shape: &[usize], what: &str) -> Result<usize, String> {
    checked_numel(shape).ok_or_else(|| format!("{what} shape {shape:?} overflows"))
}

/// The number of elements of an output about to be allocated, refused (not
/// aborted on) when `elem_bytes` each do not fit in the machine's memory.
pub fn output_numel(shape: &[usize], elem_bytes: usize, what: &str) -> Result<usize, String> {
    let n = numel_of(shape, what)?;
    match crate::memory::shortfall(n as u128 * elem_bytes as u128) {
        Some(why) => Err(format!("{what} {shape:?} needs {why}")),
        None => Ok(n),
    }
}

/// A strided matrix inside a slice: element (r, c) is at
/// `offset + r*row_stride + c*col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major matrix with `cols` columns starting at `offset`.
    pub fn row_major(data: &'a [T], offset: usize, cols: usize) -> Self {
        MatRef {
            data,
            offset,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|a| (cols - 1).checked_mul(self.col_stride).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|x| x.checked_add(self.offset));
        matches!(last, Some(l) if l < self.data.len())
    }
}

/// Products at least this large (m·n·k) use rayon inside `gemm`.
const PARALLEL_PRODUCT: usize = 48 * 48 * 48;

/// `dst[m×n] (row stride dst_rs) = (accumulate ? dst : 0) + alpha · a[m×k] · b[k×n]`.
///
/// `parallel` lets `gemm` split the product over rayon's threads (it does so
/// only above its own size threshold); callers already inside a parallel loop
/// pass `false`. The split is over blocks of `dst`, never over `k`, so results
/// do not depend on scheduling.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len() && a.fits(m, k) && b.fits(k, n),
        "gemm_strided: view out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(T::ZERO);
            }
        }
        return;
    }
    let par = if parallel && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_PRODUCT {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm touches inside the
    // three slices; dst is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(b.offset),
            b.col_stride as isize,
            b.row_stride as isize,
            T::ONE,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Element strides of `shape` (row-major) seen through a broadcast to `target`
/// (right-aligned; broadcast dims get stride 0).
pub fn broadcast_strides(shape: &[usize], target: &[usize]) -> Vec<usize> {
    let r = target.len();
    let mut strides = vec![0; r];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        let t = r - shape.len() + i;
        strides[t] = if shape[i] == 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

/// Offset of each flat index of `target` into a tensor with `strides`.
fn broadcast_offsets(target: &[usize], strides: &[usize]) -> Vec<usize> {
    let n: usize = target.iter().product();
    let mut offs = Vec::with_capacity(n);
    let mut idx = vec![0usize; target.len()];
    for _ in 0..n {
        offs.push(idx.iter().zip(strides).map(|(i, s)| i * s).sum());
        for d in (0..target.len()).rev() {
            idx[d] += 1;
            if idx[d] < target[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    offs
}

/// Both operands must have one type, except that an f32 operand may meet an
/// f16/bf16 one (both are held as f32; the product is f32): the backward
/// pass multiplies f32 gradients by frozen half-precision weights.
fn same_storage(a: &Tensor, b: &Tensor, op: &str) -> Result<(), String> {
    let half = |d: DType| matches!(d, DType::F16 | DType::BF16);
    let mixed_ok =
        (a.dtype == DType::F32 && half(b.dtype)) || (b.dtype == DType::F32 && half(a.dtype));
    if a.dtype != b.dtype && !mixed_ok {
        return Err(format!(
            "{op} inputs have different types ({} and {}); insert a Cast",
            a.dtype, b.dtype
        ));
    }
    Ok(())
}

/// ONNX `MatMul` with numpy semantics: a 1-D first operand is a row vector,
/// a 1-D second operand a column vector (the added dim is removed again),
/// and the batch dims broadcast. The result has the inputs' dtype.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    same_storage(a, b, "MatMul")?;
    if a.rank() == 0 || b.rank() == 0 {
        return Err(format!(
            "MatMul needs operands of rank >= 1, got {:?} and {:?}",
            a.shape, b.shape
        ));
    }
    let a_shape: Vec<usize> = if a.rank() == 1 {
        vec![1, a.shape[0]]
    } else {
        a.shape.clone()
    };
    let b_shape: Vec<usize> = if b.rank() == 1 {
        vec![b.shape[0], 1]
    } else {
        b.shape.clone()
    };
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let (m, k) = (a_shape[ra - 2], a_shape[ra - 1]);
    let (k2, n) = (b_shape[rb - 2], b_shape[rb - 1]);
    if k != k2 {
        return Err(format!(
            "MatMul inner dimensions differ: {:?} · {:?} ({k} vs {k2})",
            a.shape, b.shape
        ));
    }
    let (a_batch, b_batch) = (&a_shape[..ra - 2], &b_shape[..rb - 2]);
    let batch = super::layout::broadcast_shapes(a_batch, b_batch).map_err(|_| {
        format!(
            "MatMul batch dimensions do not broadcast: {:?} and {:?}",
            a.shape, b.shape
        )
    })?;
    let mut out_shape = batch.clone();
    if a.rank() > 1 {
        out_shape.push(m);
    }
    if b.rank() > 1 {
        out_shape.push(n);
    }
    let nbatch = numel_of(&batch, "MatMul output")?;
    let total = output_numel(&out_shape, a.dtype.size().max(4), "MatMul output")?;
    let nb_a: usize = a_batch.iter().product();
    let nb_b: usize = b_batch.iter().product();
    // Offsets of each output batch's operand matrices.
    let a_offs: Vec<usize> = broadcast_offsets(&batch, &broadcast_strides(a_batch, &batch))
        .into_iter()
        .map(|o| o * m * k)
        .collect();
    let b_offs: Vec<usize> = broadcast_offsets(&batch, &broadcast_strides(b_batch, &batch))
        .into_iter()
        .map(|o| o * k * n)
        .collect();
    // A weight without batch dims against a full batch of rows: one product.
    let fold = nb_b == 1 && nb_a == nbatch;
    let dtype = if a.dtype == b.dtype {
        a.dtype
    } else {
        DType::F32
    };
    let data = match (&a.data, &b.data) {
        (TensorData::F32(x), TensorData::F32(y)) => TensorData::F32(batched::<f32>(
            x, y, m, n, k, nbatch, &a_offs, &b_offs, fold,
        )),
        (TensorData::F64(x), TensorData::F64(y)) => TensorData::F64(batched::<f64>(
            x, y, m, n, k, nbatch, &a_offs, &b_offs, fold,
        )),
        (TensorData::I64(x), TensorData::I64(y)) => {
            let mut out = vec![0i64; total];
            for bi in 0..nbatch {
                let dst = &mut out[bi * m * n..(bi + 1) * m * n];
                matmul_i64(&x[a_offs[bi]..], &y[b_offs[bi]..], dst, m, n, k);
            }
            TensorData::I64(out)
        }
        _ => return Err(format!("MatMul does not support {dtype} operands")),
    };
    let mut t = Tensor {
        dtype,
        shape: out_shape,
        data,
    };
    if let TensorData::F32(v) = &mut t.data {
        round_to_storage(dtype, v);
    }
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
fn batched<T: Real>(
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    nbatch: usize,
    a_offs: &[usize],
    b_offs: &[usize],
    fold: bool,
) -> Vec<T> {
    let mut out = T::zeroed(nbatch * m * n);
    if out.is_empty() {
        return out;
    }
    if fold {
        let rows = nbatch * m;
        gemm_strided(
            rows,
            n,
            k,
            &mut out,
            n,
            false,
            MatRef::row_major(a, 0, k),
            MatRef::row_major(b, 0, n),
            T::ONE,
            true,
        );
        return out;
    }
    let small = m.saturating_mul(n).saturating_mul(k) < PARALLEL_PRODUCT * 8;
    if nbatch > 1 && small {
        out.par_chunks_mut(m * n).enumerate().for_each(|(bi, dst)| {
            gemm_strided(
                m,
                n,
                k,
                dst,
                n,
                false,
                MatRef::row_major(a, a_offs[bi], k),
                MatRef::row_major(b, b_offs[bi], n),
                T::ONE,
                false,
            )
        });
    } else {
        for (bi, dst) in out.chunks_mut(m * n).enumerate() {
            gemm_strided(
                m,
                n,
                k,
                dst,
                n,
                false,
                MatRef::row_major(a, a_offs[bi], k),
                MatRef::row_major(b, b_offs[bi], n),
                T::ONE,
                true,
            );
        }
    }
    out
}

/// Integer product with wrapping arithmetic (as ONNX integer MatMul).
fn matmul_i64(a: &[i64], b: &[i64], dst: &mut [i64], m: usize, n: usize, k: usize) {
    for i in 0..m {
        let row = &mut dst[i * n..(i + 1) * n];
        for p in 0..k {
            let x = a[i * k + p];
            let brow = &b[p * n..(p + 1) * n];
            for (d, &y) in row.iter_mut().zip(brow) {
                *d = d.wrapping_add(x.wrapping_mul(y));
            }
        }
    }
}

/// ONNX `Gemm`: `alpha · A' · B' + beta · C` with `A'` = `Aᵀ` when `trans_a`
/// (likewise B), A and B 2-D, and C unidirectionally broadcast to `[M, N]`.
/// Transposes are strided views, never copies.
pub fn gemm(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor, String> {
    same_storage(a, b, "Gemm")?;
    if a.rank() != 2 || b.rank() != 2 {
        return Err(format!(
            "Gemm needs 2-D A and B, got {:?} and {:?}",
            a.shape, b.shape
        ));
    }
    let (m, k) = if trans_a {
        (a.shape[1], a.shape[0])
    } else {
        (a.shape[0], a.shape[1])
    };
    let (k2, n) = if trans_b {
        (b.shape[1], b.shape[0])
    } else {
        (b.shape[0], b.shape[1])
    };
    if k != k2 {
        return Err(format!(
            "Gemm inner dimensions differ: A{:?} (transA={}) · B{:?} (transB={}) ({k} vs {k2})",
            a.shape, trans_a as u8, b.shape, trans_b as u8
        ));
    }
    let total = output_numel(&[m, n], a.dtype.size().max(4), "Gemm output")?;
    // Offsets into C for each output element, if C is given and used.
    let c_strides = match c {
        Some(c) if beta != 0.0 => {
            if std::mem::discriminant(&c.data) != std::mem::discriminant(&a.data) {
                return Err(format!(
                    "Gemm C has type {} but A has {}; insert a Cast",
                    c.dtype, a.dtype
                ));
            }
            let ok = c.rank() <= 2
                && c.shape
                    .iter()
                    .rev()
                    .zip([n, m])
                    .all(|(&d, t)| d == 1 || d == t);
            if !ok {
                return Err(format!(
                    "Gemm C of shape {:?} does not broadcast to [{m}, {n}]",
                    c.shape
                ));
            }
            Some(broadcast_strides(&c.shape, &[m, n]))
        }
        _ => None,
    };
    let dtype = a.dtype;
    let data = match (&a.data, &b.data) {
        (TensorData::F32(_), TensorData::F32(_)) => TensorData::F32(float_gemm::<f32>(
            a,
            b,
            c,
            c_strides.as_deref(),
            (m, n, k),
            alpha,
            beta,
            trans_a,
            trans_b,
        )),
        (TensorData::F64(_), TensorData::F64(_)) => TensorData::F64(float_gemm::<f64>(
            a,
            b,
            c,
            c_strides.as_deref(),
            (m, n, k),
            alpha,
            beta,
            trans_a,
            trans_b,
        )),
        (TensorData::I64(x), TensorData::I64(y)) => {
            // ONNX's reference computes integer Gemm in floating point and
            // casts back; do the same in f64.
            let (sa, sb) = (
                strides_2d(a.shape[1], trans_a),
                strides_2d(b.shape[1], trans_b),
            );
            let cd = c.and_then(|c| c.as_i64());
            let mut out = vec![0i64; total];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0i64;
                    for p in 0..k {
                        let u = x[i * sa.0 + p * sa.1];
                        let w = y[p * sb.0 + j * sb.1];
                        acc = acc.wrapping_add(u.wrapping_mul(w));
                    }
                    let mut r = alpha as f64 * acc as f64;
                    if let (Some(cs), Some(cd)) = (&c_strides, cd) {
                        r += beta as f64 * cd[i * cs[0] + j * cs[1]] as f64;
                    }
                    out[i * n + j] = r as i64;
                }
            }
            TensorData::I64(out)
        }
        _ => return Err(format!("Gemm does not support {dtype} operands")),
    };
    let mut t = Tensor {
        dtype,
        shape: vec![m, n],
        data,
    };
    if let TensorData::F32(v) = &mut t.data {
        round_to_storage(dtype, v);
    }
    Ok(t)
}

/// (row stride, col stride) of a row-major matrix with `cols` columns, or of
/// its transpose.
fn strides_2d(cols: usize, transposed: bool) -> (usize, usize) {
    if transposed {
        (1, cols)
    } else {
        (cols, 1)
    }
}

#[allow(clippy::too_many_arguments)]
fn float_gemm<T: Real>(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    c_strides: Option<&[usize]>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
) -> Vec<T> {
    fn view<T: Real>(t: &Tensor, transposed: bool) -> MatRef<'_, T> {
        let data = T::slice(&t.data).unwrap_or(&[]);
        let (row_stride, col_stride) = strides_2d(t.shape[1], transposed);
        MatRef {
            data,
            offset: 0,
            row_stride,
            col_stride,
        }
    }
    let mut out = T::zeroed(m * n);
    let c_data = c.and_then(|c| T::slice(&c.data));
    let accumulate = match (c_data, c_strides) {
        (Some(cd), Some(cs)) => {
            let beta = T::from_f64(beta as f64);
            for i in 0..m {
                for j in 0..n {
                    out[i * n + j] = beta * cd[i * cs[0] + j * cs[1]];
                }
            }
            true
        }
        _ => false,
    };
    gemm_strided(
        m,
        n,
        k,
        &mut out,
        n,
        accumulate,
        view(a, trans_a),
        view(b, trans_b),
        T::from_f64(alpha as f64),
        true,
    );
    out
}

/// Helpers shared by the kernel tests: a tiny deterministic PRNG and
/// tolerance checks.
#[cfg(test)]
pub(crate) mod testutil {
    use crate::ir::Tensor;

    /// A 64-bit LCG; plenty for test data, no crate needed.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn f32(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }

        pub fn tensor(&mut self, shape: &[usize]) -> Tensor {
            let n = shape.iter().product();
            Tensor::f32(shape.to_vec(), self.vec(n))
        }
    }

    /// Asserts |got - want| <= tol·(1 + |want|) elementwise (NaN matches NaN).
    pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= tol * (1.0 + w.abs());
            assert!(ok, "{what}: element {i}: got {g}, want {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{assert_close, Rng};
    use super::*;

    /// numpy matmul in f64 with plain loops.
    fn ref_matmul(a: &[f64], ash: &[usize], b: &[f64], bsh: &[usize]) -> (Vec<f64>, Vec<usize>) {
        let a2: Vec<usize> = if ash.len() == 1 {
            vec![1, ash[0]]
        } else {
            ash.to_vec()
        };
        let b2: Vec<usize> = if bsh.len() == 1 {
            vec![bsh[0], 1]
        } else {
            bsh.to_vec()
        };
        let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
        let n = b2[b2.len() - 1];
        let batch =
            crate::runtime::cpu::layout::broadcast_shapes(&a2[..a2.len() - 2], &b2[..b2.len() - 2])
                .unwrap();
        let nb: usize = batch.iter().product();
        let index = |shape: &[usize], bi: usize| -> usize {
            // Row-major batch offset of broadcast index bi into `shape`.
            let mut rem = bi;
            let mut idx = vec![0; batch.len()];
            for d in (0..batch.len()).rev() {
                idx[d] = rem % batch[d];
                rem /= batch[d];
            }
            let mut off = 0;
            for (d, &s) in shape.iter().enumerate() {
                let i = idx[batch.len() - shape.len() + d];
                off = off * s + if s == 1 { 0 } else { i };
            }
            off
        };
        let mut out = vec![0.0; nb * m * n];
        for bi in 0..nb {
            let ao = index(&a2[..a2.len() - 2], bi) * m * k;
            let bo = index(&b2[..b2.len() - 2], bi) * k * n;
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for p in 0..k {
                        s += a[ao + i * k + p] * b[bo + p * n + j];
                    }
                    out[bi * m * n + i * n + j] = s;
                }
            }
        }
        let mut shape = batch;
        if ash.len() > 1 {
            shape.push(m);
        }
        if bsh.len() > 1 {
            shape.push(n);
        }
        (out, shape)
    }

    #[test]
    fn matmul_matches_numpy_semantics() {
        let mut rng = Rng(1);
        let cases: &[(&[usize], &[usize])] = &[
            (&[3, 4], &[4, 5]),
            (&[4], &[4, 5]),
            (&[3, 4], &[4]),
            (&[4], &[4]),
            (&[2, 1, 3, 4], &[5, 4, 6]),
            (&[2, 3, 4], &[4, 5]),
            (&[7, 1, 4], &[1, 4, 3]),
            (&[4], &[2, 4, 3]),
            (&[2, 3, 4], &[4]),
            (&[70, 130], &[130, 65]),
            (&[3, 65, 33], &[3, 33, 129]),
            (&[9, 5, 8], &[9, 8, 7]),
            (&[3, 0], &[0, 4]),
        ];
        for (ash, bsh) in cases {
            let a = rng.tensor(ash);
            let b = rng.tensor(bsh);
            let got = matmul(&a, &b).unwrap();
            let (want, shape) = ref_matmul(&a.to_f64_vec(), ash, &b.to_f64_vec(), bsh);
            assert_eq!(got.shape, shape, "{ash:?}·{bsh:?}");
            assert_eq!(got.dtype, DType::F32);
            assert_close(&got.to_f64_vec(), &want, 1e-5, &format!("{ash:?}·{bsh:?}"));
        }
    }

    #[test]
    fn matmul_f64_i64_and_f16() {
        let mut rng = Rng(2);
        let a = rng.tensor(&[2, 3, 5]);
        let b = rng.tensor(&[5, 4]);
        let (want, _) = ref_matmul(&a.to_f64_vec(), &a.shape, &b.to_f64_vec(), &b.shape);
        let a64 = Tensor {
            dtype: DType::F64,
            shape: a.shape.clone(),
            data: TensorData::F64(a.to_f64_vec()),
        };
        let b64 = Tensor {
            dtype: DType::F64,
            shape: b.shape.clone(),
            data: TensorData::F64(b.to_f64_vec()),
        };
        let got = matmul(&a64, &b64).unwrap();
        assert_eq!(got.dtype, DType::F64);
        assert_close(&got.to_f64_vec(), &want, 1e-12, "f64");

        let ai = Tensor::i64(vec![2, 3], vec![1, 2, 3, 4, 5, 6]);
        let bi = Tensor::i64(vec![3, 2], vec![7, 8, 9, 10, 11, 12]);
        let got = matmul(&ai, &bi).unwrap();
        assert_eq!(got.as_i64().unwrap(), &[58, 64, 139, 154]);

        // f16 results are rounded to f16: 1/3 accumulates to a value that is
        // not representable in f16.
        let mut a16 = Tensor::f32(vec![1, 3], vec![1.0, 1.0, 1.0]);
        a16.dtype = DType::F16;
        let mut b16 = Tensor::f32(vec![3, 1], vec![0.33325195, 0.33325195, 0.33325195]);
        b16.dtype = DType::F16;
        let got = matmul(&a16, &b16).unwrap();
        assert_eq!(got.dtype, DType::F16);
        let v = got.as_f32().unwrap()[0];
        assert_eq!(v, half::f16::from_f32(3.0 * 0.33325195).to_f32());
    }

    #[test]
    fn matmul_errors() {
        let a = Tensor::f32(vec![2, 3], vec![0.0; 6]);
        let b = Tensor::f32(vec![4, 2], vec![0.0; 8]);
        assert!(matmul(&a, &b).unwrap_err().contains("inner dimensions"));
        let c = Tensor::f32(vec![3, 3, 2], vec![0.0; 18]);
        let d = Tensor::f32(vec![2, 2, 4], vec![0.0; 16]);
        assert!(matmul(&c, &d).unwrap_err().contains("broadcast"));
        let e = Tensor::i64(vec![3, 2], vec![0; 6]);
        assert!(matmul(&a, &e).unwrap_err().contains("different types"));
    }

    #[test]
    fn gemm_transposes_and_c_broadcast() {
        let mut rng = Rng(3);
        let (m, n, k) = (5, 7, 6);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let a = rng.tensor(&if trans_a { [k, m] } else { [m, k] });
                let b = rng.tensor(&if trans_b { [n, k] } else { [k, n] });
                let c_shapes: [Option<Vec<usize>>; 6] = [
                    None,
                    Some(vec![]),
                    Some(vec![n]),
                    Some(vec![m, 1]),
                    Some(vec![1, n]),
                    Some(vec![m, n]),
                ];
                for cs in c_shapes {
                    let c = cs.as_ref().map(|s| rng.tensor(s));
                    let (alpha, beta) = (0.75f32, -1.5f32);
                    let got = gemm(&a, &b, c.as_ref(), alpha, beta, trans_a, trans_b).unwrap();
                    assert_eq!(got.shape, vec![m, n]);
                    let (av, bv) = (a.to_f64_vec(), b.to_f64_vec());
                    let cv = c.as_ref().map(|c| c.to_f64_vec());
                    let mut want = vec![0.0; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = 0.0;
                            for p in 0..k {
                                let x = if trans_a {
                                    av[p * m + i]
                                } else {
                                    av[i * k + p]
                                };
                                let y = if trans_b {
                                    bv[j * k + p]
                                } else {
                                    bv[p * n + j]
                                };
                                s += x * y;
                            }
                            let cval = match (&cs, &cv) {
                                (Some(s), Some(v)) => match s.as_slice() {
                                    [] => v[0],
                                    [_] => v[j],
                                    [_, 1] => v[i],
                                    [1, _] => v[j],
                                    _ => v[i * n + j],
                                },
                                _ => 0.0,
                            };
                            want[i * n + j] = alpha as f64 * s + beta as f64 * cval;
                        }
                    }
                    assert_close(
                        &got.to_f64_vec(),
                        &want,
                        1e-5,
                        &format!("transA={trans_a} transB={trans_b} C={cs:?}"),
                    );
                }
            }
        }
    }

    #[test]
    fn gemm_rejects_bad_shapes() {
        let a = Tensor::f32(vec![2, 3], vec![0.0; 6]);
        let b = Tensor::f32(vec![3, 4], vec![0.0; 12]);
        let c = Tensor::f32(vec![3, 4], vec![0.0; 12]);
        assert!(gemm(&a, &b, Some(&c), 1.0, 1.0, false, false)
            .unwrap_err()
            .contains("does not broadcast"));
        assert!(gemm(&a, &b, None, 1.0, 1.0, true, false)
            .unwrap_err()
            .contains("inner dimensions"));
        let v = Tensor::f32(vec![3], vec![0.0; 3]);
        assert!(gemm(&v, &b, None, 1.0, 1.0, false, false)
            .unwrap_err()
            .contains("2-D"));
    }

    #[test]
    fn gemm_i64() {
        let a = Tensor::i64(vec![2, 2], vec![1, 2, 3, 4]);
        let b = Tensor::i64(vec![2, 2], vec![5, 6, 7, 8]);
        let c = Tensor::i64(vec![2], vec![1, -1]);
        let got = gemm(&a, &b, Some(&c), 1.0, 2.0, false, true).unwrap();
        // A·Bᵀ = [[17, 23], [39, 53]], + 2·[1, -1]
        assert_eq!(got.as_i64().unwrap(), &[19, 21, 41, 51]);
    }
}
