//! Shape and data-movement kernels: Reshape, Transpose, Concat, Slice,
//! Gather, GatherND, Unsqueeze, Squeeze, Expand, Shape, Size, Split.
//!
//! Ops that only change the shape (Reshape, Squeeze, Unsqueeze) take their
//! input by value so that a dead input's buffer is reused without a copy.

use super::elementwise::shape_values;
use super::layout::{
    alloc, broadcast_shapes, broadcast_strides, collapse, contiguous_strides, map_data, norm_axis,
    numel, strided_copy, PAR_CHUNK, PAR_MIN,
};
use crate::ir::{Tensor, TensorData};
use rayon::prelude::*;

type KResult<T> = std::result::Result<T, String>;

fn to_usize_dims(dims: &[i64], what: &str) -> KResult<Vec<usize>> {
    dims.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| format!("{what} {dims:?} has a negative dimension"))
        })
        .collect()
}

fn int_values(t: &Tensor, what: &str) -> KResult<Vec<i64>> {
    shape_values(t, what)
}

// ---------------------------------------------------------------------------
// Reshape, Squeeze, Unsqueeze
// ---------------------------------------------------------------------------

/// The shape `spec` asks for, given the input shape: 0 copies the input's
/// dimension (unless `allowzero`), one -1 is inferred.
pub fn reshape_target(input: &[usize], spec: &[i64], allowzero: bool) -> KResult<Vec<usize>> {
    let total = numel(input)?;
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 => {
                if infer.is_some() {
                    return Err(format!("the shape {spec:?} has more than one -1"));
                }
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => match input.get(i) {
                Some(&n) => out.push(n),
                None => {
                    return Err(format!(
                        "the shape {spec:?} copies dimension {i} (0), but the input {input:?} has rank {}",
                        input.len()
                    ))
                }
            },
            d if d < 0 => return Err(format!("the shape {spec:?} has an invalid dimension {d}")),
            d => out.push(
                usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))?,
            ),
        }
    }
    if let Some(i) = infer {
        let known = numel(&out)?;
        if known == 0 {
            return Err(format!(
                "cannot infer the -1 in {spec:?}: the other dimensions multiply to 0"
            ));
        }
        if total % known != 0 {
            return Err(format!(
                "cannot reshape {input:?} ({total} elements) to {spec:?}"
            ));
        }
        out[i] = total / known;
    }
    if numel(&out)? != total {
        return Err(format!(
            "cannot reshape {input:?} ({total} elements) to {spec:?} ({} elements)",
            numel(&out)?
        ));
    }
    Ok(out)
}

/// `Reshape(x, shape)`.
pub fn reshape(x: Tensor, shape: &Tensor, allowzero: bool) -> KResult<Tensor> {
    let spec = int_values(shape, "the shape")?;
    let out = reshape_target(&x.shape, &spec, allowzero)?;
    Ok(Tensor { shape: out, ..x })
}

/// `Unsqueeze(x, axes)`: axes count in the output's rank and may be negative.
pub fn unsqueeze(x: Tensor, axes: &[i64]) -> KResult<Tensor> {
    let r = x.rank() + axes.len();
    let mut is_new = vec![false; r];
    for &a in axes {
        let a = norm_axis(a, r, "axis")?;
        if is_new[a] {
            return Err(format!("axis {a} appears twice in {axes:?}"));
        }
        is_new[a] = true;
    }
    let mut dims = x.shape.iter();
    let shape = is_new
        .iter()
        .map(|&new| if new { 1 } else { *dims.next().unwrap_or(&1) })
        .collect();
    Ok(Tensor { shape, ..x })
}

/// `Squeeze(x, axes)`: removes the named size-1 dimensions, or every size-1
/// dimension when `axes` is absent.
pub fn squeeze(x: Tensor, axes: Option<&[i64]>) -> KResult<Tensor> {
    let r = x.rank();
    let mut drop = vec![false; r];
    match axes {
        Some(axes) => {
            for &a in axes {
                let i = norm_axis(a, r, "axis")?;
                if x.shape[i] != 1 {
                    return Err(format!(
                        "cannot squeeze axis {a}: its size is {} in shape {:?}",
                        x.shape[i], x.shape
                    ));
                }
                drop[i] = true;
            }
        }
        None => {
            for (i, &d) in x.shape.iter().enumerate() {
                drop[i] = d == 1;
            }
        }
    }
    let shape = x
        .shape
        .iter()
        .zip(&drop)
        .filter(|(_, &d)| !d)
        .map(|(&s, _)| s)
        .collect();
    Ok(Tensor { shape, ..x })
}

