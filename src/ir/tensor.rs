//! Host tensors: the values the CPU runtime computes with, and the payload of
//! small constants in the graph.
//!
//! Storage types collapse onto compute types: f16/bf16 values are held as f32
//! (rounded to their storage precision), i32/i8/u8 as i64. `dtype` remembers
//! the logical type so that casts, exports and prints stay exact.

use super::DType;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Number of elements of a shape, or an error when it overflows `usize`.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(checked_numel(&shape), Some(data.len()));
        Tensor {
            dtype: DType::F32,
            shape,
            data: TensorData::F32(data),
        }
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        debug_assert_eq!(checked_numel(&shape), Some(data.len()));
        Tensor {
            dtype: DType::I64,
            shape,
            data: TensorData::I64(data),
        }
    }

    pub fn bool(shape: Vec<usize>, data: Vec<bool>) -> Tensor {
        Tensor {
            dtype: DType::Bool,
            shape,
            data: TensorData::Bool(data),
        }
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor::f32(vec![], vec![v])
    }

    pub fn scalar_i64(v: i64) -> Tensor {
        Tensor::i64(vec![], vec![v])
    }

    /// A float scalar of `dtype` (f16/bf16 rounded to their precision;
    /// any other dtype gives f32).
    pub fn scalar_of(dtype: DType, v: f64) -> Tensor {
        let data = match dtype {
            DType::F64 => TensorData::F64(vec![v]),
            DType::F16 => TensorData::F32(vec![half::f16::from_f64(v).to_f32()]),
            DType::BF16 => TensorData::F32(vec![half::bf16::from_f64(v).to_f32()]),
            _ => TensorData::F32(vec![v as f32]),
        };
        let dtype = if dtype.is_float() { dtype } else { DType::F32 };
        Tensor {
            dtype,
            shape: vec![],
            data,
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Zeros of a logical dtype.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = checked_numel(&shape).unwrap_or(0);
        let data = match dtype {
            DType::F32 | DType::F16 | DType::BF16 => TensorData::F32(vec![0.0; n]),
            DType::F64 => TensorData::F64(vec![0.0; n]),
            DType::Bool => TensorData::Bool(vec![false; n]),
            _ => TensorData::I64(vec![0; n]),
        };
        Tensor { dtype, shape, data }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            TensorData::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The values as f64, whatever the type (for comparisons and printing).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        }
    }

    /// The values as i64 (shape inputs, axes, indices). Floats are truncated.
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::F64(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::I64(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|&x| x as i64).collect(),
        }
    }

    /// Decodes little-endian bytes of `dtype` into a tensor.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor> {
        let n = checked_numel(&shape)
            .ok_or_else(|| Error::invalid(format!("shape {shape:?} overflows")))?;
        let need = n
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::invalid(format!("shape {shape:?} overflows")))?;
        if bytes.len() != need {
            return Err(Error::invalid(format!(
                "{dtype}{shape:?} needs {need} bytes, got {}",
                bytes.len()
            )));
        }
        let data = match dtype {
            DType::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::BF16 => TensorData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::F64 => TensorData::F64(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::I64 => TensorData::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::I32 => TensorData::I64(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            DType::I8 => TensorData::I64(bytes.iter().map(|&b| b as i8 as i64).collect()),
            DType::U8 => TensorData::I64(bytes.iter().map(|&b| b as i64).collect()),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Tensor { dtype, shape, data })
    }

    /// Encodes the tensor as little-endian bytes of its logical dtype.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * self.dtype.size());
        match (&self.data, self.dtype) {
            (TensorData::F32(v), DType::F16) => {
                for x in v {
                    out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes());
                }
            }
            (TensorData::F32(v), DType::BF16) => {
                for x in v {
                    out.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
                }
            }
            (TensorData::F32(v), _) => {
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            (TensorData::F64(v), _) => {
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            (TensorData::I64(v), DType::I32) => {
                for x in v {
                    out.extend_from_slice(&(*x as i32).to_le_bytes());
                }
            }
            (TensorData::I64(v), DType::I8) => out.extend(v.iter().map(|&x| x as i8 as u8)),
            (TensorData::I64(v), DType::U8) => out.extend(v.iter().map(|&x| x as u8)),
            (TensorData::I64(v), _) => {
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            (TensorData::Bool(v), _) => out.extend(v.iter().map(|&b| b as u8)),
        }
        out
    }

    /// A short, deterministic rendering for the canonical print: the values
    /// when there are few, else a content hash.
    pub fn summary(&self) -> String {
        let n = self.numel();
        if n <= 8 {
            let vals: Vec<String> = match &self.data {
                TensorData::F32(v) => v.iter().map(|x| format_f32(*x)).collect(),
                TensorData::F64(v) => v.iter().map(|x| format_float(*x)).collect(),
                TensorData::I64(v) => v.iter().map(|x| x.to_string()).collect(),
                TensorData::Bool(v) => v.iter().map(|x| x.to_string()).collect(),
            };
            format!("[{}]", vals.join(", "))
        } else {
            format!("<{} values, fnv {:016x}>", n, fnv1a(&self.to_le_bytes()))
        }
    }
}

/// Shortest round-trippable float rendering, with `inf`/`nan` spelled out.
pub fn format_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        let s = format!("{x:?}");
        s
    }
}

/// Shortest round-trippable rendering of an f32 (`1e-5`, not its f64 widening).
pub fn format_f32(x: f32) -> String {
    if x.is_finite() {
        format!("{x:?}")
    } else {
        format_float(x as f64)
    }
}

/// FNV-1a, used for stable content hashes in prints (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
