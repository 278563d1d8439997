//! safetensors files: read by memory-mapping (weights are never copied),
//! written by streaming, single or sharded as transformers' `save_pretrained`.
//!
//! The header is validated here before any tensor is touched: the 8-byte
//! length lies within the file, the JSON parses, every dtype is known, every
//! tensor's `data_offsets` lie within the data region, `end - start` equals
//! `numel × dtype size` (checked arithmetic), and no two tensors overlap. A
//! header that lies is an error naming the file and the tensor.

use crate::ir::tensor::checked_numel;
use crate::ir::{DType, MappedFile, Tensor, Weight, WeightData, WeightStore};
use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The single-file weights name transformers writes and reads.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// safetensors' own limit on the header size.
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Write granularity; an all-zero block of this size becomes a hole.
const BLOCK: usize = 1 << 20;

/// One tensor's entry in a header, offsets absolute in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub len: usize,
}

/// A validated header: tensors in data order, and `__metadata__`.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub tensors: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

fn dtype_from_name(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I8" => DType::I8,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// Parses and validates the header of a safetensors file held in `bytes`.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let fail = |msg: String| Error::format(path, msg);
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(fail(format!(
            "{file_len} bytes is too short for a safetensors file (the header length alone takes 8)"
        )));
    };
    let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(fail(format!(
            "the header claims {n} bytes but the file has {} after the length; the file is truncated or not safetensors",
            file_len - 8
        )));
    }
    let data_start = 8 + n as usize;
    let header_bytes = &bytes[8..data_start];
    let data_len = bytes.len() - data_start;
    let json: Value = serde_json::from_slice(header_bytes)
        .map_err(|e| fail(format!("the header is not valid JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| fail("the header is not a JSON object".into()))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            let m = entry
                .as_object()
                .ok_or_else(|| fail("__metadata__ is not an object".into()))?;
            for (k, v) in m {
                let v = v
                    .as_str()
                    .ok_or_else(|| fail(format!("__metadata__ value of '{k}' is not a string")))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let bad = |what: &str| fail(format!("tensor '{name}': {what}"));
        let e = entry
            .as_object()
            .ok_or_else(|| bad("its header entry is not an object"))?;
        let dtype_name = e
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no 'dtype' string"))?;
        let dtype = dtype_from_name(dtype_name).ok_or_else(|| {
            bad(&format!(
                "dtype '{dtype_name}' is not supported (lcc reads F32, F16, BF16, F64, I64, I32, I8, U8, BOOL)"
            ))
        })?;
        let shape: Vec<usize> = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no 'shape' array"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("'shape' holds something other than non-negative integers"))?;
        let offs: Vec<u64> = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no 'data_offsets' array"))?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad("'data_offsets' holds something other than non-negative integers")
            })?;
        let [start, end] = offs[..] else {
            return Err(bad(&format!(
                "'data_offsets' must be [begin, end], has {} values",
                offs.len()
            )));
        };
        if start > end {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}] end before they begin"
            )));
        }
        if end > data_len as u64 {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}] reach past the data region ({data_len} bytes); the header lies or the file is truncated"
            )));
        }
        let need = checked_numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        let len = (end - start) as usize;
        if len != need {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}] hold {len} bytes but {dtype_name}{shape:?} needs {need}"
            )));
        }
        tensors.push(TensorEntry {
            name: name.clone(),
            dtype,
            shape,
            offset: data_start + start as usize,
            len,
        });
    }
    tensors.sort_by(|a, b| (a.offset, a.len, &a.name).cmp(&(b.offset, b.len, &b.name)));
    for pair in tensors.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.offset < a.offset + a.len {
            return Err(fail(format!(
                "tensor '{}' overlaps tensor '{}' (bytes {}..{} and {}..{} of the data region); the header lies",
                b.name,
                a.name,
                b.offset - data_start,
                b.offset - data_start + b.len,
                a.offset - data_start,
                a.offset - data_start + a.len
            )));
        }
    }
    Ok(Header { tensors, metadata })
}

/// Maps `path` and validates its header.
fn open(path: &Path) -> Result<(Arc<MappedFile>, Header)> {
    let file = MappedFile::open(path)?;
    let header = parse_header(path, file.bytes())?;
    Ok((file, header))
}