// ---------------------------------------------------------------------------
// Transpose
// ---------------------------------------------------------------------------

/// Side of the square tiles a strided transpose copies at a time.
const TILE: usize = 32;

/// `Transpose(x, perm)`; `perm` defaults to reversing the dimensions.
pub fn transpose(x: &Tensor, perm: Option<&[i64]>) -> KResult<Tensor> {
    let r = x.rank();
    let perm: Vec<usize> = match perm {
        Some(p) => {
            if p.len() != r {
                return Err(format!(
                    "perm {p:?} has {} entries for a tensor of rank {r}",
                    p.len()
                ));
            }
            let mut seen = vec![false; r];
            let mut out = Vec::with_capacity(r);
            for &a in p {
                let i = norm_axis(a, r, "perm entry")?;
                if seen[i] {
                    return Err(format!("perm {p:?} is not a permutation"));
                }
                seen[i] = true;
                out.push(i);
            }
            out
        }
        None => (0..r).rev().collect(),
    };
    let in_strides = contiguous_strides(&x.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let strides: Vec<isize> = perm.iter().map(|&p| in_strides[p] as isize).collect();
    let (dims, st) = collapse(&shape, std::slice::from_ref(&strides));
    let st = &st[0];
    // When the output's rows are strided in the input, copy square tiles so
    // both sides stay in cache; otherwise rows are plain copies.
    let tiled = dims.len() >= 2 && st[dims.len() - 1] != 1;
    let unit_dim = st.iter().position(|&s| s == 1);
    let data = match (tiled, unit_dim) {
        (true, Some(p)) => {
            map_data!(&x.data, v => transpose_tiled(v, &dims, st, p)?)
        }
        _ => map_data!(&x.data, v => strided_copy(v, 0, &shape, &strides)?),
    };
    Ok(Tensor {
        dtype: x.dtype,
        shape,
        data,
    })
}

/// A collapsed transpose whose innermost output dimension `q` is strided in
/// the input and whose dimension `p` is the input's contiguous one: copies
/// `TILE`×`TILE` tiles of the (p, q) plane for every index of the others.
fn transpose_tiled<T: Copy + Default + Send + Sync>(
    src: &[T],
    dims: &[usize],
    st: &[isize],
    p: usize,
) -> KResult<Vec<T>> {
    let r = dims.len();
    let q = r - 1;
    let ostr = contiguous_strides(dims);
    let n = numel(dims)?;
    let mut out = alloc::<T>(n)?;
    if n == 0 {
        return Ok(out);
    }
    // Work is split along dimension 0: one index per unit, or a tile of
    // indices when dimension 0 is p itself.
    let step0 = if p == 0 { TILE } else { 1 };
    let chunk_len = ostr[0] * step0;
    let others: Vec<usize> = (1..q).filter(|&d| d != p).collect();
    let n_others: usize = others.iter().map(|&d| dims[d]).product();
    let work = |ci: usize, out: &mut [T]| {
        let lo0 = ci * step0;
        let hi0 = (lo0 + step0).min(dims[0]);
        let chunk_base = lo0 * ostr[0];
        for oi in 0..n_others {
            let (mut rem, mut in_off, mut out_off) = (oi, 0isize, 0usize);
            for &d in others.iter().rev() {
                let i = rem % dims[d];
                rem /= dims[d];
                in_off += i as isize * st[d];
                out_off += i * ostr[d];
            }
            // (dim-0 range, p range): dim 0 is either a fixed index or p.
            let (zero_range, p_range) = if p == 0 {
                (0..1, lo0..hi0)
            } else {
                (lo0..hi0, 0..dims[p])
            };
            for i0 in zero_range {
                let (in0, out0) = if p == 0 {
                    (0isize, 0usize)
                } else {
                    (i0 as isize * st[0], i0 * ostr[0])
                };
                for pb in p_range.clone().step_by(TILE) {
                    let pe = (pb + TILE).min(p_range.end);
                    for qb in (0..dims[q]).step_by(TILE) {
                        let qe = (qb + TILE).min(dims[q]);
                        for i in pb..pe {
                            let ob = out0 + out_off + i * ostr[p] - chunk_base;
                            let ib = in0 + in_off + i as isize;
                            for j in qb..qe {
                                out[ob + j] = src[(ib + j as isize * st[q]) as usize];
                            }
                        }
                    }
                }
            }
        }
    };
    if n >= PAR_MIN {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(ci, c)| work(ci, c));
    } else {
        out.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(ci, c)| work(ci, c));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Concat, Split
// ---------------------------------------------------------------------------

macro_rules! slices_of {
    ($inputs:expr, $variant:ident) => {
        $inputs
            .iter()
            .map(|t| match &t.data {
                TensorData::$variant(v) => Ok(&v[..]),
                _ => Err(format!("inputs have different types ({})", t.dtype)),
            })
            .collect::<KResult<Vec<_>>>()?
    };
}

fn concat_typed<T: Copy>(srcs: &[&[T]], row_lens: &[usize], outer: usize, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    for o in 0..outer {
        for (s, &len) in srcs.iter().zip(row_lens) {
            out.extend_from_slice(&s[o * len..(o + 1) * len]);
        }
    }
    out
}

/// `Concat(inputs…, axis)`.
pub fn concat(inputs: &[&Tensor], axis: i64) -> KResult<Tensor> {
    let first = inputs
        .first()
        .ok_or_else(|| "Concat needs at least one input".to_string())?;
    let r = first.rank();
    let ax = norm_axis(axis, r, "axis")?;
    let mut shape = first.shape.clone();
    shape[ax] = 0;
    for (i, t) in inputs.iter().enumerate() {
        if t.dtype != first.dtype {
            return Err(format!(
                "input {i} is {}, input 0 is {}",
                t.dtype, first.dtype
            ));
        }
        let same_rest = t.rank() == r && (0..r).all(|d| d == ax || t.shape[d] == first.shape[d]);
        if !same_rest {
            return Err(format!(
                "input {i} has shape {:?}, which does not match input 0's {:?} outside axis {ax}",
                t.shape, first.shape
            ));
        }
        shape[ax] += t.shape[ax];
    }
    let n = numel(&shape)?;
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product();
    let row_lens: Vec<usize> = inputs.iter().map(|t| t.shape[ax] * inner).collect();
    let data = match &first.data {
        TensorData::F32(_) => {
            TensorData::F32(concat_typed(&slices_of!(inputs, F32), &row_lens, outer, n))
        }
        TensorData::F64(_) => {
            TensorData::F64(concat_typed(&slices_of!(inputs, F64), &row_lens, outer, n))
        }
        TensorData::I64(_) => {
            TensorData::I64(concat_typed(&slices_of!(inputs, I64), &row_lens, outer, n))
        }
        TensorData::Bool(_) => {
            TensorData::Bool(concat_typed(&slices_of!(inputs, Bool), &row_lens, outer, n))
        }
    };
    Ok(Tensor {
        dtype: first.dtype,
        shape,
        data,
    })
}

/// `Split(x, axis, split)`: the given sizes, or `num_outputs` parts of
/// `ceil(dim / num_outputs)` with a smaller last part (opset 18).
pub fn split(
    x: &Tensor,
    axis: i64,
    sizes: Option<&[i64]>,
    num_outputs: usize,
) -> KResult<Vec<Tensor>> {
    let ax = norm_axis(axis, x.rank(), "axis")?;
    let dim = x.shape[ax];
    let sizes: Vec<usize> = match sizes {
        Some(s) => {
            if s.len() != num_outputs {
                return Err(format!(
                    "split {s:?} has {} parts for {num_outputs} outputs",
                    s.len()
                ));
            }
            let sizes = to_usize_dims(s, "split")?;
            let total: usize = sizes.iter().sum();
            if total != dim {
                return Err(format!(
                    "split {s:?} adds up to {total}, but axis {ax} has size {dim}"
                ));
            }
            sizes
        }
        None => {
            if num_outputs == 0 {
                return Err("Split has no outputs".into());
            }
            let chunk = dim.div_ceil(num_outputs);
            let before_last = chunk * (num_outputs - 1);
            if before_last > dim {
                return Err(format!(
                    "axis {ax} of size {dim} cannot be split into {num_outputs} parts"
                ));
            }
            let mut s = vec![chunk; num_outputs - 1];
            s.push(dim - before_last);
            s
        }
    };
    let outer: usize = x.shape[..ax].iter().product();
    let inner: usize = x.shape[ax + 1..].iter().product();
    let mut outs = Vec::with_capacity(sizes.len());
    let mut start = 0usize;
    for &size in &sizes {
        let mut shape = x.shape.clone();
        shape[ax] = size;
        let (s0, len) = (start * inner, size * inner);
        let data = map_data!(&x.data, v => {
            let mut out = Vec::with_capacity(outer * len);
            for o in 0..outer {
                let base = o * dim * inner + s0;
                out.extend_from_slice(&v[base..base + len]);
            }
            out
        });
        outs.push(Tensor {
            dtype: x.dtype,
            shape,
            data,
        });
        start += size;
    }
    Ok(outs)
}

// ---------------------------------------------------------------------------
// Slice
// ---------------------------------------------------------------------------

/// `Slice(x, starts, ends, axes, steps)` with ONNX's clamping rules:
/// negative indices count from the end, out-of-range starts and ends clamp
/// (differently for negative steps), `INT64_MAX`/`INT64_MIN` mean "to the end".
pub fn slice(
    x: &Tensor,
    starts: &Tensor,
    ends: &Tensor,
    axes: Option<&Tensor>,
    steps: Option<&Tensor>,
) -> KResult<Tensor> {
    let r = x.rank();
    let starts = int_values(starts, "starts")?;
    let ends = int_values(ends, "ends")?;
    if starts.len() != ends.len() {
        return Err(format!(
            "starts {starts:?} and ends {ends:?} differ in length"
        ));
    }
    let axes = match axes {
        Some(t) => int_values(t, "axes")?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match steps {
        Some(t) => int_values(t, "steps")?,
        None => vec![1; starts.len()],
    };
    if axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(format!(
            "starts, ends, axes and steps must have the same length ({}, {}, {}, {})",
            starts.len(),
            ends.len(),
            axes.len(),
            steps.len()
        ));
    }
    let in_strides = contiguous_strides(&x.shape);
    let mut shape = x.shape.clone();
    let mut strides: Vec<isize> = in_strides.iter().map(|&s| s as isize).collect();
    let mut base = 0usize;
    let mut seen = vec![false; r];
    for k in 0..starts.len() {
        let a = norm_axis(axes[k], r, "axis")?;
        if seen[a] {
            return Err(format!("axis {} appears twice in {axes:?}", axes[k]));
        }
        seen[a] = true;
        let step = steps[k];
        if step == 0 {
            return Err(format!("step {k} is zero"));
        }
        let d = x.shape[a] as i128;
        let (mut s, mut e) = (starts[k] as i128, ends[k] as i128);
        if s < 0 {
            s += d;
        }
        if e < 0 {
            e += d;
        }
        let st = step as i128;
        let count = if st > 0 {
            s = s.clamp(0, d);
            e = e.clamp(0, d);
            if e > s {
                (e - s + st - 1) / st
            } else {
                0
            }
        } else {
            s = s.clamp(0, (d - 1).max(0));
            e = e.clamp(-1, d - 1);
            if s > e {
                (s - e + (-st) - 1) / (-st)
            } else {
                0
            }
        };
        let count = if d == 0 { 0 } else { count as usize };
        shape[a] = count;
        if count > 0 {
            base += s as usize * in_strides[a];
        }
        strides[a] *= step as isize;
    }
    if numel(&shape)? == 0 {
        return Ok(Tensor {
            dtype: x.dtype,
            data: map_data!(&x.data, _v => Vec::new()),
            shape,
        });
    }
    let data = map_data!(&x.data, v => strided_copy(v, base, &shape, &strides)?);
    Ok(Tensor {
        dtype: x.dtype,
        shape,
        data,
    })
}

// ---------------------------------------------------------------------------
// Gather, GatherND
// ---------------------------------------------------------------------------

fn index_values(t: &Tensor) -> KResult<&[i64]> {
    t.as_i64()
        .ok_or_else(|| format!("indices must be integers, got {}", t.dtype))
}

/// Copies `rows` rows of `len` elements: row `r` comes from `src[offset(r)..]`.
fn gather_rows<T: Copy + Default + Send + Sync>(
    src: &[T],
    rows: usize,
    len: usize,
    offset: impl Fn(usize) -> usize + Sync + Send,
) -> KResult<Vec<T>> {
    let mut out = alloc::<T>(rows * len)?;
    if len == 0 || rows == 0 {
        return Ok(out);
    }
    let rows_per_chunk = (PAR_CHUNK / len).max(1);
    let work = |ci: usize, chunk: &mut [T]| {
        for (k, row) in chunk.chunks_mut(len).enumerate() {
            let o = offset(ci * rows_per_chunk + k);
            row.copy_from_slice(&src[o..o + len]);
        }
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(rows_per_chunk * len)
            .enumerate()
            .for_each(|(ci, c)| work(ci, c));
    } else {
        out.chunks_mut(rows_per_chunk * len)
            .enumerate()
            .for_each(|(ci, c)| work(ci, c));
    }
    Ok(out)
}

/// `Gather(x, indices, axis)`; negative indices count from the end.
pub fn gather(x: &Tensor, indices: &Tensor, axis: i64) -> KResult<Tensor> {
    let ax = norm_axis(axis, x.rank(), "axis")?;
    let n = x.shape[ax];
    let raw = index_values(indices)?;
    let mut idx = Vec::with_capacity(raw.len());
    for (pos, &i) in raw.iter().enumerate() {
        let j = if i < 0 { i + n as i64 } else { i };
        if j < 0 || j >= n as i64 {
            return Err(format!(
                "index {i} (at position {pos} of the indices) is out of range for axis {ax} of size {n}"
            ));
        }
        idx.push(j as usize);
    }
    let outer: usize = x.shape[..ax].iter().product();
    let inner: usize = x.shape[ax + 1..].iter().product();
    let mut shape = x.shape[..ax].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&x.shape[ax + 1..]);
    let k = idx.len();
    let data = map_data!(&x.data, v => gather_rows(v, outer * k, inner, |row| {
        let (o, j) = (row / k, row % k);
        (o * n + idx[j]) * inner
    })?);
    Ok(Tensor {
        dtype: x.dtype,
        shape,
        data,
    })
}

