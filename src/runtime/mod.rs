//! Running graphs: the [`Backend`] trait and what it compiles a graph into
//! (an [`Executable`], or a KV-cache [`Decoder`]), the execution
//! [`schedule`], the memory [`plan`], the optimizers, and the CPU backend,
//! the reference every other backend is tested against.
//!
//! Everything outside `runtime/` (training, evaluation, generation,
//! benchmarks, the CLI) uses only this interface: a backend is picked by
//! [`Device`] with [`backend`], a graph compiled once, and then run, stepped
//! and read from by weight name.

use crate::ir::{DType, Graph, Tensor, TensorData, Weight};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};

pub mod cpu;
pub mod optim;
pub mod plan;
pub mod schedule;

pub use cpu::CpuBackend;
pub use optim::{Optimizer, OptimizerConfig};
pub use schedule::Schedule;

/// Where a graph runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
}

/// Compiles `graph` for inference on `device` and runs it once with
/// `inputs` by name (`lcc exec`): its outputs, in the graph's order.
pub fn run_once(
    device: Device,
    threads: Option<usize>,
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    compute: ComputeDType,
) -> Result<Vec<(String, Tensor)>> {
    let options = CompileOptions {
        compute,
        training: false,
    };
    let outputs = backend(device, threads)?
        .compile(graph, &options)?
        .run(inputs)?;
    graph
        .outputs
        .iter()
        .map(|(name, _)| {
            let t = outputs.get(name).ok_or_else(|| {
                Error::invalid(format!("the run produced no value for output '{name}'"))
            })?;
            Ok((name.clone(), t.clone()))
        })
        .collect()
}

/// The backend for `device`; `threads: None` uses every core.
pub fn backend(device: Device, threads: Option<usize>) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(match threads {
            Some(n) => CpuBackend::with_threads(crate::util::check_threads(n)?),
            None => CpuBackend::new(),
        })),
    }
}

/// How a graph is compiled.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompileOptions {
    /// The dtype activations compute in (f32 by default).
    pub compute: ComputeDType,
    /// A training graph: trainable weights stay the f32 masters the
    /// optimizer updates; frozen ones are decoded in `compute`.
    pub training: bool,
}

/// One optimizer step of a training graph, as the trainer asks for it.
pub struct TrainStep<'a> {
    /// The micro-batches whose gradients are averaged (gradient accumulation).
    pub batches: &'a [HashMap<String, Tensor>],
    /// The graph output holding the loss.
    pub loss: &'a str,
    /// (trainable weight, graph output holding its gradient), in the order
    /// the optimizer was made with.
    pub params: &'a [(String, String)],
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    pub lr: f32,
}

/// What a step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// The loss of each micro-batch.
    pub losses: Vec<f64>,
    /// The global norm of the averaged gradients, before clipping.
    pub grad_norm: f32,
    /// False when a loss or the gradient norm was not finite: then no
    /// weight and no optimizer state changed.
    pub applied: bool,
}

impl StepOutcome {
    pub fn mean_loss(&self) -> f64 {
        self.losses.iter().sum::<f64>() / self.losses.len().max(1) as f64
    }
}

/// A graph compiled for one backend. It owns its weights in the backend's
/// memory (decoded or uploaded once), runs with inputs by name, reads and
/// writes weights by name, and applies the optimizer where the weights live.
pub trait Executable: Send {
    fn graph(&self) -> &Graph;

    /// Runs the graph once; every graph output by name, on the host.
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>>;

    /// One training step: each micro-batch forward and backward, the
    /// gradients averaged and clipped, the optimizer update applied to the
    /// resident weights. Nothing is applied when a loss or the gradient norm
    /// is not finite.
    fn train_step(&mut self, step: &TrainStep, optimizer: &mut Optimizer) -> Result<StepOutcome>;

    /// What the last `run` or `train_step` did (the optimizer's time under
    /// `optimizer`).
    fn stats(&self) -> &RunStats;

    /// A resident weight's current value, on the host.
    fn weight(&self, name: &str) -> Result<Tensor>;

    /// Replaces a resident weight (same dtype and shape).
    fn set_weight(&mut self, name: &str, t: Tensor) -> Result<()>;
}