/// The tensors of one safetensors file as frozen weights referencing the
/// memory map, in data order.
pub fn read_safetensors(path: &Path) -> Result<Vec<Weight>> {
    let (file, header) = open(path)?;
    Ok(header
        .tensors
        .into_iter()
        .map(|t| Weight {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            data: WeightData::Mapped {
                file: file.clone(),
                offset: t.offset,
                len: t.len,
            },
            trainable: false,
        })
        .collect())
}

/// The `__metadata__` of a safetensors file.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    Ok(open(path)?.1.metadata)
}

/// Every tensor of a safetensors file decoded into host tensors (f16/bf16
/// become f32 values, as everywhere in lcc), in data order.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let (file, header) = open(path)?;
    header
        .tensors
        .into_iter()
        .map(|t| {
            let bytes = &file.bytes()[t.offset..t.offset + t.len];
            let tensor = Tensor::from_le_bytes(t.dtype, t.shape, bytes)
                .map_err(|e| Error::format(path, format!("tensor '{}': {e}", t.name)))?;
            Ok((t.name, tensor))
        })
        .collect()
}

/// Writes host tensors (any dtype) to one safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let weights: Vec<Weight> = tensors
        .iter()
        .map(|(n, t)| Weight::from_tensor(n.clone(), t, false))
        .collect();
    let refs: Vec<&Weight> = weights.iter().collect();
    write_safetensors(path, &refs, &[])
}

/// The header bytes (padded with spaces to a multiple of 8, as safetensors
/// does) for `weights` laid out in the given order.
fn header_bytes(weights: &[&Weight], metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let mut h = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        h.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&q(k));
            h.push(':');
            h.push_str(&q(v));
        }
        h.push('}');
        first = false;
    }
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0usize;
    for w in weights {
        if w.name == "__metadata__" || !seen.insert(w.name.as_str()) {
            return Err(Error::invalid(format!(
                "cannot write tensor '{}' to safetensors: the name is reserved or repeated",
                w.name
            )));
        }
        let len = checked_numel(&w.shape)
            .and_then(|n| n.checked_mul(w.dtype.size()))
            .ok_or_else(|| Error::invalid(format!("weight '{}': shape overflows", w.name)))?;
        if !first {
            h.push(',');
        }
        first = false;
        let shape: Vec<String> = w.shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            q(&w.name),
            w.dtype.safetensors_name(),
            shape.join(","),
            offset,
            offset + len
        ));
        offset += len;
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// Streams one weight's bytes to `out`, turning all-zero blocks into holes.
/// Mapped weights are read through the map and their pages dropped behind
/// the read, so writing a multi-GB model keeps the resident set small.
fn stream_weight(w: &Weight, out: &mut File, out_path: &Path) -> Result<()> {
    let (bytes, map): (&[u8], Option<(&MappedFile, usize)>) = match &w.data {
        WeightData::Mapped { file, offset, len } => {
            let range = offset.checked_add(*len).map(|end| *offset..end);
            let b = range.and_then(|r| file.bytes().get(r)).ok_or_else(|| {
                Error::format(
                    &file.path,
                    format!(
                        "weight '{}' lies outside the mapped file (offset {offset}, {len} bytes)",
                        w.name
                    ),
                )
            })?;
            (b, Some((file.as_ref(), *offset)))
        }
        WeightData::Owned(v) => (v.as_slice(), None),
        WeightData::Absent => {
            return Err(Error::invalid(format!(
            "weight '{}' has no data (shape-only model); only a model with weights can be saved",
            w.name
        )))
        }
    };
    if bytes.len() != w.nbytes() {
        return Err(Error::invalid(format!(
            "weight '{}' holds {} bytes but {}{:?} needs {}",
            w.name,
            bytes.len(),
            w.dtype,
            w.shape,
            w.nbytes()
        )));
    }
    for (i, chunk) in bytes.chunks(BLOCK).enumerate() {
        if crate::util::is_all_zero(chunk) {
            out.seek(SeekFrom::Current(chunk.len() as i64))
                .map_err(|e| Error::io(out_path, e))?;
        } else {
            out.write_all(chunk).map_err(|e| Error::io(out_path, e))?;
        }
        if let Some((file, offset)) = map {
            // SAFETY: the map is a private read-only file mapping; dropping
            // its pages only makes a later access fault them in again from
            // the file, so no reference into the map is invalidated.
            unsafe {
                let _ = file.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset + i * BLOCK,
                    chunk.len(),
                );
            }
        }
    }
    Ok(())
}