/// `GatherND(x, indices, batch_dims)`.
pub fn gather_nd(x: &Tensor, indices: &Tensor, batch_dims: i64) -> KResult<Tensor> {
    let raw = index_values(indices)?;
    let (r, q) = (x.rank(), indices.rank());
    let b = usize::try_from(batch_dims).map_err(|_| format!("batch_dims {batch_dims} < 0"))?;
    if q == 0 || b >= q || b >= r {
        return Err(format!(
            "batch_dims {b} needs indices of rank > {b} and data of rank > {b} (got {q} and {r})"
        ));
    }
    if x.shape[..b] != indices.shape[..b] {
        return Err(format!(
            "the first {b} dimensions of data {:?} and indices {:?} differ",
            x.shape, indices.shape
        ));
    }
    let last = indices.shape[q - 1];
    if last > r - b {
        return Err(format!(
            "index tuples have {last} entries, but data {:?} has only {} dimensions after the batch ones",
            x.shape,
            r - b
        ));
    }
    let batch: usize = x.shape[..b].iter().product();
    let per_batch_tuples: usize = indices.shape[b..q - 1].iter().product();
    let slice_len: usize = x.shape[b + last..].iter().product();
    let batch_len: usize = x.shape[b..].iter().product();
    let indexed = &x.shape[b..b + last];
    let tstrides: Vec<usize> = contiguous_strides(indexed)
        .iter()
        .map(|s| s * slice_len)
        .collect();
    let tuples = batch * per_batch_tuples;
    let mut offsets = Vec::with_capacity(tuples);
    for t in 0..tuples {
        let mut off = (t / per_batch_tuples.max(1)) * batch_len;
        for (j, (&dim, &stride)) in indexed.iter().zip(&tstrides).enumerate() {
            let i = raw[t * last + j];
            let k = if i < 0 { i + dim as i64 } else { i };
            if k < 0 || k >= dim as i64 {
                return Err(format!(
                    "index {i} (tuple {t}, entry {j}) is out of range for a dimension of size {dim}"
                ));
            }
            off += k as usize * stride;
        }
        offsets.push(off);
    }
    let mut shape = indices.shape[..q - 1].to_vec();
    shape.extend_from_slice(&x.shape[b + last..]);
    let data = map_data!(&x.data, v => gather_rows(v, tuples, slice_len, |t| offsets[t])?);
    Ok(Tensor {
        dtype: x.dtype,
        shape,
        data,
    })
}