/// Incremental decoding with a KV cache, from the same backend.
pub trait Decoder {
    /// Forgets every token fed so far.
    fn reset(&mut self);
    /// Tokens in the cache.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Cache bytes each further token takes.
    fn bytes_per_token(&self) -> u128;
    /// Refuses, naming `what`, when `tokens` more would not fit in memory.
    fn check_room(&self, tokens: usize, what: &str) -> Result<()>;
    /// Feeds tokens; the logits of each `[1, tokens, vocab]`.
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor>;
    /// Feeds tokens; the logits of the last one.
    fn feed_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
}

/// Something that runs graphs.
pub trait Backend {
    /// A short name for messages (`cpu`, `cuda`).
    fn name(&self) -> &str;

    /// Compiles `graph` (every value typed) into an executable.
    fn compile(&self, graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn Executable>>;

    /// A KV-cache decoder for an inference graph.
    fn decoder<'g>(&self, graph: &'g Graph, opts: &CompileOptions)
        -> Result<Box<dyn Decoder + 'g>>;

    /// Runs `graph` once on `inputs` (by graph input name) and returns every
    /// graph output by name.
    fn run(
        &self,
        graph: &Graph,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>>;
}

/// What a run did with time and memory, for benchmarks and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Nodes executed (graph inputs and weights included).
    pub nodes_run: usize,
    /// Weights decoded from their stored bytes.
    pub weights_decoded: usize,
    /// Most values held at once (after a node's outputs were stored and
    /// before its dead inputs were released).
    pub peak_live_values: usize,
    /// Most bytes held at once by those values; a buffer shared by several
    /// values counts once.
    pub peak_live_bytes: usize,
    /// Kernel time by op name: (nodes run, total time). Graph inputs and
    /// weights are not counted.
    pub op_time: BTreeMap<&'static str, (usize, std::time::Duration)>,
    /// Kernel output buffers taken from the executable's pool (reused) and
    /// newly allocated.
    pub buffers_reused: usize,
    pub buffers_allocated: usize,
}

/// Evaluates one op on host tensors with the reference (CPU) kernels, for
/// compile-time work such as constant folding.
pub fn eval_op(
    op: &crate::ir::Op,
    inputs: &[Option<&Tensor>],
) -> std::result::Result<Vec<Tensor>, String> {
    cpu::eval_node(op, inputs)
}

/// The dtype activations are computed (and outputs returned) in: f32 by
/// default; bf16 or f16 to reproduce a half-precision forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ComputeDType(DType);

impl Default for ComputeDType {
    fn default() -> Self {
        ComputeDType::F32
    }
}

impl ComputeDType {
    pub const F32: ComputeDType = ComputeDType(DType::F32);

    /// f32, bf16 or f16.
    pub fn new(dtype: DType) -> Result<ComputeDType> {
        match dtype {
            DType::F32 | DType::BF16 | DType::F16 => Ok(ComputeDType(dtype)),
            other => Err(Error::invalid(format!(
                "compute dtype {other}: expected f32, bf16 or f16"
            ))),
        }
    }

    /// `f32`, `bf16`, `f16` (and the long names `float32`, `bfloat16`, `float16`).
    pub fn parse(text: &str) -> Result<ComputeDType> {
        match text {
            "f32" | "float32" => Ok(ComputeDType(DType::F32)),
            "bf16" | "bfloat16" => Ok(ComputeDType(DType::BF16)),
            "f16" | "float16" => Ok(ComputeDType(DType::F16)),
            other => Err(Error::invalid(format!(
                "compute dtype '{other}': expected f32, bf16 or f16"
            ))),
        }
    }

    pub fn dtype(self) -> DType {
        self.0
    }

    /// A floating weight decoded for computing in this dtype: widened to f32
    /// (exact), or rounded to bf16/f16. Other dtypes are left as they are.
    pub fn decode(self, w: &Weight) -> Result<Tensor> {
        let mut t = w.to_tensor()?;
        self.adopt(&mut t);
        Ok(t)
    }

    /// Brings a decoded floating tensor to this dtype (see [`Self::decode`]).
    pub fn adopt(self, t: &mut Tensor) {
        if let TensorData::F32(v) = &mut t.data {
            if matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) && t.dtype != self.0 {
                cpu::layout::round_to_storage(self.0, v);
                t.dtype = self.0;
            }
        }
    }
}
