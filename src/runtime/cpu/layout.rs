//! Shapes, strides and the strided walks every elementwise and data-movement
//! kernel is built on.
//!
//! A walk collapses an output shape and the strides of its operands into as
//! few dimensions as possible (size-1 dimensions vanish, adjacent dimensions
//! that are laid out contiguously in every operand merge), then visits the
//! output row by row: the innermost dimension is a plain loop with a fixed
//! stride per operand, and only the row start is computed from the outer
//! indices. Rows are split across rayon workers in fixed-size chunks, so the
//! results never depend on the number of threads.

use crate::ir::tensor::checked_numel;
use crate::ir::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread.
pub const PAR_MIN: usize = 1 << 16;

/// Elements per unit of parallel work.
pub const PAR_CHUNK: usize = 1 << 14;

/// The number of elements of `shape`, or an error when it overflows.
pub fn numel(shape: &[usize]) -> Result<usize, String> {
    checked_numel(shape).ok_or_else(|| format!("shape {shape:?} has too many elements"))
}

/// A zero-filled vector of `n` elements, failing (instead of aborting) when
/// the allocation cannot be made.
pub fn alloc<T: Clone + Default>(n: usize) -> Result<Vec<T>, String> {
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    if let Some(why) = crate::memory::shortfall(bytes) {
        return Err(format!("an output of {n} elements needs {why}"));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        format!(
            "cannot allocate {n} elements of {} bytes",
            std::mem::size_of::<T>()
        )
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// Row-major strides of a contiguous tensor.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Numpy's multidirectional broadcast of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    let mut out = vec![0usize; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!(
                "shapes {a:?} and {b:?} do not broadcast (dimension {i} of the result: {da} vs {db})"
            ));
        };
    }
    Ok(out)
}

/// The strides with which an operand of `shape` is read when broadcast to
/// `out` (right-aligned; 0 where the operand's dimension is 1 or missing).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let cs = contiguous_strides(shape);
    let r = out.len();
    let mut s = vec![0isize; r];
    for i in 0..shape.len() {
        let o = r - shape.len() + i;
        if shape[i] != 1 {
            s[o] = cs[i] as isize;
        }
    }
    s
}

/// Collapses `shape` and the per-operand `strides` (each `shape.len()` long):
/// size-1 dimensions are dropped and adjacent dimensions that are contiguous
/// in every operand merge. Returns the new dims and, per operand, the strides.
pub fn collapse(shape: &[usize], strides: &[Vec<isize>]) -> (Vec<usize>, Vec<Vec<isize>>) {
    let k = strides.len();
    let mut dims: Vec<usize> = Vec::with_capacity(shape.len());
    let mut st: Vec<Vec<isize>> = vec![Vec::with_capacity(shape.len()); k];
    for (d, &size) in shape.iter().enumerate() {
        if size == 1 {
            continue;
        }
        if !dims.is_empty() {
            let mergeable = (0..k).all(|j| {
                let prev = *st[j].last().expect("same length as dims");
                prev == strides[j][d] * size as isize
            });
            if mergeable {
                let l = dims.len() - 1;
                dims[l] *= size;
                for j in 0..k {
                    st[j][l] = strides[j][d];
                }
                continue;
            }
        }
        dims.push(size);
        for j in 0..k {
            st[j].push(strides[j][d]);
        }
    }
    (dims, st)
}

/// A row-by-row walk over an output with `K` strided operands.
pub struct Walk<const K: usize> {
    /// Length of a row (the innermost collapsed dimension).
    pub inner: usize,
    /// Stride along a row, per operand.
    pub inner_strides: [isize; K],
    outer_dims: Vec<usize>,
    outer_strides: Vec<[isize; K]>,
    base: [isize; K],
}

impl<const K: usize> Walk<K> {
    /// `strides[j]` are operand j's strides over `shape`; `base[j]` its
    /// starting offset.
    pub fn new(shape: &[usize], strides: [Vec<isize>; K], base: [isize; K]) -> Walk<K> {
        let (dims, st) = collapse(shape, &strides);
        let r = dims.len();
        if r == 0 {
            return Walk {
                inner: 1,
                inner_strides: [0; K],
                outer_dims: Vec::new(),
                outer_strides: Vec::new(),
                base,
            };
        }
        let inner_strides: [isize; K] = std::array::from_fn(|j| st[j][r - 1]);
        let outer_strides = (0..r - 1)
            .map(|d| std::array::from_fn(|j| st[j][d]))
            .collect();
        Walk {
            inner: dims[r - 1],
            inner_strides,
            outer_dims: dims[..r - 1].to_vec(),
            outer_strides,
            base,
        }
    }

