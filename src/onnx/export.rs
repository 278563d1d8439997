//! ONNX export: an IR [`Graph`] becomes a `ModelProto`, with weights either
//! embedded or streamed to an external data file.
//!
//! LLaMA-level ops are first lowered to ONNX primitives ([`super::lower`]).
//! Nodes are written in the canonical order, so a graph exported twice gives
//! the same file, and every typed value gets a `value_info`, so that import →
//! export → import reproduces the canonical print exactly.
//!
//! External data is written chunk by chunk with positioned reads from the
//! weights' source files (never the whole weight in memory), at 4096-aligned
//! offsets, and all-zero 1 MiB blocks are skipped, so a sparse source stays
//! sparse.

use super::lower;
use super::proto::{
    attr_type, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, DATA_LOCATION_EXTERNAL,
};
use crate::ir::{
    Dim, Graph, MappedFile, Op, ReduceOp, Tensor, TensorType, Value, Weight, WeightData,
};
use crate::{Error, Result};
use prost::bytes::Bytes;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Where weights go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// External only when the weights would push the model past protobuf's
    /// 2 GB limit (more than 1.8 GB of weights).
    #[default]
    Auto,
    /// Every weight of at least `size_threshold` bytes goes to the data file.
    Always,
    /// Everything embedded; fails when that exceeds 2 GB.
    Never,
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub external_data: ExternalData,
    /// Weights smaller than this stay embedded even when external data is
    /// used (onnx's default is 1024 bytes).
    pub size_threshold: usize,
    /// The data file's name, relative to the model's directory; default
    /// `<model file name>.data`.
    pub location: Option<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            external_data: ExternalData::Auto,
            size_threshold: 1024,
            location: None,
        }
    }
}

/// Weights above this total go external under `ExternalData::Auto`.
const AUTO_EXTERNAL_BYTES: u64 = 1_800_000_000;
/// Protobuf cannot encode a message of 2 GiB or more.
const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
/// External tensors start at multiples of this (a page: mmap-friendly).
const ALIGN: u64 = 4096;
/// Streaming unit; all-zero chunks are left as holes.
const CHUNK: usize = 1 << 20;

/// Writes `graph` as an ONNX model at `path`.
pub fn save(graph: &Graph, path: &Path, opts: &ExportOptions) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    // A shape-only model cannot be written; say so before lowering it.
    if let Some(w) = graph
        .weights
        .iter()
        .find(|w| matches!(w.data, WeightData::Absent))
    {
        return Err(absent(w));
    }
    let prepared = prepare(graph)?;
    let g = prepared.graph();

    let total = g.weights.num_bytes();
    let external: HashSet<String> = match opts.external_data {
        ExternalData::Never => HashSet::new(),
        ExternalData::Auto if total <= AUTO_EXTERNAL_BYTES => HashSet::new(),
        ExternalData::Auto | ExternalData::Always => g
            .weights
            .iter()
            .filter(|w| w.nbytes() >= opts.size_threshold && w.nbytes() > 0)
            .map(|w| w.name.clone())
            .collect(),
    };
    let embedded: u64 = g
        .weights
        .iter()
        .filter(|w| !external.contains(&w.name))
        .map(|w| w.nbytes() as u64)
        .sum();
    if embedded >= PROTOBUF_LIMIT {
        return Err(Error::invalid(format!(
            "{}: {embedded} bytes of weights cannot be embedded in one protobuf (2 GB limit); \
             export with external data (ExternalData::Auto or Always)",
            path.display()
        )));
    }

    let mut locations: HashMap<String, (String, u64, u64)> = HashMap::new();
    if !external.is_empty() {
        let location = opts
            .location
            .clone()
            .unwrap_or_else(|| format!("{file_name}.data"));
        let rel = Path::new(&location);
        if location.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(Error::invalid(format!(
                "external data location '{location}' must be a relative path below the model's \
                 directory"
            )));
        }
        let data_path = dir.join(rel);
        if data_path == path {
            return Err(Error::invalid(format!(
                "external data location '{location}' is the model file itself"
            )));
        }
        let ws: Vec<&Weight> = g
            .weights
            .iter()
            .filter(|w| external.contains(&w.name))
            .collect();
        let offsets = write_data_file(&data_path, &ws)?;
        for (w, (off, len)) in ws.iter().zip(offsets) {
            locations.insert(w.name.clone(), (location.clone(), off, len));
        }
    }

    let model = build_model(g, prepared.opset, &locations)?;
    let len = model.encoded_len() as u64;
    if len >= PROTOBUF_LIMIT {
        return Err(Error::invalid(format!(
            "{}: the model would be {len} bytes, past protobuf's 2 GB limit; export with external \
             data",
            path.display()
        )));
    }
    let buf = model.encode_to_vec();
    write_replacing(path, |f, tmp| {
        f.write_all(&buf).map_err(|e| Error::io(tmp, e))
    })
}

