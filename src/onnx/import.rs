//! ONNX import: a `ModelProto` becomes an IR [`Graph`].
//!
//! The model file is memory-mapped and decoded from a `Bytes` that points
//! into the map, so an initializer's `raw_data` is never copied: its weight
//! is `WeightData::Mapped` at the offset of those bytes in the file. External
//! data files are mapped too, one map per file. Every size a file claims is
//! checked (checked arithmetic, ranges within the file) before anything is
//! allocated for it.

use super::proto::{
    attr_type, tensor_shape_proto::dimension, type_proto, AttributeProto, FunctionProto,
    ModelProto, NodeProto, TensorProto, TypeProto, DATA_LOCATION_EXTERNAL,
};
use crate::ir::{
    self, BinaryOp, DType, Dim, Graph, MappedFile, ModelMeta, Node, NodeIndex, OnnxAttentionAttrs,
    Op, Output, ReduceOp, Tensor, TensorType, UnaryOp, Value, VariadicOp, Weight, WeightData,
};
use crate::{Error, Result};
use prost::bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
/// The newest opset of the default domain that ONNX defines (onnx 1.23,
/// whose node tests lcc runs): a model declaring a later one was written
/// against operators nobody has specified, so its meaning is unknown.
pub const MAX_DEFAULT_OPSET: i64 = 28;
/// Largest `Constant` lcc materialises in memory; bigger tensors belong in
/// initializers, which stay mapped.
const MAX_CONSTANT_BYTES: usize = 256 << 20;
/// Deepest nesting of model-local function calls.
const MAX_FUNCTION_DEPTH: usize = 32;
/// Most nodes after inlining functions (guards against call trees that grow
/// exponentially).
const MAX_NODES: usize = 1 << 20;

/// Loads an ONNX model file. The file is memory-mapped; weights stored in it
/// (or in external data files beside it) are referenced, not copied.
pub fn load(path: &Path) -> Result<Graph> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::format(
            path,
            "is a directory; expected an ONNX model file (.onnx)",
        ));
    }
    if meta.len() == 0 {
        return Err(Error::format(
            path,
            "the file is empty; an ONNX model is a serialized ModelProto",
        ));
    }
    let file = MappedFile::open(path)?;
    let bytes = Bytes::from_owner(MapOwner(file.clone()));
    Importer::new(path, Source::Map(file)).run(bytes)
}

/// Loads an ONNX model from memory. `source` names the model in errors and
/// its directory is where external data files are looked for. Embedded
/// weights are copied into owned buffers (there is no file to map).
pub fn load_bytes(bytes: &[u8], source: &Path) -> Result<Graph> {
    if bytes.is_empty() {
        return Err(Error::format(
            source,
            "the model is empty (0 bytes); an ONNX model is a serialized ModelProto",
        ));
    }
    Importer::new(source, Source::Memory).run(Bytes::copy_from_slice(bytes))
}

/// Reads a serialized `TensorProto` (the `.pb` files of ONNX's test data
/// sets) into a tensor.
pub fn read_tensor_file(path: &Path) -> Result<Tensor> {
    crate::util::check_regular_file(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let proto = <TensorProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| Error::format(path, format!("not a serialized ONNX TensorProto: {e}")))?;
    let name = if proto.name.is_empty() {
        "the tensor".to_string()
    } else {
        format!("tensor '{}'", proto.name)
    };
    Importer::new(path, Source::Memory).tensor_value(&proto, &name)
}

/// Lets `Bytes` borrow from a memory map it keeps alive.
struct MapOwner(Arc<MappedFile>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

enum Source {
    Map(Arc<MappedFile>),
    Memory,
}

/// Opset versions by domain ("" for the default domain).
type Opsets = Rc<HashMap<String, i64>>;

fn norm_domain(d: &str) -> &str {
    if d == "ai.onnx" {
        ""
    } else {
        d
    }
}

/// A node of the main graph after model-local functions are inlined, with the
/// opsets its body was written against.
struct FlatNode {
    proto: NodeProto,
    opsets: Opsets,
}

struct Importer<'a> {
    path: &'a Path,
    base_dir: PathBuf,
    source: Source,
    external: HashMap<PathBuf, Arc<MappedFile>>,
}

/// Size facts of a tensor, validated.
struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    nbytes: usize,
}

impl<'a> Importer<'a> {
    fn new(path: &'a Path, source: Source) -> Self {
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Importer {
            path,
            base_dir,
            source,
            external: HashMap::new(),
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg)
    }

    fn run(mut self, bytes: Bytes) -> Result<Graph> {
        let model = ModelProto::decode(bytes).map_err(|e| {
            self.err(format!(
                "not a valid ONNX model (protobuf decoding failed: {e}); \
                 the file may be truncated or not an ONNX file"
            ))
        })?;
        self.build(model)
    }

