//! Weights: references into memory-mapped files, never copied at import.

use super::{DType, Tensor, TensorData};
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only memory map of one file, shared by every weight that lives in it.
#[derive(Debug)]
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
}

impl MappedFile {
    /// Maps `path`. An empty file maps to an empty slice (mmap of length 0
    /// fails on Linux, so it is not mapped at all).
    pub fn open(path: &Path) -> Result<Arc<MappedFile>> {
        crate::util::check_regular_file(path)?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only. A file truncated by another process
        // while mapped would fault; that is the documented hazard of every
        // mmap-based loader (safetensors, onnxruntime) and is accepted here.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Arc::new(MappedFile {
            path: path.to_path_buf(),
            map,
        }))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Where a weight's bytes are.
#[derive(Clone, Debug)]
pub enum WeightData {
    /// `len` bytes at `offset` in a mapped file.
    Mapped {
        file: Arc<MappedFile>,
        offset: usize,
        len: usize,
    },
    /// Little-endian bytes held in memory (small tensors, trained weights).
    Owned(Arc<Vec<u8>>),
    /// A shape-only model: the weight has a type but no values.
    Absent,
}

/// One named parameter of the model.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: WeightData,
    pub trainable: bool,
}

impl Weight {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The raw little-endian bytes, if the weight has values.
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.data {
            WeightData::Mapped { file, offset, len } => file.bytes().get(*offset..*offset + *len),
            WeightData::Owned(v) => Some(v),
            WeightData::Absent => None,
        }
    }

    /// Where the bytes come from, for error messages.
    pub fn source(&self) -> String {
        match &self.data {
            WeightData::Mapped { file, offset, .. } => {
                format!("{} at offset {offset}", file.path.display())
            }
            WeightData::Owned(_) => "memory".into(),
            WeightData::Absent => "nowhere (shape-only model)".into(),
        }
    }

    /// Decodes the weight into a compute tensor (f16/bf16 become f32).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let bytes = self.bytes().ok_or_else(|| {
            Error::invalid(format!(
                "weight '{}' has no data ({}); a shape-only model can be inspected but not run",
                self.name,
                self.source()
            ))
        })?;
        crate::memory::check(
            self.numel() as u128 * self.dtype.size().max(4) as u128,
            &format!("decoding weight '{}' {:?}", self.name, self.shape),
        )?;
        Tensor::from_le_bytes(self.dtype, self.shape.clone(), bytes)
            .map_err(|e| Error::invalid(format!("weight '{}': {e}", self.name)))
    }

    /// A weight holding a tensor's values in memory.
    pub fn from_tensor(name: impl Into<String>, t: &Tensor, trainable: bool) -> Weight {
        Weight {
            name: name.into(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: WeightData::Owned(Arc::new(t.to_le_bytes())),
            trainable,
        }
    }
}

/// The model's weights by name, in insertion order (which export preserves).
///
/// Removal leaves a tombstone that is compacted away once tombstones are the
/// majority, so every operation is amortised O(1) and building a model is
/// linear in its number of weights.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    items: Vec<Option<Weight>>,
    index: HashMap<String, usize>,
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a weight (a replaced weight keeps its position).
    pub fn insert(&mut self, w: Weight) {
        match self.index.get(&w.name) {
            Some(&i) => self.items[i] = Some(w),
            None => {
                self.index.insert(w.name.clone(), self.items.len());
                self.items.push(Some(w));
            }
        }
    }

    /// Replaces the values of existing weight `name` by `t`, stored in the
    /// weight's dtype (f32 or f64 values; shapes must match). `what` says
    /// where the values came from, for errors.
    pub fn replace_values(
        &mut self,
        name: &str,
        t: &Tensor,
        trainable: bool,
        what: &str,
    ) -> Result<()> {
        let w = self.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "{what}: tensor '{name}' is not a weight of the model"
            ))
        })?;
        if w.shape != t.shape {
            return Err(Error::invalid(format!(
                "{what}: tensor '{name}' has shape {:?}, the model's weight is {:?} (was it made for another model or rank?)",
                t.shape, w.shape
            )));
        }
        let data = match (&t.data, w.dtype) {
            (TensorData::F32(v), DType::F64) => {
                TensorData::F64(v.iter().map(|&x| x as f64).collect())
            }
            (TensorData::F64(v), d) if d != DType::F64 => {
                TensorData::F32(v.iter().map(|&x| x as f32).collect())
            }
            (TensorData::F32(_) | TensorData::F64(_), _) => t.data.clone(),
            _ => {
                return Err(Error::invalid(format!(
                    "{what}: tensor '{name}' is {}, not a float type",
                    t.dtype
                )))
            }
        };
        let typed = Tensor {
            dtype: w.dtype,
            shape: t.shape.clone(),
            data,
        };
        self.insert(Weight::from_tensor(name, &typed, trainable));
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Weight> {
        self.index.get(name).and_then(|&i| self.items[i].as_ref())
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Weight> {
        self.index.get(name).and_then(|&i| self.items[i].as_mut())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Weight> {
        let i = self.index.remove(name)?;
        let w = self.items[i].take();
        if self.index.len() * 2 < self.items.len() {
            self.compact();
        }
        w
    }

    /// Drops the tombstones, renumbering the index.
    fn compact(&mut self) {
        self.items.retain(Option::is_some);
        for (i, w) in self.items.iter().enumerate() {
            if let Some(w) = w {
                self.index.insert(w.name.clone(), i);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Weight> {
        self.items.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn num_params(&self) -> u64 {
        self.iter().map(|w| w.numel() as u64).sum()
    }

    pub fn num_bytes(&self) -> u64 {
        self.iter().map(|w| w.nbytes() as u64).sum()
    }
}