/// The model as a `ModelProto` with every weight embedded (lowering
/// LLaMA-level ops first).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn to_model_proto(graph: &Graph) -> Result<ModelProto> {
    let prepared = prepare(graph)?;
    build_model(prepared.graph(), prepared.opset, &HashMap::new())
}

/// A graph ready to write: lowered when needed, with its target opset.
struct Prepared<'a> {
    original: &'a Graph,
    lowered: Option<Graph>,
    opset: i64,
}

impl Prepared<'_> {
    fn graph(&self) -> &Graph {
        self.lowered.as_ref().unwrap_or(self.original)
    }
}

fn prepare(graph: &Graph) -> Result<Prepared<'_>> {
    let declared = graph.meta.default_opset();
    let needs_lowering = graph
        .g
        .node_weights()
        .any(|n| n.op.is_llama_level() || n.op.is_fused());
    let base = match declared {
        Some(v) if needs_lowering => v.max(17),
        Some(v) => v,
        None => 17,
    };
    let lowered = if needs_lowering {
        let mut g = lower::lower(graph, base)?;
        // Primitives do not show what config.json could not describe: say
        // it in the metadata, so a later save as an HF dir refuses.
        let beyond = crate::ir::beyond_config(graph);
        g.meta
            .props
            .retain(|(k, _)| k != crate::ir::BEYOND_CONFIG_PROP);
        if !beyond.is_empty() {
            g.meta
                .props
                .push((crate::ir::BEYOND_CONFIG_PROP.into(), beyond.join("; ")));
        }
        Some(g)
    } else {
        None
    };
    let g = lowered.as_ref().unwrap_or(graph);
    let opset = base.max(required_opset(g));
    Ok(Prepared {
        original: graph,
        lowered,
        opset,
    })
}

/// The lowest opset in which every node's form (attribute or input) exists.
fn required_opset(g: &Graph) -> i64 {
    let mut need = 1;
    for n in g.g.node_indices() {
        let node = g.node(n);
        let has_input1 = node.num_inputs > 1 && g.inputs_of(n).get(1).copied().flatten().is_some();
        let v = match &node.op {
            Op::Reduce {
                op,
                axes: None,
                noop_with_empty_axes,
                ..
            } if has_input1 || *noop_with_empty_axes => match op {
                ReduceOp::Sum => 13,
                _ => 18,
            },
            Op::Unsqueeze { axes: None } => 13,
            Op::Squeeze { axes: None } if has_input1 => 13,
            Op::Split { split: None, .. } if has_input1 => 13,
            Op::Shape { start, end } if start.is_some() || end.is_some() => 15,
            Op::Reshape { allowzero: true } => 14,
            Op::Trilu { .. } => 14,
            Op::RmsNormalization { .. } | Op::RotaryEmbedding { .. } | Op::OnnxAttention(_) => 23,
            _ => 1,
        };
        need = need.max(v);
    }
    need
}

/// The IR version an opset needs (onnx's version table), never below what
/// the model declared.
fn ir_version_for(opset: i64, declared: Option<i64>) -> i64 {
    let min = match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    };
    declared.map_or(min, |d| d.max(min))
}

fn type_proto(t: &TensorType) -> TypeProto {
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: t.dtype.onnx_code(),
            shape: t.shape.as_ref().map(|dims| TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| tensor_shape_proto::Dimension {
                        value: match d {
                            Dim::Fixed(n) => {
                                Some(tensor_shape_proto::dimension::Value::DimValue(*n as i64))
                            }
                            d if d.is_unknown() => None,
                            d => Some(tensor_shape_proto::dimension::Value::DimParam(
                                d.to_string(),
                            )),
                        },
                        denotation: String::new(),
                    })
                    .collect(),
            }),
        })),
        denotation: String::new(),
    }
}

fn value_info(name: &str, ty: Option<&TensorType>) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: ty.map(type_proto),
        ..Default::default()
    }
}