    fn build(&mut self, model: ModelProto) -> Result<Graph> {
        let ModelProto {
            ir_version,
            opset_import,
            producer_name,
            graph,
            metadata_props,
            functions,
            ..
        } = model;
        let Some(mut gp) = graph else {
            return Err(self.err("the model has no graph (ModelProto.graph is missing)"));
        };
        let mut opsets = HashMap::new();
        for o in &opset_import {
            let domain = norm_domain(&o.domain);
            if domain.is_empty() && !(1..=MAX_DEFAULT_OPSET).contains(&o.version) {
                return Err(self.err(format!(
                    "the model imports opset {} of the default ONNX domain; ONNX defines opsets 1 to {MAX_DEFAULT_OPSET}, and lcc knows no later one (export with opset_version {MAX_DEFAULT_OPSET} or lower)",
                    o.version
                )));
            }
            opsets.insert(domain.to_string(), o.version);
        }
        let opsets: Opsets = Rc::new(opsets);

        let mut graph = Graph::new();
        graph.meta = ModelMeta {
            format: "onnx".into(),
            ir_version: Some(ir_version),
            opsets: opset_import
                .iter()
                .map(|o| (o.domain.clone(), o.version))
                .collect(),
            producer: (!producer_name.is_empty()).then_some(producer_name),
            graph_name: (!gp.name.is_empty()).then(|| gp.name.clone()),
            props: metadata_props
                .into_iter()
                .map(|p| (p.key, p.value))
                .collect(),
        };

        // Declared types by value name: value_info, then inputs and outputs.
        let mut types: HashMap<String, TypeProto> = HashMap::new();
        for vi in gp
            .value_info
            .iter()
            .chain(gp.input.iter())
            .chain(gp.output.iter())
        {
            if let Some(t) = &vi.r#type {
                types.insert(vi.name.clone(), t.clone());
            }
        }

        // Where each value name is defined, for errors about duplicates.
        let mut values: HashMap<String, (Value, String)> = HashMap::new();

        for init in std::mem::take(&mut gp.initializer) {
            let name = init.name.clone();
            if name.is_empty() {
                return Err(self.err("an initializer has an empty name"));
            }
            if values.contains_key(&name) {
                return Err(self.err(format!(
                    "initializer '{name}' is defined twice; value names must be unique"
                )));
            }
            let what = format!("initializer '{name}'");
            let info = self.tensor_info(&init, &what)?;
            let data = self.tensor_data(&init, &info, &what)?;
            graph.weights.insert(Weight {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape,
                data,
                trainable: false,
            });
            let v = graph.weight_value(&name)?;
            values.insert(name, (v, "an initializer".into()));
        }