// ---------------------------------------------------------------------------
// Expand, Shape, Size
// ---------------------------------------------------------------------------

/// `Expand(x, shape)`: bidirectional broadcast of `x` against `shape`.
pub fn expand(x: &Tensor, shape: &Tensor) -> KResult<Tensor> {
    let spec = to_usize_dims(&int_values(shape, "the shape")?, "the shape")?;
    let out = broadcast_shapes(&x.shape, &spec)?;
    if out == x.shape {
        return Ok(x.clone());
    }
    let strides = broadcast_strides(&x.shape, &out);
    let data = map_data!(&x.data, v => strided_copy(v, 0, &out, &strides)?);
    Ok(Tensor {
        dtype: x.dtype,
        shape: out,
        data,
    })
}

/// `Shape(x, start, end)`: the dimensions in `[start, end)`, both clamped.
pub fn shape_of(x: &Tensor, start: Option<i64>, end: Option<i64>) -> Tensor {
    let r = x.rank() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = clamp(start.unwrap_or(0));
    let e = clamp(end.unwrap_or(r));
    let dims: Vec<i64> = if s < e {
        x.shape[s..e].iter().map(|&d| d as i64).collect()
    } else {
        Vec::new()
    };
    Tensor::i64(vec![dims.len()], dims)
}