fn tensor_proto(name: &str, t: &Tensor) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: t.dtype.onnx_code(),
        raw_data: Bytes::from(t.to_le_bytes()),
        ..Default::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i,
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::TENSOR,
        t: Some(t),
        ..Default::default()
    }
}

/// Keeps a mapped file alive under a `Bytes` slice.
struct MapOwner(Arc<MappedFile>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

struct VecOwner(Arc<Vec<u8>>);

impl AsRef<[u8]> for VecOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A weight's bytes as `Bytes`, without copying them.
fn weight_bytes(w: &Weight) -> Result<Bytes> {
    match &w.data {
        WeightData::Mapped { file, offset, len } => {
            let end = offset
                .checked_add(*len)
                .filter(|&e| e <= file.bytes().len())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "weight '{}': {} bytes at offset {offset} lie outside {}",
                        w.name,
                        len,
                        file.path.display()
                    ))
                })?;
            Ok(Bytes::from_owner(MapOwner(file.clone())).slice(*offset..end))
        }
        WeightData::Owned(v) => Ok(Bytes::from_owner(VecOwner(v.clone()))),
        WeightData::Absent => Err(absent(w)),
    }
}

fn absent(w: &Weight) -> Error {
    Error::invalid(format!(
        "weight '{}' has no data (shape-only model); ONNX export needs the values",
        w.name
    ))
}

fn check_len(w: &Weight, len: usize) -> Result<()> {
    if len != w.nbytes() {
        return Err(Error::invalid(format!(
            "weight '{}': {} holds {len} bytes, {}{:?} needs {}",
            w.name,
            w.source(),
            w.dtype,
            w.shape,
            w.nbytes()
        )));
    }
    Ok(())
}

/// Unique value and node names for the ONNX file.
#[derive(Default)]
struct Names {
    used: HashSet<String>,
    counter: usize,
}

impl Names {
    fn claim(&mut self, want: &str, fallback: &str) -> String {
        if !want.is_empty() && self.used.insert(want.to_string()) {
            return want.to_string();
        }
        let stem = if want.is_empty() { fallback } else { want };
        loop {
            self.counter += 1;
            let s = format!("{stem}_{}", self.counter);
            if self.used.insert(s.clone()) {
                return s;
            }
        }
    }
}