    /// The offset of each operand at the start of row `row`.
    #[inline]
    pub fn row_start(&self, mut row: usize) -> [isize; K] {
        let mut off = self.base;
        for d in (0..self.outer_dims.len()).rev() {
            let size = self.outer_dims[d];
            let i = (row % size) as isize;
            row /= size;
            for (o, s) in off.iter_mut().zip(&self.outer_strides[d]) {
                *o += i * s;
            }
        }
        off
    }

    /// Fills `out` (the whole output, `rows * inner` long) by calling
    /// `row_fn(row_start_offsets, out_row)` for every row, in parallel when
    /// the output is large.
    pub fn for_each_row<T: Send>(
        &self,
        out: &mut [T],
        row_fn: impl Fn([isize; K], &mut [T]) + Sync + Send,
    ) {
        let inner = self.inner;
        if inner == 0 || out.is_empty() {
            return;
        }
        let rows_per_chunk = (PAR_CHUNK / inner).max(1);
        let chunk_len = rows_per_chunk * inner;
        let work = |ci: usize, chunk: &mut [T]| {
            let row0 = ci * rows_per_chunk;
            for (r, out_row) in chunk.chunks_mut(inner).enumerate() {
                row_fn(self.row_start(row0 + r), out_row);
            }
        };
        if out.len() >= PAR_MIN {
            out.par_chunks_mut(chunk_len)
                .enumerate()
                .for_each(|(ci, c)| work(ci, c));
        } else {
            out.chunks_mut(chunk_len)
                .enumerate()
                .for_each(|(ci, c)| work(ci, c));
        }
    }
}

/// Copies the elements of `src` seen through `strides` from `base` into a new
/// contiguous tensor of shape `shape` (slices, broadcasts, transposes).
/// Offsets must lie inside `src`; callers compute them from checked shapes.
pub fn strided_copy<T: Copy + Default + Send + Sync>(
    src: &[T],
    base: usize,
    shape: &[usize],
    strides: &[isize],
) -> Result<Vec<T>, String> {
    let n = numel(shape)?;
    let mut out = alloc::<T>(n)?;
    if n == 0 {
        return Ok(out);
    }
    let walk = Walk::<1>::new(shape, [strides.to_vec()], [base as isize]);
    let s = walk.inner_strides[0];
    walk.for_each_row(&mut out, |[off], row| {
        let off = off as usize;
        match s {
            1 => row.copy_from_slice(&src[off..off + row.len()]),
            0 => row.fill(src[off]),
            _ => {
                let mut p = off as isize;
                for o in row.iter_mut() {
                    *o = src[p as usize];
                    p += s;
                }
            }
        }
    });
    Ok(out)
}

/// Applies `f` to every element, in parallel when large.
pub fn map<A: Copy + Sync, O: Send>(src: &[A], f: impl Fn(A) -> O + Sync + Send) -> Vec<O> {
    if src.len() >= PAR_MIN {
        src.par_iter()
            .with_min_len(PAR_CHUNK)
            .map(|&x| f(x))
            .collect()
    } else {
        src.iter().map(|&x| f(x)).collect()
    }
}

/// Applies `f` to every element in place, in parallel when large.
pub fn map_inplace<A: Copy + Send + Sync>(dst: &mut [A], f: impl Fn(A) -> A + Sync + Send) {
    if dst.len() >= PAR_MIN {
        dst.par_chunks_mut(PAR_CHUNK).for_each(|c| {
            for x in c {
                *x = f(*x);
            }
        });
    } else {
        for x in dst {
            *x = f(*x);
        }
    }
}

/// Rounds f32-held values to their logical storage precision (f16/bf16), so
/// a tensor's values stay exactly representable in its dtype.
pub fn round_to_storage(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F16 => map_inplace(v, |x| half::f16::from_f32(x).to_f32()),
        DType::BF16 => map_inplace(v, |x| half::bf16::from_f32(x).to_f32()),
        _ => {}
    }
}

/// Wraps i64-held values to their logical integer width (i32, i8, u8), as
/// two's-complement arithmetic in that width would.
pub fn wrap_to_storage(dtype: DType, v: &mut [i64]) {
    match dtype {
        DType::I32 => map_inplace(v, |x| x as i32 as i64),
        DType::I8 => map_inplace(v, |x| x as i8 as i64),
        DType::U8 => map_inplace(v, |x| x as u8 as i64),
        _ => {}
    }
}