/// `Size(x)`: the number of elements, as an i64 scalar.
pub fn size_of(x: &Tensor) -> Tensor {
    Tensor::scalar_i64(x.numel() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;

    fn f(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::f32(shape.to_vec(), v.to_vec())
    }
    fn i(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::i64(shape.to_vec(), v.to_vec())
    }
    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::f32(shape.to_vec(), (0..n).map(|k| k as f32).collect())
    }

    #[test]
    fn reshape_zero_minus_one_allowzero() {
        let x = iota(&[2, 3, 4]);
        let r = reshape(x.clone(), &i(&[2], &[0, -1]), false).unwrap();
        assert_eq!(r.shape, vec![2, 12]);
        assert_eq!(r.data, x.data);
        let r = reshape(x.clone(), &i(&[3], &[-1, 0, 2]), false).unwrap();
        assert_eq!(r.shape, vec![4, 3, 2]);
        let r = reshape(x.clone(), &i(&[0], &[]), false);
        assert!(r.is_err());
        assert!(reshape(x.clone(), &i(&[2], &[-1, -1]), false).is_err());
        assert!(reshape(x.clone(), &i(&[2], &[5, -1]), false)
            .unwrap_err()
            .contains("cannot reshape"));
        assert!(reshape(x.clone(), &i(&[2], &[4, 5]), false).is_err());
        // allowzero: 0 is a real zero
        let empty = iota(&[0, 3]);
        let r = reshape(empty.clone(), &i(&[3], &[3, 0, 4]), true).unwrap();
        assert_eq!(r.shape, vec![3, 0, 4]);
        let r = reshape(empty.clone(), &i(&[2], &[0, 3]), false).unwrap();
        assert_eq!(r.shape, vec![0, 3]);
        assert!(reshape(empty, &i(&[2], &[0, -1]), true).is_err());
        // without allowzero, 0 copies even when the result differs from allowzero
        let r = reshape(iota(&[4, 0]), &i(&[2], &[0, 7]), false);
        assert!(r.is_err());
        // reshape to scalar
        let r = reshape(f(&[1, 1], &[5.]), &i(&[0], &[]), false).unwrap();
        assert_eq!(r.shape, Vec::<usize>::new());
    }

    #[test]
    fn transpose_default_perm_and_tiles() {
        let x = iota(&[2, 3]);
        let t = transpose(&x, None).unwrap();
        assert_eq!(t.shape, vec![3, 2]);
        assert_eq!(t.as_f32().unwrap(), &[0., 3., 1., 4., 2., 5.]);
        // [2,3,4] perm (1,0,2): rows stay contiguous
        let x = iota(&[2, 3, 4]);
        let t = transpose(&x, Some(&[1, 0, 2])).unwrap();
        assert_eq!(t.shape, vec![3, 2, 4]);
        assert_eq!(
            &t.as_f32().unwrap()[..8],
            &[0., 1., 2., 3., 12., 13., 14., 15.]
        );
        // negative perm entries, and every permutation of a 3-D tensor vs naive
        let (a, b, c) = (3usize, 40usize, 37usize);
        let x = iota(&[a, b, c]);
        let perms: [[i64; 3]; 6] = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [-1, -2, -3],
        ];
        for p in perms {
            let t = transpose(&x, Some(&p)).unwrap();
            let pu: Vec<usize> = p.iter().map(|&v| v.rem_euclid(3) as usize).collect();
            let dims = [a, b, c];
            let os: Vec<usize> = pu.iter().map(|&k| dims[k]).collect();
            assert_eq!(t.shape, os);
            let got = t.as_f32().unwrap();
            let mut idx = [0usize; 3];
            for (flat, &g) in got.iter().enumerate() {
                let mut rem = flat;
                for d in (0..3).rev() {
                    idx[pu[d]] = rem % os[d];
                    rem /= os[d];
                }
                let want = (idx[0] * b * c + idx[1] * c + idx[2]) as f32;
                assert_eq!(g, want, "perm {p:?} at {flat}");
            }
        }
        // a big 2-D transpose takes the parallel tiled path
        let (m, n) = (300, 301);
        let x = iota(&[m, n]);
        let t = transpose(&x, None).unwrap();
        let got = t.as_f32().unwrap();
        for r in 0..n {
            for c in 0..m {
                assert_eq!(got[r * m + c], (c * n + r) as f32);
            }
        }
        assert!(transpose(&x, Some(&[0, 0])).is_err());
        assert!(transpose(&x, Some(&[0])).is_err());
    }

    #[test]
    fn concat_axes_and_errors() {
        let a = iota(&[2, 2]);
        let b = f(&[2, 1], &[10., 11.]);
        let r = concat(&[&a, &b], -1).unwrap();
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.as_f32().unwrap(), &[0., 1., 10., 2., 3., 11.]);
        let r = concat(&[&a, &a], 0).unwrap();
        assert_eq!(r.shape, vec![4, 2]);
        assert_eq!(r.as_f32().unwrap(), &[0., 1., 2., 3., 0., 1., 2., 3.]);
        let e = iota(&[2, 0]);
        let r = concat(&[&e, &a, &e], 1).unwrap();
        assert_eq!(r, a);
        assert!(concat(&[&a, &b], 0).is_err());
        assert!(concat(&[&a, &i(&[2, 2], &[1, 2, 3, 4])], 0).is_err());
        assert!(concat(&[&a], 2).is_err());
    }

    #[test]
    fn slice_cases() {
        let x = iota(&[3, 4]);
        let sl = |s: &[i64], e: &[i64], a: Option<&[i64]>, st: Option<&[i64]>| {
            let n = s.len();
            let at = a.map(|a| i(&[n], a));
            let stt = st.map(|v| i(&[n], v));
            slice(&x, &i(&[n], s), &i(&[n], e), at.as_ref(), stt.as_ref())
        };
        let r = sl(&[1, 0], &[3, 4], None, Some(&[1, 2])).unwrap();
        assert_eq!(r.shape, vec![2, 2]);
        assert_eq!(r.as_f32().unwrap(), &[4., 6., 8., 10.]);
        // negative start/end on axis -1
        let r = sl(&[-3], &[-1], Some(&[-1]), None).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[1., 2., 5., 6., 9., 10.]);
        // negative step, INT64_MIN end: reverse everything
        let r = sl(&[-1], &[i64::MIN], Some(&[1]), Some(&[-1])).unwrap();
        assert_eq!(r.shape, vec![3, 4]);
        assert_eq!(&r.as_f32().unwrap()[..4], &[3., 2., 1., 0.]);
        // negative step of -2 from an out-of-range start
        let r = sl(&[100], &[0], Some(&[1]), Some(&[-2])).unwrap();
        assert_eq!(r.shape, vec![3, 2]);
        assert_eq!(r.as_f32().unwrap(), &[3., 1., 7., 5., 11., 9.]);
        // INT64_MAX end, start out of bounds gives empty
        let r = sl(&[1], &[i64::MAX], Some(&[0]), None).unwrap();
        assert_eq!(r.shape, vec![2, 4]);
        let r = sl(&[10], &[i64::MAX], Some(&[0]), None).unwrap();
        assert_eq!(r.shape, vec![0, 4]);
        assert_eq!(r.numel(), 0);
        // end before start
        let r = sl(&[2], &[1], Some(&[1]), None).unwrap();
        assert_eq!(r.shape, vec![3, 0]);
        assert!(sl(&[0], &[1], Some(&[0]), Some(&[0])).is_err());
        assert!(sl(&[0, 0], &[1, 1], Some(&[0, -2]), None).is_err());
    }

    #[test]
    fn gather_negative_and_out_of_range() {
        let x = iota(&[3, 2]);
        let r = gather(&x, &i(&[2], &[-1, 0]), 0).unwrap();
        assert_eq!(r.shape, vec![2, 2]);
        assert_eq!(r.as_f32().unwrap(), &[4., 5., 0., 1.]);
        let r = gather(&x, &i(&[2, 2], &[1, 0, 0, 1]), 1).unwrap();
        assert_eq!(r.shape, vec![3, 2, 2]);
        assert_eq!(
            r.as_f32().unwrap(),
            &[1., 0., 0., 1., 3., 2., 2., 3., 5., 4., 4., 5.]
        );
        // scalar index removes the axis
        let r = gather(&x, &i(&[], &[1]), 0).unwrap();
        assert_eq!(r.shape, vec![2]);
        assert_eq!(r.as_f32().unwrap(), &[2., 3.]);
        let e = gather(&x, &i(&[2], &[0, 3]), 0).unwrap_err();
        assert!(e.contains("index 3") && e.contains("position 1"), "{e}");
        assert!(gather(&x, &i(&[1], &[-4]), 0).is_err());
    }

    #[test]
    fn gather_nd_batch_dims() {
        // ONNX examples.
        let data = i(&[2, 2], &[0, 1, 2, 3]);
        let r = gather_nd(&data, &i(&[2, 2], &[0, 0, 1, 1]), 0).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[0, 3]);
        let r = gather_nd(&data, &i(&[2, 1], &[1, 0]), 0).unwrap();
        assert_eq!(r.shape, vec![2, 2]);
        assert_eq!(r.as_i64().unwrap(), &[2, 3, 0, 1]);
        let data = i(&[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]);
        let r = gather_nd(&data, &i(&[2, 1, 2], &[0, 1, 1, 0]), 0).unwrap();
        assert_eq!(r.shape, vec![2, 1, 2]);
        assert_eq!(r.as_i64().unwrap(), &[2, 3, 4, 5]);
        let r = gather_nd(&data, &i(&[2, 1], &[1, 0]), 1).unwrap();
        assert_eq!(r.shape, vec![2, 2]);
        assert_eq!(r.as_i64().unwrap(), &[2, 3, 4, 5]);
        assert!(gather_nd(&data, &i(&[2, 1], &[2, 0]), 1).is_err());
        assert!(gather_nd(&data, &i(&[2, 4], &[0; 8]), 0).is_err());
    }

    #[test]
    fn squeeze_unsqueeze() {
        let x = iota(&[1, 3, 1]);
        let r = squeeze(x.clone(), None).unwrap();
        assert_eq!(r.shape, vec![3]);
        let r = squeeze(x.clone(), Some(&[-1])).unwrap();
        assert_eq!(r.shape, vec![1, 3]);
        assert!(squeeze(x.clone(), Some(&[1])).is_err());
        let r = unsqueeze(iota(&[3, 4]), &[0, -1]).unwrap();
        assert_eq!(r.shape, vec![1, 3, 4, 1]);
        let r = unsqueeze(iota(&[3, 4]), &[3, 1]).unwrap();
        assert_eq!(r.shape, vec![3, 1, 4, 1]);
        let r = unsqueeze(f(&[], &[1.]), &[0]).unwrap();
        assert_eq!(r.shape, vec![1]);
        assert!(unsqueeze(iota(&[3]), &[0, 0]).is_err());
        assert!(unsqueeze(iota(&[3]), &[3]).is_err());
    }

    #[test]
    fn expand_bidirectional() {
        let x = f(&[3, 1], &[1., 2., 3.]);
        let r = expand(&x, &i(&[3], &[2, 1, 2])).unwrap();
        assert_eq!(r.shape, vec![2, 3, 2]);
        assert_eq!(
            r.as_f32().unwrap(),
            &[1., 1., 2., 2., 3., 3., 1., 1., 2., 2., 3., 3.]
        );
        // target smaller than input in a dimension: input wins
        let r = expand(&x, &i(&[1], &[1])).unwrap();
        assert_eq!(r, x);
        assert!(expand(&x, &i(&[1], &[4])).is_ok());
        assert!(expand(&x, &i(&[2], &[2, 2])).is_err());
        assert!(expand(&x, &i(&[1], &[-2])).is_err());
    }

    #[test]
    fn shape_size_split() {
        let x = iota(&[2, 3, 4]);
        assert_eq!(shape_of(&x, None, None).as_i64().unwrap(), &[2, 3, 4]);
        assert_eq!(shape_of(&x, Some(-1), None).as_i64().unwrap(), &[4]);
        assert_eq!(shape_of(&x, Some(1), Some(-1)).as_i64().unwrap(), &[3]);
        assert_eq!(
            shape_of(&x, Some(-10), Some(10)).as_i64().unwrap(),
            &[2, 3, 4]
        );
        assert_eq!(shape_of(&x, Some(2), Some(1)).shape, vec![0]);
        let s = size_of(&x);
        assert_eq!(s.shape, Vec::<usize>::new());
        assert_eq!(s.as_i64().unwrap(), &[24]);

        let v = iota(&[7]);
        let parts = split(&v, 0, None, 3).unwrap();
        let shapes: Vec<_> = parts.iter().map(|p| p.shape[0]).collect();
        assert_eq!(shapes, vec![3, 3, 1]);
        assert_eq!(parts[2].as_f32().unwrap(), &[6.]);
        let parts = split(&iota(&[2, 5]), -1, Some(&[2, 0, 3]), 3).unwrap();
        assert_eq!(parts[0].as_f32().unwrap(), &[0., 1., 5., 6.]);
        assert_eq!(parts[1].shape, vec![2, 0]);
        assert_eq!(parts[2].as_f32().unwrap(), &[2., 3., 4., 7., 8., 9.]);
        assert!(split(&v, 0, Some(&[3, 3]), 2).is_err());
        assert!(split(&v, 0, Some(&[8, -1]), 2).is_err());
        let p = split(
            &Tensor {
                dtype: DType::I32,
                ..i(&[4], &[1, 2, 3, 4])
            },
            0,
            None,
            2,
        )
        .unwrap();
        assert_eq!(p[1].dtype, DType::I32);
        assert_eq!(p[1].as_i64().unwrap(), &[3, 4]);
    }
}