fn build_model(
    g: &Graph,
    opset: i64,
    external: &HashMap<String, (String, u64, u64)>,
) -> Result<ModelProto> {
    let order = g.topo_order()?;
    let mut vnames: HashMap<Value, String> = HashMap::new();
    let mut names = Names::default();

    // Graph inputs and weights keep their names exactly.
    for &i in &g.inputs {
        let name = g.node(i).outputs[0].name.clone();
        if !names.used.insert(name.clone()) {
            return Err(Error::invalid(format!(
                "graph input '{name}' is declared twice"
            )));
        }
        vnames.insert(Value::new(i, 0), name);
    }
    for w in g.weights.iter() {
        if !names.used.insert(w.name.clone()) {
            return Err(Error::invalid(format!(
                "weight '{}' has the name of a graph input; ONNX value names must be unique",
                w.name
            )));
        }
    }
    for n in g.g.node_indices() {
        if let Op::Weight { name } = &g.node(n).op {
            vnames.insert(Value::new(n, 0), name.clone());
        }
    }
    // A graph output names the value it reads when it can; otherwise an
    // Identity carries the value to the output name.
    let mut identities: Vec<(String, Value)> = Vec::new();
    for (name, v) in &g.outputs {
        if vnames.get(v) == Some(name) {
            continue;
        }
        if !names.used.insert(name.clone()) {
            return Err(Error::invalid(format!(
                "graph output '{name}' has the name of another input, weight or output"
            )));
        }
        if vnames.contains_key(v) {
            identities.push((name.clone(), *v));
        } else {
            vnames.insert(*v, name.clone());
        }
    }
    for &n in &order {
        let node = g.node(n);
        for (slot, o) in node.outputs.iter().enumerate() {
            let v = Value::new(n, slot);
            if vnames.contains_key(&v) {
                continue;
            }
            let fallback = format!("{}_{}", node.op.name(), slot);
            vnames.insert(v, names.claim(&o.name, &fallback));
        }
    }

    let output_names: HashSet<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    let mut node_names = Names::default();
    let mut nodes: Vec<NodeProto> = Vec::new();
    let mut value_infos: Vec<ValueInfoProto> = Vec::new();
    for &n in &order {
        let node = g.node(n);
        if matches!(node.op, Op::Input | Op::Weight { .. }) {
            continue;
        }
        let ins = g.inputs_of(n);
        let mut inputs: Vec<String> = Vec::with_capacity(ins.len());
        for (port, v) in ins.iter().enumerate() {
            match v {
                None => inputs.push(String::new()),
                Some(v) => inputs.push(vnames.get(v).cloned().ok_or_else(|| {
                    Error::invalid(format!(
                        "node '{}' input {port} reads a value with no name",
                        g.display_name(n)
                    ))
                })?),
            }
        }
        while inputs.last().is_some_and(|s| s.is_empty()) {
            inputs.pop();
        }
        let outputs: Vec<String> = (0..node.outputs.len())
            .map(|s| vnames[&Value::new(n, s)].clone())
            .collect();
        let node_name = node_names.claim(&node.name, node.op.name());
        let mut extra: Vec<NodeProto> = Vec::new();
        let mut const_input = |vals: &[i64], what: &str, names: &mut Names| -> String {
            let cname = names.claim(&format!("{node_name}_{what}"), what);
            extra.push(NodeProto {
                output: vec![cname.clone()],
                name: cname.clone(),
                op_type: "Constant".into(),
                attribute: vec![attr_tensor(
                    "value",
                    tensor_proto("", &Tensor::i64(vec![vals.len()], vals.to_vec())),
                )],
                ..Default::default()
            });
            cname
        };
        let mut attrs: Vec<AttributeProto> = Vec::new();
        let op_type = match &node.op {
            Op::Constant { value } => {
                attrs.push(attr_tensor("value", tensor_proto("", value)));
                "Constant"
            }
            Op::OnnxAttention(at) => {
                attrs.push(attr_int("is_causal", at.is_causal as i64));
                if let Some(v) = at.kv_num_heads {
                    attrs.push(attr_int("kv_num_heads", v));
                }
                if let Some(v) = at.q_num_heads {
                    attrs.push(attr_int("q_num_heads", v));
                }
                if let Some(s) = at.scale {
                    attrs.push(attr_float("scale", s));
                }
                attrs.push(attr_float("softcap", at.softcap));
                attrs.push(attr_int("qk_matmul_output_mode", at.qk_matmul_output_mode));
                if let Some(p) = at.softmax_precision {
                    attrs.push(attr_int("softmax_precision", p));
                }
                "Attention"
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                attrs.push(attr_float("alpha", *alpha));
                attrs.push(attr_float("beta", *beta));
                attrs.push(attr_int("transA", *trans_a as i64));
                attrs.push(attr_int("transB", *trans_b as i64));
                "Gemm"
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::Concat { axis } => {
                attrs.push(attr_int("axis", *axis));
                node.op.name()
            }
            Op::Reduce {
                op,
                axes,
                keepdims,
                noop_with_empty_axes,
            } => {
                let moved_at = if *op == ReduceOp::Sum { 13 } else { 18 };
                match axes {
                    Some(ax) if !ax.is_empty() => {
                        if opset >= moved_at {
                            let c = const_input(ax, "axes", &mut names);
                            inputs.truncate(1);
                            inputs.push(c);
                        } else {
                            attrs.push(attr_ints("axes", ax));
                        }
                    }
                    _ => {}
                }
                attrs.push(attr_int("keepdims", *keepdims as i64));
                if *noop_with_empty_axes {
                    attrs.push(attr_int("noop_with_empty_axes", 1));
                }
                node.op.name()
            }
            Op::Reshape { allowzero } => {
                if *allowzero {
                    attrs.push(attr_int("allowzero", 1));
                }
                "Reshape"
            }
            Op::Transpose { perm } => {
                if let Some(p) = perm {
                    attrs.push(attr_ints("perm", p));
                }
                "Transpose"
            }
            Op::Gather { axis } => {
                attrs.push(attr_int("axis", *axis));
                "Gather"
            }
            Op::GatherNd { batch_dims } => {
                attrs.push(attr_int("batch_dims", *batch_dims));
                "GatherND"
            }
            Op::Unsqueeze { axes } | Op::Squeeze { axes } => {
                if let Some(ax) = axes {
                    if opset >= 13 {
                        let c = const_input(ax, "axes", &mut names);
                        inputs.truncate(1);
                        inputs.push(c);
                    } else {
                        attrs.push(attr_ints("axes", ax));
                    }
                }
                node.op.name()
            }
            Op::Shape { start, end } => {
                if let Some(s) = start {
                    attrs.push(attr_int("start", *s));
                }
                if let Some(e) = end {
                    attrs.push(attr_int("end", *e));
                }
                "Shape"
            }
            Op::Cast { to } => {
                attrs.push(attr_int("to", to.onnx_code() as i64));
                "Cast"
            }
            Op::ConstantOfShape { value } => {
                if let Some(v) = value {
                    attrs.push(attr_tensor("value", tensor_proto("", v)));
                }
                "ConstantOfShape"
            }
            Op::Trilu { upper } => {
                attrs.push(attr_int("upper", *upper as i64));
                "Trilu"
            }
            Op::CumSum { exclusive, reverse } => {
                attrs.push(attr_int("exclusive", *exclusive as i64));
                attrs.push(attr_int("reverse", *reverse as i64));
                "CumSum"
            }
            Op::Split {
                axis,
                split,
                num_outputs,
            } => {
                attrs.push(attr_int("axis", *axis));
                match split {
                    Some(s) if opset >= 13 => {
                        let c = const_input(s, "split", &mut names);
                        inputs.truncate(1);
                        inputs.push(c);
                    }
                    Some(s) => attrs.push(attr_ints("split", s)),
                    None if opset >= 18 && inputs.len() < 2 => {
                        attrs.push(attr_int("num_outputs", *num_outputs as i64))
                    }
                    None => {}
                }
                "Split"
            }
            Op::RmsNormalization {
                axis,
                epsilon,
                stash_type,
            } => {
                attrs.push(attr_int("axis", *axis));
                attrs.push(attr_float("epsilon", *epsilon));
                attrs.push(attr_int("stash_type", *stash_type));
                "RMSNormalization"
            }
            Op::RotaryEmbedding {
                interleaved,
                num_heads,
                rotary_embedding_dim,
            } => {
                attrs.push(attr_int("interleaved", *interleaved as i64));
                if let Some(h) = num_heads {
                    attrs.push(attr_int("num_heads", *h));
                }
                attrs.push(attr_int("rotary_embedding_dim", *rotary_embedding_dim));
                "RotaryEmbedding"
            }
            op if op.is_training() => {
                return Err(Error::invalid(format!(
                    "node '{}' ({}) is a training op; training graphs run in lcc and are not exported to ONNX",
                    g.display_name(n),
                    op.name()
                )))
            }
            op if op.is_llama_level() => {
                return Err(Error::invalid(format!(
                    "node '{}' ({}) is a LLaMA-level op left after lowering",
                    g.display_name(n),
                    op.name()
                )))
            }
            op => op.name(),
        };
        nodes.append(&mut extra);
        nodes.push(NodeProto {
            input: inputs,
            output: outputs.clone(),
            name: node_name,
            op_type: op_type.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        if !matches!(node.op, Op::Constant { .. }) {
            for (slot, o) in node.outputs.iter().enumerate() {
                if let Some(ty) = &o.ty {
                    if !output_names.contains(outputs[slot].as_str()) {
                        value_infos.push(value_info(&outputs[slot], Some(ty)));
                    }
                }
            }
        }
    }
    for (name, v) in &identities {
        nodes.push(NodeProto {
            input: vec![vnames[v].clone()],
            output: vec![name.clone()],
            name: node_names.claim(&format!("{name}_identity"), "Identity"),
            op_type: "Identity".into(),
            ..Default::default()
        });
    }

    let mut initializers = Vec::with_capacity(g.weights.len());
    for w in g.weights.iter() {
        let mut t = TensorProto {
            name: w.name.clone(),
            dims: w.shape.iter().map(|&d| d as i64).collect(),
            data_type: w.dtype.onnx_code(),
            ..Default::default()
        };
        match external.get(&w.name) {
            Some((loc, off, len)) => {
                t.data_location = DATA_LOCATION_EXTERNAL;
                t.external_data = vec![
                    entry("location", loc),
                    entry("offset", &off.to_string()),
                    entry("length", &len.to_string()),
                ];
            }
            None => {
                let b = weight_bytes(w)?;
                check_len(w, b.len())?;
                t.raw_data = b;
            }
        }
        initializers.push(t);
    }

    let graph = GraphProto {
        node: nodes,
        name: g.meta.graph_name.clone().unwrap_or_else(|| "lcc".into()),
        initializer: initializers,
        input: g
            .inputs
            .iter()
            .map(|&i| {
                let o = &g.node(i).outputs[0];
                value_info(&o.name, o.ty.as_ref())
            })
            .collect(),
        output: g
            .outputs
            .iter()
            .map(|(name, v)| value_info(name, g.value_type(*v)))
            .collect(),
        value_info: value_infos,
        ..Default::default()
    };
    let mut opsets = vec![OperatorSetIdProto {
        domain: String::new(),
        version: opset,
    }];
    for (d, v) in &g.meta.opsets {
        if !(d.is_empty() || d == "ai.onnx") {
            opsets.push(OperatorSetIdProto {
                domain: d.clone(),
                version: *v,
            });
        }
    }
    Ok(ModelProto {
        ir_version: ir_version_for(
            opset,
            if g.meta.format == "onnx" {
                g.meta.ir_version
            } else {
                None
            },
        ),
        opset_import: opsets,
        producer_name: "lcc".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: g.meta.props.iter().map(|(k, v)| entry(k, v)).collect(),
        ..Default::default()
    })
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

/// Writes through a temporary file in the same directory, then renames it
/// over `path`: a model re-exported onto the file it was imported from (and
/// is still mapped from) keeps its old inode alive until the maps close.
fn write_replacing(path: &Path, write: impl FnOnce(&mut File, &Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".lcc-tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| Error::io(path, e))?;
    let res = write(&mut f, &tmp).and_then(|_| f.sync_all().map_err(|e| Error::io(&tmp, e)));
    drop(f);
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.naming_output(&tmp, path));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Streams the weights into one data file; returns (offset, length) of each.
fn write_data_file(path: &Path, weights: &[&Weight]) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(weights.len());
    write_replacing(path, |f, tmp| {
        let mut buf = vec![0u8; CHUNK];
        let mut pos: u64 = 0;
        // Positioned reads from each source file, opened once.
        let mut sources: HashMap<PathBuf, Option<File>> = HashMap::new();
        for w in weights {
            pos = pos.div_ceil(ALIGN) * ALIGN;
            let len = w.nbytes() as u64;
            copy_weight(w, f, tmp, pos, &mut buf, &mut sources)?;
            out.push((pos, len));
            pos += len;
        }
        // Trailing all-zero chunks were skipped: give the file its length.
        f.set_len(pos).map_err(|e| Error::io(tmp, e))
    })?;
    Ok(out)
}

fn copy_weight(
    w: &Weight,
    dst: &File,
    dst_path: &Path,
    at: u64,
    buf: &mut [u8],
    sources: &mut HashMap<PathBuf, Option<File>>,
) -> Result<()> {
    let put = |chunk: &[u8], off: u64| -> Result<()> {
        if crate::util::is_all_zero(chunk) {
            return Ok(());
        }
        dst.write_all_at(chunk, at + off)
            .map_err(|e| Error::io(dst_path, e))
    };
    match &w.data {
        WeightData::Absent => Err(absent(w)),
        WeightData::Owned(v) => {
            check_len(w, v.len())?;
            for (i, c) in v.chunks(CHUNK).enumerate() {
                put(c, (i * CHUNK) as u64)?;
            }
            Ok(())
        }
        WeightData::Mapped { file, offset, len } => {
            check_len(w, *len)?;
            let map = file.bytes();
            if offset.checked_add(*len).is_none_or(|e| e > map.len()) {
                return Err(Error::invalid(format!(
                    "weight '{}': {len} bytes at offset {offset} lie outside {}",
                    w.name,
                    file.path.display()
                )));
            }
            // Prefer reading the file itself (pread) over touching the map:
            // the map's pages would count against this process's memory.
            let src = sources.entry(file.path.clone()).or_insert_with(|| {
                File::open(&file.path)
                    .ok()
                    .filter(|f| f.metadata().is_ok_and(|m| m.len() == map.len() as u64))
            });
            let mut done = 0usize;
            while done < *len {
                let n = CHUNK.min(len - done);
                match src {
                    Some(sf) => {
                        let chunk = &mut buf[..n];
                        sf.read_exact_at(chunk, (offset + done) as u64)
                            .map_err(|e| Error::io(&file.path, e))?;
                        put(chunk, done as u64)?;
                    }
                    None => put(&map[offset + done..offset + done + n], done as u64)?,
                }
                done += n;
            }
            Ok(())
        }
    }
}
