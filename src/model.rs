//! Models as files: format detection, load, save, and what `lcc inspect`
//! reports (the summary, the memory of a training step). This is the one
//! place that knows both formats; the CLI calls it and nothing below it.

use crate::ir::{Dim, Graph, Op, TensorType};
use crate::passes::autodiff::{autodiff, AutodiffOptions};
use crate::passes::{PipelineSpec, RunOptions};
use crate::runtime::plan::{ElemBytes, StepMemory};
use crate::util::{group_digits, human_bytes};
use crate::{hf, onnx, Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The two on-disk forms a model can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A single `.onnx` file (with optional external data beside it).
    Onnx,
    /// A Hugging Face directory: config.json + safetensors.
    Hf,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Onnx => "ONNX",
            Format::Hf => "Hugging Face directory",
        }
    }
}

/// What `path` holds: a directory (or a bare `config.json`) is a Hugging
/// Face model, any other file is ONNX.
pub fn detect(path: &Path) -> Result<Format> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(Error::format(
                path,
                "is a directory without config.json; a Hugging Face model directory needs config.json and its safetensors",
            ));
        }
        Ok(Format::Hf)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        // A bare config.json: the model's shapes, no weights.
        Ok(Format::Hf)
    } else {
        Ok(Format::Onnx)
    }
}

/// Where `path` will be written: `*.onnx` is ONNX, anything else a directory.
pub fn output_format(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("onnx") => Format::Onnx,
        _ => Format::Hf,
    }
}

/// The warning for a checkpoint whose files hold tensors its config does
/// not use (transformers loads such a checkpoint and warns the same way),
/// or `None`.
pub fn unused_tensors_warning(graph: &Graph, path: &Path) -> Option<String> {
    let names = graph.meta.prop(crate::hf::IGNORED_PROP)?;
    let list: Vec<&str> = names.split(',').filter(|n| !n.is_empty()).collect();
    (!list.is_empty()).then(|| {
        format!(
            "warning: {} holds {} tensors its config.json does not use (ignored): {}",
            path.display(),
            list.len(),
            list.join(", ")
        )
    })
}

/// Loads an ONNX file or a Hugging Face directory.
pub fn load(path: &Path) -> Result<Graph> {
    match detect(path)? {
        Format::Onnx => onnx::load(path),
        Format::Hf => hf::load(path),
    }
}

/// Loads a model ([`load`]); the warning about tensors its config does not
/// use goes to `note`.
pub fn load_noting(path: &Path, note: &mut dyn FnMut(&str)) -> Result<Graph> {
    let graph = load(path)?;
    if let Some(w) = unused_tensors_warning(&graph, path) {
        note(&w);
    }
    Ok(graph)
}

/// Loads a model ([`load_noting`]) and runs `pipeline` on it when it names
/// passes (`lcc inspect --passes/--pipeline`). A pass run automatically (a
/// raise on demand) says so in one line to `note`.
pub fn load_rewritten(
    path: &Path,
    pipeline: &PipelineSpec,
    no_raise: bool,
    note: &mut dyn FnMut(&str),
) -> Result<Graph> {
    let mut graph = load_noting(path, note)?;
    if let Some(p) = pipeline.build()? {
        let options = RunOptions {
            no_raise,
            ..Default::default()
        };
        p.run(&mut graph, &options, |report, _| {
            if report.automatic {
                note(&report.summary_line());
            }
        })?;
    }
    Ok(graph)
}

/// The memory of one step of `graph` on the CPU backend (`lcc inspect
/// --memory`): a training step with AdamW when it has trainable weights
/// (the backward built here unless the graph has its loss already), else a
/// forward. Also says which of the two it is (true: training).
pub fn step_memory(
    mut graph: Graph,
    batch: usize,
    seq_len: usize,
    process_bytes: Option<u64>,
) -> Result<(bool, StepMemory)> {
    let training = graph.weights.iter().any(|w| w.trainable);
    if training && !graph.outputs.iter().any(|(n, _)| n == "loss") {
        autodiff(&mut graph, &AutodiffOptions { ignore_index: -100 })?;
    }
    // AdamW keeps two moments per trainable element.
    let states = if training { 2 } else { 0 };
    let m = crate::runtime::plan::step_memory(
        &graph,
        batch,
        seq_len,
        ElemBytes::Cpu,
        states,
        process_bytes,
    )?;
    Ok((training, m))
}

/// Raises a torch ONNX export to LLaMA-level ops when `what` needs them and
/// returns the one-line note saying so; with `no_raise` such a graph is an
/// error.
pub fn raise_on_demand(
    graph: &mut Graph,
    path: &Path,
    no_raise: bool,
    what: &str,
) -> Result<Option<String>> {
    if no_raise && !crate::passes::is_llama_level(graph) {
        return Err(Error::invalid(format!(
            "{} holds primitive ONNX ops (a torch export) and {what} needs LLaMA-level ops; drop --no-raise to raise it first",
            path.display()
        )));
    }
    let report = crate::passes::ensure_llama_level(graph, what).map_err(|e| {
        Error::invalid(format!(
            "raising {} to LLaMA-level ops: {e}",
            path.display()
        ))
    })?;
    Ok(report.map(|r| r.summary_line()))
}

/// The vocabulary: the last dimension of the logits output (else of the
/// only output), when it is known.
pub fn vocab_size(graph: &Graph) -> Option<usize> {
    let v = graph
        .outputs
        .iter()
        .find(|(n, _)| n == "logits")
        .or(graph.outputs.first())?
        .1;
    let n = graph.value_type(v)?.shape.as_ref()?.last()?.fixed()?;
    usize::try_from(n).ok()
}