/// A temporary sibling name for `path` (same directory, so rename is atomic).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.lcc-tmp-{}", std::process::id()))
}

/// Writes `weights` (in this order) to one safetensors file. The file
/// appears only when complete (written under a temporary name, then
/// renamed); all-zero 1 MiB blocks stay holes, so a sparse source stays
/// sparse.
pub fn write_safetensors(
    path: &Path,
    weights: &[&Weight],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let header = header_bytes(weights, metadata)?;
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let mut out = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        out.write_all(&header).map_err(|e| Error::io(&tmp, e))?;
        let mut total = header.len() as u64;
        for w in weights {
            stream_weight(w, &mut out, &tmp)?;
            total += w.nbytes() as u64;
        }
        // Trailing holes were only seeked over; give the file its length.
        out.set_len(total).map_err(|e| Error::io(&tmp, e))?;
        out.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| e.naming_output(&tmp, path))
}

/// Splits weights into shards as `huggingface_hub`'s
/// `split_state_dict_into_shards_factory`: greedy in order; a tensor larger
/// than the limit gets a shard of its own.
fn plan_shards<'a>(weights: &[&'a Weight], max_shard_size: u64) -> Vec<Vec<&'a Weight>> {
    let mut shards: Vec<Vec<&Weight>> = Vec::new();
    let mut current: Vec<&Weight> = Vec::new();
    let mut current_size = 0u64;
    for &w in weights {
        let size = w.nbytes() as u64;
        if size > max_shard_size {
            shards.push(vec![w]);
            continue;
        }
        if current_size + size > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(w);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes `weights` into `dir` as transformers does: `model.safetensors`
/// when they fit in one shard, else `model-0000i-of-0000N.safetensors` plus
/// `model.safetensors.index.json`. Returns the file names written.
pub fn write_sharded(dir: &Path, weights: &[&Weight], max_shard_size: u64) -> Result<Vec<String>> {
    let shards = plan_shards(weights, max_shard_size.max(1));
    let meta = [("format", "pt")];
    if shards.len() == 1 {
        write_safetensors(&dir.join(SINGLE_FILE), &shards[0], &meta)?;
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let n = shards.len();
    let mut names = Vec::with_capacity(n + 1);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_safetensors(&dir.join(&name), shard, &meta)?;
        for w in shard {
            weight_map.insert(w.name.clone(), Value::String(name.clone()));
        }
        names.push(name);
    }
    let total_size: u64 = weights.iter().map(|w| w.nbytes() as u64).sum();
    let total_parameters: u64 = weights.iter().map(|w| w.numel() as u64).sum();
    let index = serde_json::json!({
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).expect("JSON serializes") + "\n";
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    names.push(INDEX_FILE.to_string());
    Ok(names)
}

/// Is `name` a plain file name (no directories, not `.`/`..`)?
fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// The weights of a Hugging Face dir: `model.safetensors.index.json` with
/// its shards if present, else `model.safetensors`. `None` when the dir
/// holds no weights at all (a shape-only model).
pub fn load_dir_weights(dir: &Path) -> Result<Option<WeightStore>> {
    let index = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    let mut store = WeightStore::new();
    if index.is_file() {
        let text = crate::util::read_text_capped(&index, crate::util::MAX_TEXT_BYTES)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(&index, "no 'weight_map' object"))?;
        // shard file → tensors it must hold.
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::format(&index, format!("weight_map['{tensor}'] is not a file name"))
            })?;
            if !plain_file_name(file) {
                return Err(Error::format(
                    &index,
                    format!(
                        "weight_map['{tensor}'] = '{file}' is not a file name in this directory"
                    ),
                ));
            }
            by_file.entry(file).or_default().push(tensor);
        }
        for (file, names) in &by_file {
            let shard = dir.join(file);
            if !shard.is_file() {
                return Err(Error::format(
                    &index,
                    format!(
                        "lists shard '{file}' (for tensor '{}'), which does not exist in {}",
                        names[0],
                        dir.display()
                    ),
                ));
            }
            let mut found: std::collections::HashMap<String, Weight> = read_safetensors(&shard)?
                .into_iter()
                .map(|w| (w.name.clone(), w))
                .collect();
            for name in names {
                let w = found.remove(*name).ok_or_else(|| {
                    Error::format(
                        &shard,
                        format!("has no tensor '{name}', which {INDEX_FILE} places in it"),
                    )
                })?;
                store.insert(w);
            }
        }
        return Ok(Some(store));
    }
    if single.is_file() {
        for w in read_safetensors(&single)? {
            store.insert(w);
        }
        return Ok(Some(store));
    }
    // Weights in a form lcc does not read must not pass for a shape-only model.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") || name.ends_with(".bin") || name.ends_with(".pt") {
                return Err(Error::format(
                    dir,
                    format!(
                        "holds weights in '{name}' but neither {SINGLE_FILE} nor {INDEX_FILE}; lcc reads Hugging Face safetensors checkpoints (save with `save_pretrained(..., safe_serialization=True)`)"
                    ),
                ));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with a hand-written header and `data_len` data bytes.
    fn raw_file(dir: &Path, header: &str, data_len: usize) -> PathBuf {
        let p = dir.join("t.safetensors");
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(7u8, data_len));
        std::fs::write(&p, b).unwrap();
        p
    }

    fn err(dir: &Path, header: &str, data_len: usize) -> String {
        let p = raw_file(dir, header, data_len);
        read_safetensors(&p).unwrap_err().to_string()
    }

    #[test]
    fn writes_and_reads_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let tensors = vec![
            (
                "a".to_string(),
                Tensor::f32(vec![2, 2], vec![1.0, -2.5, 3.0, 0.0]),
            ),
            (
                "b".to_string(),
                Tensor::from_le_bytes(DType::BF16, vec![2], &[0x80, 0x3f, 0x00, 0xc0]).unwrap(),
            ),
            (
                "c".to_string(),
                Tensor::from_le_bytes(DType::F16, vec![1], &[0x00, 0x3c]).unwrap(),
            ),
            ("d".to_string(), Tensor::i64(vec![3], vec![1, -2, 1 << 40])),
            (
                "e".to_string(),
                Tensor::from_le_bytes(DType::I32, vec![2], &[1, 0, 0, 0, 255, 255, 255, 255])
                    .unwrap(),
            ),
            (
                "f".to_string(),
                Tensor::bool(vec![3], vec![true, false, true]),
            ),
            ("g".to_string(), Tensor::f32(vec![0, 4], vec![])),
        ];
        write_tensors(&p, &tensors).unwrap();
        let back = read_tensors(&p).unwrap();
        assert_eq!(back, tensors);
        assert_eq!(back[1].1.as_f32().unwrap(), &[1.0, -2.0]);
        let raw = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data starts 8-aligned");
        // The Python reader agrees on the layout: offsets are relative and contiguous.
        let w = read_safetensors(&p).unwrap();
        assert_eq!(w[0].name, "a");
        assert!(matches!(w[0].data, WeightData::Mapped { offset, len: 16, .. } if offset == 8 + n));
    }

    #[test]
    fn metadata_survives() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let w = Weight::from_tensor("w", &Tensor::f32(vec![1], vec![1.0]), false);
        write_safetensors(&p, &[&w], &[("format", "pt"), ("k\"ey", "v")]).unwrap();
        let m = read_metadata(&p).unwrap();
        assert_eq!(m.get("format").map(String::as_str), Some("pt"));
        assert_eq!(m.get("k\"ey").map(String::as_str), Some("v"));
    }

    #[test]
    fn lying_headers_are_errors_naming_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = d.join("t.safetensors").display().to_string();
        // Past the end of the data region.
        let e = err(
            d,
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        assert!(
            e.starts_with(&path) && e.contains("tensor 'w'") && e.contains("past the data region"),
            "{e}"
        );
        // Overlapping.
        let e = err(
            d,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            16,
        );
        assert!(e.contains("tensor 'b' overlaps tensor 'a'"), "{e}");
        // Wrong length for the shape.
        let e = err(
            d,
            r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(
            e.contains("tensor 'w'") && e.contains("hold 8 bytes but BF16[3] needs 6"),
            "{e}"
        );
        // Overflowing shape.
        let e = err(
            d,
            r#"{"w":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(e.contains("tensor 'w'") && e.contains("overflows"), "{e}");
        // Reversed offsets, unknown dtype, malformed entries.
        let e = err(
            d,
            r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#,
            8,
        );
        assert!(e.contains("end before they begin"), "{e}");
        let e = err(
            d,
            r#"{"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#,
            8,
        );
        assert!(e.contains("dtype 'F8_E4M3' is not supported"), "{e}");
        let e = err(
            d,
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
            8,
        );
        assert!(e.contains("must be [begin, end]"), "{e}");
        let e = err(
            d,
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            8,
        );
        assert!(e.contains("'shape'"), "{e}");
        let e = err(d, r#"[1]"#, 8);
        assert!(e.contains("not a JSON object"), "{e}");
        let e = err(d, r#"{"w": "#, 8);
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn truncated_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short.safetensors");
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        let e = read_safetensors(&p).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        std::fs::write(&p, []).unwrap();
        assert!(read_safetensors(&p)
            .unwrap_err()
            .to_string()
            .contains("too short"));
        // Claims a header longer than the file.
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(&p, &b).unwrap();
        let e = read_safetensors(&p).unwrap_err().to_string();
        assert!(e.contains("claims 1000 bytes but the file has 2"), "{e}");
        // A huge claimed length must not be believed (u64::MAX - 8 overflows naive checks).
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(&p, &b).unwrap();
        assert!(read_safetensors(&p).is_err());
    }

    #[test]
    fn zero_blocks_become_holes_and_read_back_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.safetensors");
        let n = 3 * BLOCK / 4 + 5; // f32 → 3 MiB + 20 bytes, all zero but one block
        let mut v = vec![0f32; n];
        v[BLOCK / 4 + 3] = 1.5; // lands in the second block
        let t = Tensor::f32(vec![n], v.clone());
        write_tensors(&p, &[("z".into(), t.clone())]).unwrap();
        let back = read_tensors(&p).unwrap();
        assert_eq!(back[0].1, t);
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&p).unwrap();
        let head = std::fs::read(&p).unwrap();
        let header_len = u64::from_le_bytes(head[..8].try_into().unwrap()) as usize;
        assert_eq!(
            md.len() as usize,
            8 + header_len + n * 4,
            "trailing hole kept by set_len"
        );
        // Allocated blocks are far fewer than the length (filesystems without
        // holes, e.g. some overlays, would allocate all; skip then).
        let allocated = md.blocks() * 512;
        if allocated < md.len() {
            assert!(
                allocated < 2 * BLOCK as u64 + 65536,
                "allocated {allocated}"
            );
        }
    }

    #[test]
    fn a_sparse_mapped_source_stays_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.safetensors");
        let n = 16usize << 20; // 64 MiB of f32 zeros, never written
        let w = Weight {
            name: "big".into(),
            dtype: DType::F32,
            shape: vec![n],
            data: WeightData::Absent,
            trainable: false,
        };
        let header = header_bytes(&[&w], &[]).unwrap();
        let f = File::create(&src).unwrap();
        (&f).write_all(&header).unwrap();
        f.set_len((header.len() + 4 * n) as u64).unwrap();
        drop(f);
        let ws = read_safetensors(&src).unwrap();
        let dst = dir.path().join("dst.safetensors");
        write_safetensors(&dst, &[&ws[0]], &[]).unwrap();
        let md = std::fs::metadata(&dst).unwrap();
        assert_eq!(md.len() as usize, header.len() + 4 * n);
        let src_md = std::fs::metadata(&src).unwrap();
        if src_md.blocks() * 512 < src_md.len() {
            // The filesystem keeps holes: so must the copy.
            assert!(
                md.blocks() * 512 < (1 << 20),
                "allocated {}",
                md.blocks() * 512
            );
        }
        let back = read_safetensors(&dst).unwrap();
        assert!(back[0].bytes().unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn plans_shards_like_transformers() {
        let w = |name: &str, n: usize| Weight {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
            data: WeightData::Absent,
            trainable: false,
        };
        let ws = [w("a", 10), w("b", 10), w("big", 100), w("c", 15), w("d", 1)];
        let refs: Vec<&Weight> = ws.iter().collect();
        let plan: Vec<Vec<&str>> = plan_shards(&refs, 80)
            .iter()
            .map(|s| s.iter().map(|w| w.name.as_str()).collect())
            .collect();
        assert_eq!(plan, vec![vec!["big"], vec!["a", "b"], vec!["c", "d"]]);
    }
}