/// Brings a freshly computed tensor's values back into its logical dtype.
pub fn normalize(t: &mut Tensor) {
    match &mut t.data {
        TensorData::F32(v) => round_to_storage(t.dtype, v),
        TensorData::I64(v) => wrap_to_storage(t.dtype, v),
        _ => {}
    }
}

/// Checks that a tensor's storage agrees with its dtype and shape (tensors
/// that enter the executor from outside: graph inputs and constants).
pub fn check_consistent(t: &Tensor) -> Result<(), String> {
    let n = numel(&t.shape)?;
    if n != t.data.len() {
        return Err(format!(
            "shape {:?} has {n} elements but the tensor holds {}",
            t.shape,
            t.data.len()
        ));
    }
    let ok = matches!(
        (&t.data, t.dtype),
        (TensorData::F32(_), DType::F32 | DType::F16 | DType::BF16)
            | (TensorData::F64(_), DType::F64)
            | (
                TensorData::I64(_),
                DType::I64 | DType::I32 | DType::I8 | DType::U8
            )
            | (TensorData::Bool(_), DType::Bool)
    );
    if !ok {
        return Err(format!(
            "dtype {} does not match the storage it holds",
            t.dtype
        ));
    }
    Ok(())
}

/// Normalizes a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize, what: &str) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!(
            "{what} {axis} is out of range for rank {rank} (allowed {}..={})",
            -r,
            r - 1
        ));
    }
    Ok(a as usize)
}

/// Runs `$body` with `$v` bound to the typed storage of `$data`, producing a
/// `TensorData` of the same variant. `$body` must be generic in the element.
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::ir::TensorData::F32($v) => $crate::ir::TensorData::F32($body),
            $crate::ir::TensorData::F64($v) => $crate::ir::TensorData::F64($body),
            $crate::ir::TensorData::I64($v) => $crate::ir::TensorData::I64($body),
            $crate::ir::TensorData::Bool($v) => $crate::ir::TensorData::Bool($body),
        }
    };
}
pub(crate) use map_data;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shapes_numpy_rules() {
        assert_eq!(broadcast_shapes(&[2, 3], &[3]).unwrap(), vec![2, 3]);
        assert_eq!(
            broadcast_shapes(&[2, 1, 4], &[3, 1]).unwrap(),
            vec![2, 3, 4]
        );
        assert_eq!(broadcast_shapes(&[], &[5]).unwrap(), vec![5]);
        assert_eq!(broadcast_shapes(&[0, 1], &[1, 3]).unwrap(), vec![0, 3]);
        assert_eq!(broadcast_shapes(&[1], &[0]).unwrap(), vec![0]);
        assert!(broadcast_shapes(&[2, 3], &[4]).is_err());
        assert!(broadcast_shapes(&[0], &[2]).is_err());
    }

    #[test]
    fn collapse_merges_contiguous_dims() {
        let shape = [2, 3, 4];
        let s = vec![12, 4, 1];
        let (d, st) = collapse(&shape, &[s]);
        assert_eq!(d, vec![24]);
        assert_eq!(st[0], vec![1]);
        // A broadcast middle dim splits the merge.
        let (d, st) = collapse(&shape, &[vec![4, 0, 1], vec![12, 4, 1]]);
        assert_eq!(d, vec![2, 3, 4]);
        assert_eq!(st[0], vec![4, 0, 1]);
    }

    #[test]
    fn strided_copy_transposes_and_reverses() {
        let src: Vec<i64> = (0..6).collect();
        // [2,3] -> transpose [3,2]
        let t = strided_copy(&src, 0, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(t, vec![0, 3, 1, 4, 2, 5]);
        // reverse the last axis
        let r = strided_copy(&src, 2, &[2, 3], &[3, -1]).unwrap();
        assert_eq!(r, vec![2, 1, 0, 5, 4, 3]);
        // broadcast
        let b = strided_copy(&src[..3], 0, &[2, 3], &[0, 1]).unwrap();
        assert_eq!(b, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn strided_copy_large_is_parallel_and_exact() {
        let src: Vec<i64> = (0..(300 * 500)).collect();
        let t = strided_copy(&src, 0, &[500, 300], &[1, 500]).unwrap();
        for i in 0..500 {
            for j in 0..300 {
                assert_eq!(t[i * 300 + j], (j * 500 + i) as i64);
            }
        }
    }
}