/// Writes `graph` as ONNX (`*.onnx`) or as a Hugging Face directory.
pub fn save(graph: &Graph, path: &Path, onnx_options: &onnx::ExportOptions) -> Result<Format> {
    let format = output_format(path);
    match format {
        Format::Onnx => onnx::save(graph, path, onnx_options)?,
        Format::Hf => hf::save(graph, path)?,
    }
    Ok(format)
}

#[derive(Clone, Debug, Serialize)]
pub struct OpsetInfo {
    pub domain: String,
    pub version: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ValueSummary {
    pub name: String,
    pub dtype: Option<String>,
    /// Each dimension a number or a symbol; `None` when the rank is unknown.
    pub shape: Option<Vec<serde_json::Value>>,
}

/// What `lcc inspect` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub path: String,
    pub format: Format,
    pub ir_version: Option<i64>,
    pub opsets: Vec<OpsetInfo>,
    pub producer: Option<String>,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    pub nodes: usize,
    pub ops: BTreeMap<String, usize>,
    pub weights: usize,
    pub parameters: u64,
    pub parameter_bytes: u64,
    pub trainable_parameters: u64,
    /// Parameters per storage dtype.
    pub weight_dtypes: BTreeMap<String, u64>,
}

fn value_summary(name: &str, ty: Option<&TensorType>) -> ValueSummary {
    ValueSummary {
        name: name.to_string(),
        dtype: ty.map(|t| t.dtype.to_string()),
        shape: ty.and_then(|t| t.shape.as_ref()).map(|dims| {
            dims.iter()
                .map(|d| match d {
                    Dim::Fixed(n) => serde_json::Value::from(*n),
                    d => serde_json::Value::from(d.to_string()),
                })
                .collect()
        }),
    }
}

/// Summarises a loaded graph.
pub fn summarize(graph: &Graph, path: &Path, format: Format) -> Summary {
    let inputs = graph
        .inputs
        .iter()
        .map(|&n| {
            let o = &graph.node(n).outputs[0];
            value_summary(&o.name, o.ty.as_ref())
        })
        .collect();
    let outputs = graph
        .outputs
        .iter()
        .map(|(name, v)| value_summary(name, graph.value_type(*v)))
        .collect();
    let mut weight_dtypes = BTreeMap::new();
    for w in graph.weights.iter() {
        *weight_dtypes.entry(w.dtype.to_string()).or_insert(0u64) += w.numel() as u64;
    }
    Summary {
        path: path.display().to_string(),
        format,
        ir_version: graph.meta.ir_version,
        opsets: graph
            .meta
            .opsets
            .iter()
            .map(|(d, v)| OpsetInfo {
                domain: if d.is_empty() {
                    "ai.onnx".into()
                } else {
                    d.clone()
                },
                version: *v,
            })
            .collect(),
        producer: graph.meta.producer.clone(),
        inputs,
        outputs,
        nodes: graph
            .g
            .node_weights()
            .filter(|n| !matches!(n.op, Op::Input | Op::Weight { .. }))
            .count(),
        ops: graph.op_histogram(),
        weights: graph.weights.len(),
        parameters: graph.weights.num_params(),
        parameter_bytes: graph.weights.num_bytes(),
        trainable_parameters: graph
            .weights
            .iter()
            .filter(|w| w.trainable)
            .map(|w| w.numel() as u64)
            .sum(),
        weight_dtypes,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shape = |v: &ValueSummary| {
            let dt = v.dtype.clone().unwrap_or_else(|| "?".into());
            match &v.shape {
                None => format!("{dt}[*]"),
                Some(d) => {
                    let dims: Vec<String> = d
                        .iter()
                        .map(|x| match x {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect();
                    format!("{dt}[{}]", dims.join(","))
                }
            }
        };
        writeln!(f, "model:      {}", self.path)?;
        write!(f, "format:     {}", self.format.describe())?;
        if let Some(v) = self.ir_version {
            write!(f, ", IR version {v}")?;
        }
        if !self.opsets.is_empty() {
            let o: Vec<String> = self
                .opsets
                .iter()
                .map(|o| format!("{} {}", o.domain, o.version))
                .collect();
            write!(f, ", opsets: {}", o.join(", "))?;
        }
        writeln!(f)?;
        if let Some(p) = &self.producer {
            writeln!(f, "producer:   {p}")?;
        }
        writeln!(f, "inputs:")?;
        for i in &self.inputs {
            writeln!(f, "  {:<24} {}", i.name, shape(i))?;
        }
        writeln!(f, "outputs:")?;
        for o in &self.outputs {
            writeln!(f, "  {:<24} {}", o.name, shape(o))?;
        }
        writeln!(f, "ops:        {} nodes", self.nodes)?;
        let mut ops: Vec<(&String, &usize)> = self.ops.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            writeln!(f, "  {op:<24} {n}")?;
        }
        writeln!(
            f,
            "parameters: {} ({}) in {} weights",
            group_digits(self.parameters),
            human_bytes(self.parameter_bytes),
            self.weights
        )?;
        let dts: Vec<String> = self
            .weight_dtypes
            .iter()
            .map(|(d, n)| format!("{d} {}", group_digits(*n)))
            .collect();
        writeln!(
            f,
            "dtypes:     {}",
            if dts.is_empty() {
                "-".into()
            } else {
                dts.join(", ")
            }
        )?;
        writeln!(f, "trainable:  {}", group_digits(self.trainable_parameters))
    }
}