        for vi in &gp.input {
            if graph.weights.contains(&vi.name) {
                // Old exporters list initializers among the inputs too.
                continue;
            }
            if vi.name.is_empty() {
                return Err(self.err("a graph input has an empty name"));
            }
            if values.contains_key(&vi.name) {
                return Err(self.err(format!("graph input '{}' is declared twice", vi.name)));
            }
            let ty = self.convert_type(vi.r#type.as_ref(), &vi.name)?;
            let idx = graph.g.add_node(Node {
                name: vi.name.clone(),
                op: Op::Input,
                num_inputs: 0,
                outputs: vec![Output {
                    name: vi.name.clone(),
                    ty,
                }],
            });
            graph.inputs.push(idx);
            values.insert(
                vi.name.clone(),
                (Value::new(idx, 0), "a graph input".into()),
            );
        }

        let fmap: HashMap<(String, String, String), &FunctionProto> = functions
            .iter()
            .map(|f| {
                (
                    (
                        norm_domain(&f.domain).to_string(),
                        f.name.clone(),
                        f.overload.clone(),
                    ),
                    f,
                )
            })
            .collect();
        let mut flat = Vec::with_capacity(gp.node.len());
        let mut counter = 0usize;
        self.flatten(
            std::mem::take(&mut gp.node),
            &opsets,
            &fmap,
            0,
            &mut counter,
            &mut flat,
        )?;

        // Phase 1: create every node and register its outputs; phase 2 wires
        // the edges, so that a node may read a value defined later (a cycle
        // is then reported by `verify`, an undefined value here).
        let mut pending: Vec<(NodeIndex, Vec<String>, String)> = Vec::with_capacity(flat.len());
        for (i, fnode) in flat.iter().enumerate() {
            let node = &fnode.proto;
            let display = if node.name.is_empty() {
                format!("{}#{i}", node.op_type)
            } else {
                node.name.clone()
            };
            let mut inputs = node.input.clone();
            while inputs.last().is_some_and(|s| s.is_empty()) {
                inputs.pop();
            }
            let op = self.map_node(node, &display, &fnode.opsets, inputs.len(), &types)?;
            let (min, max) = op.arity();
            if inputs.len() > max {
                return Err(self.err(format!(
                    "node '{display}' ({}): has {} inputs, the operator takes at most {max}",
                    node.op_type,
                    inputs.len()
                )));
            }
            if let Some(k) = (0..min).find(|&k| inputs.get(k).is_none_or(|s| s.is_empty())) {
                return Err(self.err(format!(
                    "node '{display}' ({}): required input {k} is missing",
                    node.op_type
                )));
            }
            let mut out_names = node.output.clone();
            if !matches!(op, Op::Split { .. }) {
                while out_names.len() > op.num_outputs()
                    && out_names.last().is_some_and(|s| s.is_empty())
                {
                    out_names.pop();
                }
                if out_names.len() > op.num_outputs() {
                    return Err(self.err(format!(
                        "node '{display}' ({}): has {} outputs; lcc supports {} (only the first output of this operator)",
                        node.op_type,
                        out_names.len(),
                        op.num_outputs()
                    )));
                }
                if out_names.is_empty() {
                    out_names.push(String::new());
                }
            }
            let fixed_ty = match &op {
                Op::Constant { value } => Some(TensorType::fixed(value.dtype, &value.shape)),
                _ => None,
            };
            let mut outputs = Vec::with_capacity(out_names.len());
            for name in &out_names {
                let ty = match &fixed_ty {
                    Some(t) => Some(t.clone()),
                    None if name.is_empty() => None,
                    None => self.convert_type(types.get(name), name)?,
                };
                outputs.push(Output {
                    name: name.clone(),
                    ty,
                });
            }
            let idx = graph.g.add_node(Node {
                name: node.name.clone(),
                op,
                num_inputs: inputs.len(),
                outputs,
            });
            for (slot, name) in out_names.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                let what = format!("node '{display}'");
                if let Some((_, prev)) = values.get(name) {
                    return Err(self.err(format!(
                        "value '{name}' is defined twice: by {prev} and by {what}; \
                         value names must be unique (SSA)"
                    )));
                }
                values.insert(name.clone(), (Value::new(idx, slot), what));
            }
            pending.push((idx, inputs, display));
        }
        for (idx, inputs, display) in pending {
            for (port, name) in inputs.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                let Some((v, _)) = values.get(name) else {
                    return Err(self.err(format!(
                        "node '{display}' reads value '{name}', which no node, graph input or \
                         initializer defines"
                    )));
                };
                graph.g.add_edge(
                    v.node,
                    idx,
                    ir::Edge {
                        src_slot: v.slot,
                        dst_slot: port,
                    },
                );
            }
        }

        for vi in &gp.output {
            let Some((v, _)) = values.get(&vi.name) else {
                return Err(self.err(format!(
                    "graph output '{}' is not defined by any node, input or initializer",
                    vi.name
                )));
            };
            if graph.outputs.iter().any(|(n, _)| *n == vi.name) {
                return Err(self.err(format!("graph output '{}' is declared twice", vi.name)));
            }
            let v = *v;
            let node = graph.node_mut(v.node);
            if !matches!(node.op, Op::Input | Op::Weight { .. } | Op::Constant { .. }) {
                if let Some(ty) = self.convert_type(vi.r#type.as_ref(), &vi.name)? {
                    graph.node_mut(v.node).outputs[v.slot].ty = Some(ty);
                }
            }
            graph.outputs.push((vi.name.clone(), v));
        }

        graph
            .infer_types()
            .and_then(|()| ir::verify(&graph))
            .map_err(|e| match e {
                Error::Verify(m) => self.err(m),
                other => other,
            })?;
        Ok(graph)
    }

    /// Inlines calls to model-local functions, recursively.
    fn flatten(
        &self,
        nodes: Vec<NodeProto>,
        opsets: &Opsets,
        fmap: &HashMap<(String, String, String), &FunctionProto>,
        depth: usize,
        counter: &mut usize,
        out: &mut Vec<FlatNode>,
    ) -> Result<()> {
        for node in nodes {
            let key = (
                norm_domain(&node.domain).to_string(),
                node.op_type.clone(),
                node.overload.clone(),
            );
            let Some(f) = fmap.get(&key) else {
                if out.len() >= MAX_NODES {
                    return Err(self.err(format!(
                        "more than {MAX_NODES} nodes after inlining functions"
                    )));
                }
                out.push(FlatNode {
                    proto: node,
                    opsets: opsets.clone(),
                });
                continue;
            };
            if depth >= MAX_FUNCTION_DEPTH {
                return Err(self.err(format!(
                    "node '{}': function '{}' calls nest deeper than {MAX_FUNCTION_DEPTH} \
                     (recursive functions are not allowed)",
                    node.name, node.op_type
                )));
            }
            *counter += 1;
            let prefix = format!(
                "{}/{}#{}/",
                if node.name.is_empty() {
                    "fn"
                } else {
                    &node.name
                },
                f.name,
                counter
            );
            let mut rename: HashMap<&str, String> = HashMap::new();
            for (i, formal) in f.input.iter().enumerate() {
                rename.insert(formal, node.input.get(i).cloned().unwrap_or_default());
            }
            for (i, formal) in f.output.iter().enumerate() {
                let actual = match node.output.get(i) {
                    Some(a) if !a.is_empty() => a.clone(),
                    _ => format!("{prefix}{formal}"),
                };
                rename.insert(formal, actual);
            }
            let map_name = |n: &str| -> String {
                if n.is_empty() {
                    String::new()
                } else if let Some(a) = rename.get(n) {
                    a.clone()
                } else {
                    format!("{prefix}{n}")
                }
            };
            let mut fopsets = (**opsets).clone();
            for o in &f.opset_import {
                fopsets.insert(norm_domain(&o.domain).to_string(), o.version);
            }
            let fopsets: Opsets = Rc::new(fopsets);
            let mut body = Vec::with_capacity(f.node.len());
            for b in &f.node {
                let mut nb = b.clone();
                nb.name = format!("{prefix}{}", b.name);
                nb.input = b.input.iter().map(|n| map_name(n)).collect();
                nb.output = b.output.iter().map(|n| map_name(n)).collect();
                let mut attrs = Vec::with_capacity(b.attribute.len());
                for a in &b.attribute {
                    if a.ref_attr_name.is_empty() {
                        attrs.push(a.clone());
                        continue;
                    }
                    let actual = node
                        .attribute
                        .iter()
                        .find(|c| c.name == a.ref_attr_name)
                        .or_else(|| f.attribute_proto.iter().find(|d| d.name == a.ref_attr_name));
                    if let Some(actual) = actual {
                        let mut r = actual.clone();
                        r.name = a.name.clone();
                        r.ref_attr_name.clear();
                        attrs.push(r);
                    }
                }
                nb.attribute = attrs;
                body.push(nb);
            }
            self.flatten(body, &fopsets, fmap, depth + 1, counter, out)?;
        }
        Ok(())
    }

    // --- types -------------------------------------------------------------

    fn convert_type(&self, t: Option<&TypeProto>, name: &str) -> Result<Option<TensorType>> {
        let Some(t) = t else { return Ok(None) };
        let Some(type_proto::Value::TensorType(tt)) = &t.value else {
            return Ok(None);
        };
        if tt.elem_type == 0 {
            return Ok(None);
        }
        let dtype = DType::from_onnx_code(tt.elem_type).ok_or_else(|| {
            self.err(format!(
                "value '{name}' has element type {} ({}), which lcc does not support \
                 (supported: f32, f16, bf16, f64, i64, i32, i8, u8, bool)",
                DType::onnx_code_name(tt.elem_type),
                tt.elem_type
            ))
        })?;
        let shape = match &tt.shape {
            None => None,
            Some(s) => {
                let mut dims = Vec::with_capacity(s.dim.len());
                for d in &s.dim {
                    dims.push(match &d.value {
                        Some(dimension::Value::DimValue(v)) => {
                            if *v < 0 {
                                return Err(self
                                    .err(format!("value '{name}' has a negative dimension {v}")));
                            }
                            Dim::Fixed(*v as u64)
                        }
                        Some(dimension::Value::DimParam(p)) => Dim::parse(p),
                        None => Dim::Sym(String::new()),
                    });
                }
                Some(dims)
            }
        };
        Ok(Some(TensorType { dtype, shape }))
    }

    // --- tensors -----------------------------------------------------------

    fn tensor_info(&self, t: &TensorProto, what: &str) -> Result<TensorInfo> {
        let dtype = DType::from_onnx_code(t.data_type).ok_or_else(|| {
            self.err(format!(
                "{what} has data type {} ({}), which lcc does not support \
                 (supported: f32, f16, bf16, f64, i64, i32, i8, u8, bool)",
                DType::onnx_code_name(t.data_type),
                t.data_type
            ))
        })?;
        let mut shape = Vec::with_capacity(t.dims.len().min(64));
        let mut numel: usize = 1;
        for &d in &t.dims {
            let du = usize::try_from(d).map_err(|_| {
                self.err(format!(
                    "{what} has a negative dimension {d} in dims {:?}",
                    t.dims
                ))
            })?;
            numel = numel.checked_mul(du).ok_or_else(|| {
                self.err(format!(
                    "{what}: dims {:?} have more elements than memory can hold",
                    t.dims
                ))
            })?;
            shape.push(du);
        }
        let nbytes = numel.checked_mul(dtype.size()).ok_or_else(|| {
            self.err(format!(
                "{what}: dims {:?} of {dtype} need more bytes than memory can hold",
                t.dims
            ))
        })?;
        Ok(TensorInfo {
            dtype,
            shape,
            nbytes,
        })
    }

    /// Where a tensor's bytes are: in the mapped model, in a mapped external
    /// file, or (typed fields, in-memory models) in an owned buffer.
    fn tensor_data(
        &mut self,
        t: &TensorProto,
        info: &TensorInfo,
        what: &str,
    ) -> Result<WeightData> {
        if t.segment.is_some() {
            return Err(self.err(format!(
                "{what} is a segment of a larger tensor; segmented tensors are not supported"
            )));
        }
        if t.data_location == DATA_LOCATION_EXTERNAL {
            return self.external_data(t, info, what);
        }
        let numel = if info.dtype.size() == 0 {
            0
        } else {
            info.nbytes / info.dtype.size()
        };
        if !t.raw_data.is_empty() || info.nbytes == 0 {
            if t.raw_data.len() != info.nbytes {
                return Err(self.err(format!(
                    "{what}: raw_data has {} bytes, but {}{:?} needs {} bytes",
                    t.raw_data.len(),
                    info.dtype,
                    info.shape,
                    info.nbytes
                )));
            }
            return Ok(self.raw_location(&t.raw_data));
        }
        let count_err = |field: &str, n: usize| {
            self.err(format!(
                "{what}: {field} has {n} values, but {}{:?} needs {numel}",
                info.dtype, info.shape
            ))
        };
        let mut out = Vec::new();
        match info.dtype {
            DType::F32 => {
                if t.float_data.len() != numel {
                    return Err(count_err("float_data", t.float_data.len()));
                }
                out.reserve(info.nbytes);
                for x in &t.float_data {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            DType::F64 => {
                if t.double_data.len() != numel {
                    return Err(count_err("double_data", t.double_data.len()));
                }
                out.reserve(info.nbytes);
                for x in &t.double_data {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            DType::I64 => {
                if t.int64_data.len() != numel {
                    return Err(count_err("int64_data", t.int64_data.len()));
                }
                out.reserve(info.nbytes);
                for x in &t.int64_data {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            DType::I32 | DType::I8 | DType::U8 | DType::Bool | DType::F16 | DType::BF16 => {
                if t.int32_data.len() != numel {
                    return Err(count_err("int32_data", t.int32_data.len()));
                }
                out.reserve(info.nbytes);
                for &x in &t.int32_data {
                    match info.dtype {
                        DType::I32 => out.extend_from_slice(&x.to_le_bytes()),
                        // f16/bf16 are stored as their 16-bit patterns.
                        DType::F16 | DType::BF16 => {
                            out.extend_from_slice(&(x as u16).to_le_bytes())
                        }
                        _ => out.push(x as u8),
                    }
                }
            }
        }
        Ok(WeightData::Owned(Arc::new(out)))
    }

    fn raw_location(&self, raw: &Bytes) -> WeightData {
        if let Source::Map(file) = &self.source {
            let base = file.bytes().as_ptr() as usize;
            let end = base + file.bytes().len();
            let p = raw.as_ptr() as usize;
            if !raw.is_empty() && p >= base && p + raw.len() <= end {
                return WeightData::Mapped {
                    file: file.clone(),
                    offset: p - base,
                    len: raw.len(),
                };
            }
        }
        WeightData::Owned(Arc::new(raw.to_vec()))
    }

    fn external_data(
        &mut self,
        t: &TensorProto,
        info: &TensorInfo,
        what: &str,
    ) -> Result<WeightData> {
        let mut location = None;
        let mut offset: u64 = 0;
        let mut length: Option<u64> = None;
        for e in &t.external_data {
            let num = |v: &str| {
                v.trim().parse::<u64>().map_err(|_| {
                    self.err(format!(
                        "{what}: external_data '{}' is '{v}', not a non-negative integer",
                        e.key
                    ))
                })
            };
            match e.key.as_str() {
                "location" => location = Some(e.value.as_str()),
                "offset" => offset = num(&e.value)?,
                "length" => length = Some(num(&e.value)?),
                _ => {}
            }
        }
        let Some(location) = location.filter(|l| !l.is_empty()) else {
            return Err(self.err(format!(
                "{what} is stored externally but has no 'location' entry"
            )));
        };
        let rel = Path::new(location);
        if !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(self.err(format!(
                "{what}: external data location '{location}' must be a relative path inside the \
                 model's directory (no '..', no absolute path)"
            )));
        }
        let full = self.base_dir.join(rel);
        if let Some(len) = length {
            if len != info.nbytes as u64 {
                return Err(self.err(format!(
                    "{what}: external data length is {len} bytes, but {}{:?} needs {}",
                    info.dtype, info.shape, info.nbytes
                )));
            }
        }
        let file = match self.external.get(&full) {
            Some(f) => f.clone(),
            None => {
                let open_err = |e: &dyn std::fmt::Display| {
                    self.err(format!(
                        "{what}: cannot open external data file '{}': {e}",
                        full.display()
                    ))
                };
                let canon = full.canonicalize().map_err(|e| open_err(&e))?;
                let base = if self.base_dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    self.base_dir.as_path()
                };
                let base_canon = base.canonicalize().map_err(|e| open_err(&e))?;
                if !canon.starts_with(&base_canon) {
                    return Err(self.err(format!(
                        "{what}: external data file '{}' resolves to '{}', outside the model's \
                         directory",
                        full.display(),
                        canon.display()
                    )));
                }
                let md = std::fs::metadata(&canon).map_err(|e| open_err(&e))?;
                if !md.is_file() {
                    return Err(open_err(&"not a regular file"));
                }
                let f = if md.len() == 0 {
                    None
                } else {
                    Some(MappedFile::open(&full).map_err(|e| open_err(&e))?)
                };
                let Some(f) = f else {
                    return Err(self.err(format!(
                        "{what}: external data file '{}' is empty, the tensor needs {} bytes at \
                         offset {offset}",
                        full.display(),
                        info.nbytes
                    )));
                };
                self.external.insert(full.clone(), f.clone());
                f
            }
        };
        let file_len = file.bytes().len() as u64;
        let end = offset.checked_add(info.nbytes as u64);
        match end {
            Some(end) if end <= file_len => Ok(WeightData::Mapped {
                file,
                offset: offset as usize,
                len: info.nbytes,
            }),
            _ => Err(self.err(format!(
                "{what}: external data file '{}' has {file_len} bytes, but the tensor needs {} \
                 bytes at offset {offset}; the file is truncated or the offset is wrong",
                full.display(),
                info.nbytes
            ))),
        }
    }

    /// Decodes a small tensor (a `Constant` value or attribute) into memory.
    fn tensor_value(&mut self, t: &TensorProto, what: &str) -> Result<Tensor> {
        let info = self.tensor_info(t, what)?;
        if info.nbytes > MAX_CONSTANT_BYTES {
            return Err(self.err(format!(
                "{what} is {} bytes; lcc keeps constants up to {MAX_CONSTANT_BYTES} bytes in \
                 memory, store larger tensors as initializers",
                info.nbytes
            )));
        }
        let data = self.tensor_data(t, &info, what)?;
        let bytes: &[u8] = match &data {
            WeightData::Mapped { file, offset, len } => file
                .bytes()
                .get(*offset..offset.saturating_add(*len))
                .unwrap_or_default(),
            WeightData::Owned(v) => v,
            WeightData::Absent => &[],
        };
        Tensor::from_le_bytes(info.dtype, info.shape, bytes)
            .map_err(|e| self.err(format!("{what}: {e}")))
    }

    // --- operators ---------------------------------------------------------

    fn map_node(
        &mut self,
        node: &NodeProto,
        display: &str,
        opsets: &Opsets,
        n_inputs: usize,
        types: &HashMap<String, TypeProto>,
    ) -> Result<Op> {
        let domain = norm_domain(&node.domain);
        let opset = *opsets.get(domain).ok_or_else(|| {
            self.err(format!(
                "node '{display}' ({}) is in domain '{}', for which the model imports no opset",
                node.op_type, node.domain
            ))
        })?;
        let unsupported = || Error::UnsupportedOp {
            node: display.to_string(),
            op_type: node.op_type.clone(),
            domain: if node.domain.is_empty() {
                "ai.onnx".into()
            } else {
                node.domain.clone()
            },
            opset,
        };
        if !domain.is_empty() {
            return Err(unsupported());
        }
        let a = Attrs {
            node,
            display,
            path: self.path,
        };
        let unary = |u| Ok(Op::Unary(u));
        let binary = |b| Ok(Op::Binary(b));
        let op = match node.op_type.as_str() {
            "Neg" => unary(UnaryOp::Neg),
            "Sqrt" => unary(UnaryOp::Sqrt),
            "Reciprocal" => unary(UnaryOp::Reciprocal),
            "Exp" => unary(UnaryOp::Exp),
            "Log" => unary(UnaryOp::Log),
            "Tanh" => unary(UnaryOp::Tanh),
            "Sigmoid" => unary(UnaryOp::Sigmoid),
            "Cos" => unary(UnaryOp::Cos),
            "Sin" => unary(UnaryOp::Sin),
            "Erf" => unary(UnaryOp::Erf),
            "Abs" => unary(UnaryOp::Abs),
            "Relu" => unary(UnaryOp::Relu),
            "Floor" => unary(UnaryOp::Floor),
            "Ceil" => unary(UnaryOp::Ceil),
            "Not" => unary(UnaryOp::Not),
            "Add" => binary(BinaryOp::Add),
            "Sub" => binary(BinaryOp::Sub),
            "Mul" => binary(BinaryOp::Mul),
            "Div" => binary(BinaryOp::Div),
            "Pow" => binary(BinaryOp::Pow),
            "Equal" => binary(BinaryOp::Equal),
            "Less" => binary(BinaryOp::Less),
            "LessOrEqual" => binary(BinaryOp::LessOrEqual),
            "Greater" => binary(BinaryOp::Greater),
            "GreaterOrEqual" => binary(BinaryOp::GreaterOrEqual),
            "And" => binary(BinaryOp::And),
            "Or" => binary(BinaryOp::Or),
            "Max" => Ok(Op::Variadic(VariadicOp::Max)),
            "Min" => Ok(Op::Variadic(VariadicOp::Min)),
            "Sum" => Ok(Op::Variadic(VariadicOp::Sum)),
            "Where" => Ok(Op::Where),
            "MatMul" => Ok(Op::MatMul),
            "Identity" => Ok(Op::Identity),
            "Expand" => Ok(Op::Expand),
            "Range" => Ok(Op::Range),
            "Size" => Ok(Op::Size),
            "Gemm" => Ok(Op::Gemm {
                alpha: a.float("alpha")?.unwrap_or(1.0),
                beta: a.float("beta")?.unwrap_or(1.0),
                trans_a: a.int("transA")?.unwrap_or(0) != 0,
                trans_b: a.int("transB")?.unwrap_or(0) != 0,
            }),
            "Softmax" | "LogSoftmax" => {
                let axis = a.int("axis")?.unwrap_or(if opset >= 13 { -1 } else { 1 });
                if opset < 13 && axis != -1 {
                    // Before opset 13 the input is coerced to 2-D at `axis`;
                    // that equals the opset-13 meaning only on the last axis.
                    let rank = node
                        .input
                        .first()
                        .and_then(|n| self.convert_type(types.get(n), n).ok().flatten())
                        .and_then(|t| t.rank());
                    if rank.is_none_or(|r| axis != r as i64 - 1) {
                        return Err(self.err(format!(
                            "node '{display}' ({}): at opset {opset} axis {axis} flattens the \
                             input to 2-D, which lcc supports only on the last axis; re-export \
                             the model at opset 13 or later",
                            node.op_type
                        )));
                    }
                }
                if node.op_type == "Softmax" {
                    Ok(Op::Softmax { axis })
                } else {
                    Ok(Op::LogSoftmax { axis })
                }
            }
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => {
                let (op, moved_at) = match node.op_type.as_str() {
                    "ReduceMean" => (ReduceOp::Mean, 18),
                    "ReduceSum" => (ReduceOp::Sum, 13),
                    "ReduceMax" => (ReduceOp::Max, 18),
                    _ => (ReduceOp::Min, 18),
                };
                let keepdims = a.int("keepdims")?.unwrap_or(1) != 0;
                if opset < moved_at {
                    Ok(Op::Reduce {
                        op,
                        axes: a.ints("axes")?,
                        keepdims,
                        noop_with_empty_axes: false,
                    })
                } else {
                    Ok(Op::Reduce {
                        op,
                        axes: None,
                        keepdims,
                        noop_with_empty_axes: a.int("noop_with_empty_axes")?.unwrap_or(0) != 0,
                    })
                }
            }
            "Reshape" => Ok(Op::Reshape {
                allowzero: a.int("allowzero")?.unwrap_or(0) != 0,
            }),
            "Transpose" => Ok(Op::Transpose {
                perm: a.ints("perm")?,
            }),
            "Concat" => Ok(Op::Concat {
                axis: a.required_int("axis")?,
            }),
            "Slice" => {
                if opset < 10 {
                    Err(unsupported())
                } else {
                    Ok(Op::Slice)
                }
            }
            "Gather" => Ok(Op::Gather {
                axis: a.int("axis")?.unwrap_or(0),
            }),
            "GatherND" => Ok(Op::GatherNd {
                batch_dims: a.int("batch_dims")?.unwrap_or(0),
            }),
            "Unsqueeze" => {
                if opset < 13 {
                    Ok(Op::Unsqueeze {
                        axes: Some(a.required_ints("axes")?),
                    })
                } else {
                    Ok(Op::Unsqueeze { axes: None })
                }
            }
            "Squeeze" => {
                if opset < 13 {
                    Ok(Op::Squeeze {
                        axes: a.ints("axes")?,
                    })
                } else {
                    Ok(Op::Squeeze { axes: None })
                }
            }
            "Shape" => Ok(Op::Shape {
                start: a.int("start")?,
                end: a.int("end")?,
            }),
            "Cast" => {
                let to = a.required_int("to")?;
                let to = i32::try_from(to)
                    .ok()
                    .and_then(DType::from_onnx_code)
                    .ok_or_else(|| {
                        self.err(format!(
                            "node '{display}' (Cast): target type {} ({to}) is not supported by \
                             lcc (supported: f32, f16, bf16, f64, i64, i32, i8, u8, bool)",
                            i32::try_from(to).map_or("out of range", DType::onnx_code_name)
                        ))
                    })?;
                Ok(Op::Cast { to })
            }
            "ConstantOfShape" => {
                let value = match a.get("value") {
                    None => None,
                    Some(at) => {
                        let t = a.tensor_of(at)?;
                        let what = format!("node '{display}' (ConstantOfShape) attribute 'value'");
                        let v = self.tensor_value(t, &what)?;
                        if v.numel() != 1 {
                            return Err(self.err(format!(
                                "{what} must hold one element, it has {}",
                                v.numel()
                            )));
                        }
                        Some(v)
                    }
                };
                Ok(Op::ConstantOfShape { value })
            }
            "Trilu" => Ok(Op::Trilu {
                upper: a.int("upper")?.unwrap_or(1) != 0,
            }),
            "CumSum" => Ok(Op::CumSum {
                exclusive: a.int("exclusive")?.unwrap_or(0) != 0,
                reverse: a.int("reverse")?.unwrap_or(0) != 0,
            }),
            "Split" => {
                let num_outputs = node.output.len();
                if num_outputs == 0 {
                    return Err(self.err(format!("node '{display}' (Split) has no outputs")));
                }
                let split = if opset < 13 { a.ints("split")? } else { None };
                if opset >= 18 {
                    if let Some(n) = a.int("num_outputs")? {
                        if n != num_outputs as i64 {
                            return Err(self.err(format!(
                                "node '{display}' (Split): num_outputs is {n} but the node has \
                                 {num_outputs} outputs"
                            )));
                        }
                    }
                }
                if let Some(s) = &split {
                    if s.len() != num_outputs {
                        return Err(self.err(format!(
                            "node '{display}' (Split): 'split' has {} entries for {num_outputs} \
                             outputs",
                            s.len()
                        )));
                    }
                }
                let _ = n_inputs;
                Ok(Op::Split {
                    axis: a.int("axis")?.unwrap_or(0),
                    split,
                    num_outputs,
                })
            }
            "RMSNormalization" if opset >= 23 => Ok(Op::RmsNormalization {
                axis: a.int("axis")?.unwrap_or(-1),
                epsilon: a.float("epsilon")?.unwrap_or(1e-5),
                stash_type: a.int("stash_type")?.unwrap_or(1),
            }),
            "RotaryEmbedding" if opset >= 23 => Ok(Op::RotaryEmbedding {
                interleaved: a.int("interleaved")?.unwrap_or(0) != 0,
                num_heads: a.int("num_heads")?,
                rotary_embedding_dim: a.int("rotary_embedding_dim")?.unwrap_or(0),
            }),
            "Attention" if opset >= 23 => {
                // Later opsets add attributes that change the result (sliding
                // windows); refusing them beats computing something else.
                for at in &node.attribute {
                    const KNOWN: [&str; 7] = [
                        "is_causal",
                        "kv_num_heads",
                        "q_num_heads",
                        "scale",
                        "softcap",
                        "qk_matmul_output_mode",
                        "softmax_precision",
                    ];
                    if !KNOWN.contains(&at.name.as_str()) {
                        return Err(self.err(format!(
                            "node '{display}' (Attention, opset {opset}): attribute '{}' is not supported by lcc",
                            at.name
                        )));
                    }
                }
                Ok(Op::OnnxAttention(OnnxAttentionAttrs {
                    is_causal: a.int("is_causal")?.unwrap_or(0) != 0,
                    kv_num_heads: a.int("kv_num_heads")?,
                    q_num_heads: a.int("q_num_heads")?,
                    scale: a.float("scale")?,
                    softcap: a.float("softcap")?.unwrap_or(0.0),
                    qk_matmul_output_mode: a.int("qk_matmul_output_mode")?.unwrap_or(0),
                    softmax_precision: a.int("softmax_precision")?,
                    // Y, or Y with present_key and present_value; the fourth
                    // output (qk_matmul_output) is not produced.
                    num_outputs: if node.output.iter().skip(1).take(2).any(|o| !o.is_empty()) {
                        3
                    } else {
                        1
                    },
                }))
            }
            "Constant" => {
                let what = format!("node '{display}' (Constant)");
                let mut found = None;
                for at in &node.attribute {
                    let value = match at.name.as_str() {
                        "value" => {
                            let t = a.tensor_of(at)?;
                            self.tensor_value(t, &format!("{what} attribute 'value'"))?
                        }
                        "value_float" => Tensor::scalar_f32(a.float_of(at)?),
                        "value_floats" => {
                            let v = a.floats_of(at)?;
                            Tensor::f32(vec![v.len()], v)
                        }
                        "value_int" => Tensor::scalar_i64(a.int_of(at)?),
                        "value_ints" => {
                            let v = a.ints_of(at)?;
                            Tensor::i64(vec![v.len()], v)
                        }
                        "value_string" | "value_strings" | "sparse_value" => {
                            return Err(self.err(format!(
                                "{what}: attribute '{}' is not supported (lcc has no string or \
                                 sparse tensors)",
                                at.name
                            )))
                        }
                        _ => continue,
                    };
                    if found.is_some() {
                        return Err(self.err(format!("{what} has more than one value attribute")));
                    }
                    found = Some(value);
                }
                match found {
                    Some(value) => Ok(Op::Constant { value }),
                    None => Err(self.err(format!("{what} has no value attribute"))),
                }
            }
            _ => Err(unsupported()),
        }?;
        Ok(op)
    }
}

/// Typed access to a node's attributes, with errors that name the node.
struct Attrs<'a> {
    node: &'a NodeProto,
    display: &'a str,
    path: &'a Path,
}

const TYPE_NAMES: [&str; 15] = [
    "UNDEFINED",
    "FLOAT",
    "INT",
    "STRING",
    "TENSOR",
    "GRAPH",
    "FLOATS",
    "INTS",
    "STRINGS",
    "TENSORS",
    "GRAPHS",
    "SPARSE_TENSOR",
    "SPARSE_TENSORS",
    "TYPE_PROTO",
    "TYPE_PROTOS",
];

impl<'a> Attrs<'a> {
    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    fn check(&self, a: &AttributeProto, want: i32) -> Result<()> {
        // Writers before IR version 2 may leave `type` unset.
        if a.r#type == want || a.r#type == attr_type::UNDEFINED {
            return Ok(());
        }
        let name = |t: i32| {
            usize::try_from(t)
                .ok()
                .and_then(|i| TYPE_NAMES.get(i))
                .copied()
                .unwrap_or("an unknown type")
        };
        Err(Error::format(
            self.path,
            format!(
                "node '{}' ({}): attribute '{}' is {}, expected {}",
                self.display,
                self.node.op_type,
                a.name,
                name(a.r#type),
                name(want)
            ),
        ))
    }

    fn int_of(&self, a: &AttributeProto) -> Result<i64> {
        self.check(a, attr_type::INT)?;
        Ok(a.i)
    }

    fn float_of(&self, a: &AttributeProto) -> Result<f32> {
        self.check(a, attr_type::FLOAT)?;
        Ok(a.f)
    }

    fn ints_of(&self, a: &AttributeProto) -> Result<Vec<i64>> {
        self.check(a, attr_type::INTS)?;
        Ok(a.ints.clone())
    }

    fn floats_of(&self, a: &AttributeProto) -> Result<Vec<f32>> {
        self.check(a, attr_type::FLOATS)?;
        Ok(a.floats.clone())
    }

    fn tensor_of(&self, a: &'a AttributeProto) -> Result<&'a TensorProto> {
        self.check(a, attr_type::TENSOR)?;
        a.t.as_ref().ok_or_else(|| {
            Error::format(
                self.path,
                format!(
                    "node '{}' ({}): attribute '{}' has no tensor",
                    self.display, self.node.op_type, a.name
                ),
            )
        })
    }

    fn int(&self, name: &str) -> Result<Option<i64>> {
        self.get(name).map(|a| self.int_of(a)).transpose()
    }

    fn float(&self, name: &str) -> Result<Option<f32>> {
        self.get(name).map(|a| self.float_of(a)).transpose()
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        self.get(name).map(|a| self.ints_of(a)).transpose()
    }

    fn missing(&self, name: &str) -> Error {
        Error::format(
            self.path,
            format!(
                "node '{}' ({}): required attribute '{name}' is missing",
                self.display, self.node.op_type
            ),
        )
    }

    fn required_int(&self, name: &str) -> Result<i64> {
        self.int(name)?.ok_or_else(|| self.missing(name))
    }

    fn required_ints(&self, name: &str) -> Result<Vec<i64>> {
        self.ints(name)?.ok_or_else(|| self.missing(name))
    }
}
