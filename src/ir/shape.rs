//! Symbolic shapes: one graph serves every batch size and sequence length.

use super::DType;
use std::fmt;

/// One dimension: a fixed size or a named symbol (`batch`, `seq`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Fixed(u64),
    Sym(String),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    pub fn fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) if s.is_empty() => f.write_str("?"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// The type of a value: element type and, where known, its shape. A shape of
/// `None` means the rank itself is unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType {
            dtype,
            shape: Some(shape),
        }
    }

    pub fn fixed(dtype: DType, dims: &[usize]) -> Self {
        TensorType::new(dtype, dims.iter().map(|&d| Dim::Fixed(d as u64)).collect())
    }

    pub fn unranked(dtype: DType) -> Self {
        TensorType { dtype, shape: None }
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// Binds the symbols of this type against a concrete shape, checking fixed
    /// dims; returns a description of the first mismatch.
    pub fn check_concrete(
        &self,
        actual: &[usize],
        bindings: &mut std::collections::BTreeMap<String, usize>,
    ) -> std::result::Result<(), String> {
        let Some(shape) = &self.shape else {
            return Ok(());
        };
        if shape.len() != actual.len() {
            return Err(format!(
                "expected rank {} ({}), got shape {:?}",
                shape.len(),
                self,
                actual
            ));
        }
        for (i, (d, &a)) in shape.iter().zip(actual).enumerate() {
            match d {
                Dim::Fixed(n) if *n as usize != a => {
                    return Err(format!(
                        "dimension {i} must be {n} ({}), got shape {:?}",
                        self, actual
                    ))
                }
                Dim::Sym(s) if !s.is_empty() => {
                    if let Some(&prev) = bindings.get(s) {
                        if prev != a {
                            return Err(format!(
                                "dimension {i} is '{s}', bound to {prev} elsewhere, got {a}"
                            ));
                        }
                    } else {
                        bindings.insert(s.clone(), a);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dtype)?;
        match &self.shape {
            None => f.write_str("[*]"),
            Some(dims) => {
                f.write_str("[")?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
        }
    }
}
