//! The CPU backend: the reference executor. It runs the nodes in schedule
//! order, multithreaded with rayon, and frees every value as soon as its
//! last reader has run.
//!
//! It computes in f32 whatever dtype the weights are stored in: f16/bf16
//! weights are widened when decoded (exactly), so activations and
//! accumulations are f32 and a bf16 checkpoint gives what transformers gives
//! when it loads that checkpoint with `dtype=torch.float32`. A compute dtype
//! of bf16 or f16 ([`CpuBackend::with_compute_dtype`]) instead rounds the
//! weights to it and every activation after each op, as a bf16 forward
//! does.
//!
//! Values are held as `Arc<Tensor>`: `Identity` (and a no-op `Cast`) pass
//! their input through without a copy, and a kernel whose input dies at
//! this node may reuse its buffer (reshapes, unary and binary arithmetic).
//!
//! Kernels: [`elementwise`] and [`shape_ops`] (ONNX's arithmetic and
//! layout ops), [`linalg`] (MatMul, Gemm and the strided GEMM under every
//! product), and [`kernels`], the neural-network ops, one file per op with
//! its backward and a plain f64 reference beside it.

pub mod decode;
pub mod elementwise;
mod erf;
pub mod kernels;
pub mod layout;
pub mod linalg;
pub mod pool;
pub mod shape_ops;
pub mod vmath;

use super::schedule::Schedule;
use super::{
    Backend, CompileOptions, ComputeDType, Decoder, Executable, Optimizer, RunStats, StepOutcome,
    TrainStep,
};
use crate::ir::{DType, Graph, NodeIndex, Op, Tensor, TensorData, Value};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The CPU backend. `threads: None` uses rayon's global pool (one thread per
/// core); `Some(n)` runs in a pool of `n` threads.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    threads: Option<usize>,
    compute: ComputeDType,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend::default()
    }

    /// A backend that runs in its own pool of `threads` threads.
    pub fn with_threads(threads: usize) -> Self {
        CpuBackend {
            threads: Some(threads),
            ..Default::default()
        }
    }

    /// The same backend computing in `compute` (f32 by default).
    pub fn with_compute_dtype(self, compute: ComputeDType) -> Self {
        CpuBackend { compute, ..self }
    }

    /// Runs the graph and reports memory statistics.
    pub fn run_with_stats(
        &self,
        graph: &Graph,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<(HashMap<String, Tensor>, RunStats)> {
        let compute = self.compute;
        match self.threads {
            None => execute(graph, inputs, compute),
            Some(n) => {
                crate::util::check_threads(n)?;
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| Error::invalid(format!("cannot start {n} CPU threads: {e}")))?;
                pool.install(|| execute(graph, inputs, compute))
            }
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn compile(&self, graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn Executable>> {
        Ok(Box::new(Session::build(
            graph.clone(),
            self.threads,
            opts.compute,
            opts.training,
        )?))
    }

    fn decoder<'g>(
        &self,
        graph: &'g Graph,
        opts: &CompileOptions,
    ) -> Result<Box<dyn Decoder + 'g>> {
        Ok(Box::new(decode::DecodeSession::with_compute_dtype(
            graph,
            opts.compute,
        )?))
    }

    fn run(
        &self,
        graph: &Graph,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        self.run_with_stats(graph, inputs).map(|(out, _)| out)
    }
}

/// Runs `graph` on the CPU with the default thread pool.
pub fn run(graph: &Graph, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    CpuBackend::new().run(graph, inputs)
}

/// Runs `graph` on the CPU and reports memory statistics.
pub fn run_with_stats(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, RunStats)> {
    CpuBackend::new().run_with_stats(graph, inputs)
}

// ---------------------------------------------------------------------------
// Sessions: one graph, many runs
// ---------------------------------------------------------------------------

/// A graph prepared to run many times (training steps, decoding): the
/// schedule is computed once and every weight is decoded once and kept
/// resident, so a step neither re-reads nor copies the weights. Trainable
/// weights can be updated in place between runs ([`Session::weight_mut`]),
/// which is how the optimizer writes its steps.
pub struct Session {
    graph: Graph,
    sched: Schedule,
    weights: HashMap<String, Arc<Tensor>>,
    /// Nodes computed once at compile time because they read only frozen
    /// weights and constants (the concatenated weight of a `MergedLinear`),
    /// with their outputs.
    precomputed: HashMap<NodeIndex, Vec<Arc<Tensor>>>,
    pool: Option<rayon::ThreadPool>,
    /// Buffers of the previous runs' dead values, for the next runs.
    buffers: std::sync::Mutex<pool::BufferPool>,
    /// What the last run or training step did.
    last_stats: RunStats,
    /// Gradient accumulators of `train_step`, one per trainable weight.
    grad_acc: Vec<Vec<f32>>,
}

impl Session {
    /// Prepares `graph` to compute in f32; `threads: None` uses rayon's
    /// global pool.
    pub fn new(graph: Graph, threads: Option<usize>) -> Result<Session> {
        Session::with_compute_dtype(graph, threads, ComputeDType::F32)
    }

    /// Prepares `graph` to compute in `compute`: every floating weight is
    /// decoded in that dtype.
    pub fn with_compute_dtype(
        graph: Graph,
        threads: Option<usize>,
        compute: ComputeDType,
    ) -> Result<Session> {
        Session::build(graph, threads, compute, false)
    }

    /// Prepares a training graph: frozen weights are decoded in `compute`,
    /// trainable ones stay as they are (the f32 masters the optimizer
    /// updates in place).
    pub fn for_training(
        graph: Graph,
        threads: Option<usize>,
        compute: ComputeDType,
    ) -> Result<Session> {
        Session::build(graph, threads, compute, true)
    }

    pub(crate) fn build(
        graph: Graph,
        threads: Option<usize>,
        compute: ComputeDType,
        keep_trainable: bool,
    ) -> Result<Session> {
        crate::ir::verify(&graph)?;
        let frozen = precomputable(&graph, keep_trainable);
        let sched = Schedule::with_precomputed(&graph, &frozen)?;
        // Every weight is decoded and kept resident: refuse up front, not
        // half way through, when they cannot all fit.
        let resident: u128 = graph
            .weights
            .iter()
            .map(|w| w.numel() as u128 * w.dtype.size().max(4) as u128)
            .sum();
        crate::memory::check(
            resident,
            &format!(
                "decoding the model's {} weights for a session",
                graph.weights.len()
            ),
        )?;
        let mut weights = HashMap::new();
        for w in graph.weights.iter() {
            let t = if keep_trainable && w.trainable {
                w.to_tensor()?
            } else {
                compute.decode(w)?
            };
            weights.insert(w.name.clone(), Arc::new(t));
        }
        let precomputed = precompute(&graph, &frozen, &weights)?;
        // Weights that only precomputed nodes read are not needed at run
        // time; `weight` decodes them from the store when asked.
        let run_time: std::collections::HashSet<&str> = sched
            .order
            .iter()
            .filter_map(|&n| match &graph.node(n).op {
                Op::Weight { name } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        weights.retain(|name, _| run_time.contains(name.as_str()));
        let pool = match threads {
            None => None,
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(crate::util::check_threads(n)?)
                    .build()
                    .map_err(|e| Error::invalid(format!("cannot start {n} CPU threads: {e}")))?,
            ),
        };
        Ok(Session {
            graph,
            sched,
            weights,
            precomputed,
            pool,
            buffers: Default::default(),
            last_stats: RunStats::default(),
            grad_acc: Vec::new(),
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph once.
    pub fn run(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        self.run_with_stats(inputs).map(|(out, _)| out)
    }

    pub fn run_with_stats(
        &self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<(HashMap<String, Tensor>, RunStats)> {
        let go = || {
            let mut buffers = self
                .buffers
                .lock()
                .map_err(|_| Error::invalid("a previous run panicked; start a new session"))?;
            let (before_reused, before_alloc) = (buffers.reused, buffers.allocated);
            let result = {
                let _on = pool::activate(&mut buffers);
                execute_with(
                    &self.graph,
                    &self.sched,
                    inputs,
                    Resident::Session(&self.weights, &self.precomputed),
                )
            };
            result.map(|(out, mut stats)| {
                stats.buffers_reused = buffers.reused - before_reused;
                stats.buffers_allocated = buffers.allocated - before_alloc;
                (out, stats)
            })
        };
        match &self.pool {
            None => go(),
            Some(pool) => pool.install(go),
        }
    }

    /// Gives a run's outputs back once the caller is done with them (the
    /// gradients after the optimizer step), so that the next run reuses
    /// their buffers instead of allocating.
    pub fn reclaim(&self, outputs: HashMap<String, Tensor>) {
        if let Ok(mut buffers) = self.buffers.lock() {
            let _on = pool::activate(&mut buffers);
            for (_, t) in outputs {
                recycle(Arc::new(t));
            }
        }
    }

    /// Runs `f` in the session's thread pool (for work between runs, such
    /// as the optimizer, to use the same threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            None => f(),
            Some(pool) => pool.install(f),
        }
    }

    /// A resident weight.
    pub fn weight(&self, name: &str) -> Option<&Tensor> {
        self.weights.get(name).map(|t| &**t)
    }

    /// A resident weight, for an in-place update between runs (the copy on
    /// write happens only if a caller still holds an output sharing it).
    pub fn weight_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.weights.get_mut(name).map(Arc::make_mut)
    }

    /// Several resident weights at once, in the order of `names`, for an
    /// in-place update between runs.
    pub fn weights_mut(&mut self, names: &[String]) -> Result<Vec<&mut Tensor>> {
        let want: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut slots: Vec<Option<&mut Tensor>> = (0..names.len()).map(|_| None).collect();
        for (name, t) in self.weights.iter_mut() {
            if let Some(&i) = want.get(name.as_str()) {
                slots[i] = Some(Arc::make_mut(t));
            }
        }
        slots
            .into_iter()
            .zip(names)
            .map(|(t, n)| {
                t.ok_or_else(|| Error::invalid(format!("'{n}' is not a weight of the graph")))
            })
            .collect()
    }

    /// Replaces a weight (same name, dtype and shape). A frozen weight that
    /// only precomputed nodes read is written to the graph's store and the
    /// precomputed values are computed again.
    pub fn set_weight(&mut self, name: &str, t: Tensor) -> Result<()> {
        let (dtype, shape) = match self.weights.get(name) {
            Some(cur) => (cur.dtype, cur.shape.clone()),
            None => {
                let w = self.graph.weights.get(name).ok_or_else(|| {
                    Error::invalid(format!("'{name}' is not a weight of the graph"))
                })?;
                (w.dtype, w.shape.clone())
            }
        };
        if dtype != t.dtype || shape != t.shape {
            return Err(Error::invalid(format!(
                "weight '{name}' is {dtype}{shape:?}; cannot replace it with {}{:?}",
                t.dtype, t.shape
            )));
        }
        if self.weights.contains_key(name) {
            self.weights.insert(name.to_string(), Arc::new(t));
            return Ok(());
        }
        let trainable = self.graph.weights.get(name).is_some_and(|w| w.trainable);
        self.graph.weights.insert(crate::ir::Weight::from_tensor(
            name.to_string(),
            &t,
            trainable,
        ));
        let frozen: std::collections::HashSet<NodeIndex> =
            self.precomputed.keys().copied().collect();
        let mut inputs = self.weights.clone();
        for n in &frozen {
            for v in self.graph.inputs_of(*n).into_iter().flatten() {
                if let Op::Weight { name } = &self.graph.node(v.node).op {
                    if !inputs.contains_key(name) {
                        let w = self.graph.weights.get(name).ok_or_else(|| {
                            Error::invalid(format!("weight '{name}' is not in the store"))
                        })?;
                        inputs.insert(name.clone(), Arc::new(w.to_tensor()?));
                    }
                }
            }
        }
        self.precomputed = precompute(&self.graph, &frozen, &inputs)?;
        Ok(())
    }

    /// Writes the resident values of the named weights back into the
    /// graph's store (before saving) and returns the graph.
    pub fn sync_weights(&mut self, names: &[String]) -> Result<&Graph> {
        for name in names {
            let t = self
                .weights
                .get(name)
                .ok_or_else(|| Error::invalid(format!("'{name}' is not a weight of the graph")))?;
            let trainable = self.graph.weights.get(name).is_some_and(|w| w.trainable);
            self.graph
                .weights
                .insert(crate::ir::Weight::from_tensor(name.clone(), t, trainable));
        }
        Ok(&self.graph)
    }
}

impl Executable for Session {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let (out, stats) = self.run_with_stats(inputs)?;
        self.last_stats = stats;
        Ok(out)
    }

    fn train_step(&mut self, step: &TrainStep, optimizer: &mut Optimizer) -> Result<StepOutcome> {
        let names: Vec<String> = step.params.iter().map(|(w, _)| w.clone()).collect();
        let sizes: Vec<usize> = names
            .iter()
            .map(|n| {
                self.weight(n).map(Tensor::numel).ok_or_else(|| {
                    Error::invalid(format!(
                        "trainable weight '{n}' is not a weight of the graph"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        if self.grad_acc.len() != sizes.len()
            || self.grad_acc.iter().zip(&sizes).any(|(a, &n)| a.len() != n)
        {
            self.grad_acc = sizes.iter().map(|&n| vec![0.0; n]).collect();
        } else {
            self.grad_acc.iter_mut().for_each(|a| a.fill(0.0));
        }
        let mut stats = RunStats::default();
        let mut losses = Vec::with_capacity(step.batches.len());
        for batch in step.batches {
            let (outs, s) = self.run_with_stats(batch)?;
            merge_stats(&mut stats, s);
            let loss = outs
                .get(step.loss)
                .and_then(|t| t.to_f64_vec().first().copied())
                .ok_or_else(|| Error::invalid(format!("the graph computed no '{}'", step.loss)))?;
            losses.push(loss);
            if !loss.is_finite() {
                self.reclaim(outs);
                self.last_stats = stats;
                return Ok(StepOutcome {
                    losses,
                    grad_norm: f32::NAN,
                    applied: false,
                });
            }
            for (acc, (_, out)) in self.grad_acc.iter_mut().zip(step.params) {
                let g = outs
                    .get(out)
                    .and_then(Tensor::as_f32)
                    .ok_or_else(|| Error::invalid(format!("gradient '{out}' was not computed")))?;
                if g.len() != acc.len() {
                    return Err(Error::invalid(format!(
                        "gradient '{out}' has {} values, its weight {}",
                        g.len(),
                        acc.len()
                    )));
                }
                acc.iter_mut().zip(g).for_each(|(a, &x)| *a += x);
            }
            self.reclaim(outs);
        }
        let start = std::time::Instant::now();
        let k = step.batches.len();
        if k > 1 {
            let inv = 1.0 / k as f32;
            self.grad_acc
                .iter_mut()
                .for_each(|a| a.iter_mut().for_each(|x| *x *= inv));
        }
        let grad_norm = {
            let mut views: Vec<&mut [f32]> =
                self.grad_acc.iter_mut().map(|v| v.as_mut_slice()).collect();
            super::optim::clip_grad_norm(&mut views, step.max_grad_norm)
        };
        if !grad_norm.is_finite() {
            self.last_stats = stats;
            return Ok(StepOutcome {
                losses,
                grad_norm,
                applied: false,
            });
        }
        // The update, in place on the resident weights (in the session's
        // threads): no weight is copied.
        let grad_acc = std::mem::take(&mut self.grad_acc);
        let result = {
            let pool = self.pool.take();
            let r = {
                let mut params = self.weights_mut(&names)?;
                let mut slices: Vec<&mut [f32]> = Vec::with_capacity(params.len());
                for (name, t) in names.iter().zip(params.iter_mut()) {
                    match &mut t.data {
                        TensorData::F32(v) => slices.push(v.as_mut_slice()),
                        _ => {
                            return Err(Error::invalid(format!(
                                "trainable weight '{name}' is not f32"
                            )))
                        }
                    }
                }
                let grads: Vec<&[f32]> = grad_acc.iter().map(|v| v.as_slice()).collect();
                match &pool {
                    Some(p) => p.install(|| optimizer.step(&mut slices, &grads, step.lr)),
                    None => optimizer.step(&mut slices, &grads, step.lr),
                }
            };
            self.pool = pool;
            r
        };
        self.grad_acc = grad_acc;
        result?;
        let e = stats.op_time.entry("optimizer").or_default();
        e.0 += 1;
        e.1 += start.elapsed();
        self.last_stats = stats;
        Ok(StepOutcome {
            losses,
            grad_norm,
            applied: true,
        })
    }

    fn stats(&self) -> &RunStats {
        &self.last_stats
    }

    fn weight(&self, name: &str) -> Result<Tensor> {
        match Session::weight(self, name) {
            Some(t) => Ok(t.clone()),
            // Read only at compile time (into a precomputed value): the
            // store holds it.
            None => self
                .graph
                .weights
                .get(name)
                .ok_or_else(|| Error::invalid(format!("'{name}' is not a weight of the graph")))?
                .to_tensor(),
        }
    }

    fn set_weight(&mut self, name: &str, t: Tensor) -> Result<()> {
        Session::set_weight(self, name, t)
    }
}

/// Adds the counts and times of `s` to `into`; peaks take the maximum.
fn merge_stats(into: &mut RunStats, s: RunStats) {
    into.nodes_run += s.nodes_run;
    into.weights_decoded += s.weights_decoded;
    into.peak_live_values = into.peak_live_values.max(s.peak_live_values);
    into.peak_live_bytes = into.peak_live_bytes.max(s.peak_live_bytes);
    into.buffers_reused += s.buffers_reused;
    into.buffers_allocated += s.buffers_allocated;
    for (op, (n, t)) in s.op_time {
        let e = into.op_time.entry(op).or_default();
        e.0 += n;
        e.1 += t;
    }
}

// ---------------------------------------------------------------------------
// Value storage with liveness accounting
// ---------------------------------------------------------------------------

fn tensor_bytes(t: &Tensor) -> usize {
    let elem = match t.data {
        TensorData::F32(_) => 4,
        TensorData::F64(_) | TensorData::I64(_) => 8,
        TensorData::Bool(_) => 1,
    };
    t.numel() * elem
}

struct Values {
    /// By node index, then output slot.
    slots: Vec<Vec<Option<Arc<Tensor>>>>,
    live_values: usize,
    /// Buffer address → (values holding it, its bytes).
    buffers: HashMap<usize, (usize, usize)>,
    live_bytes: usize,
    /// Bytes released by the current step, subtracted once its outputs are
    /// counted (inputs and outputs coexist while a kernel runs).
    releasing: usize,
    stats: RunStats,
}

impl Values {
    fn new(bound: usize) -> Values {
        Values {
            slots: vec![Vec::new(); bound],
            live_values: 0,
            buffers: HashMap::new(),
            live_bytes: 0,
            releasing: 0,
            stats: RunStats::default(),
        }
    }

    fn get(&self, v: Value) -> Option<&Arc<Tensor>> {
        self.slots.get(v.node.index())?.get(v.slot)?.as_ref()
    }

    fn insert(&mut self, v: Value, t: Arc<Tensor>) {
        let key = Arc::as_ptr(&t) as usize;
        let entry = self.buffers.entry(key).or_insert((0, tensor_bytes(&t)));
        if entry.0 == 0 {
            self.live_bytes += entry.1;
        }
        entry.0 += 1;
        let slots = &mut self.slots[v.node.index()];
        if slots.len() <= v.slot {
            slots.resize(v.slot + 1, None);
        }
        if slots[v.slot].replace(t).is_none() {
            self.live_values += 1;
        }
    }

    fn take(&mut self, v: Value) -> Option<Arc<Tensor>> {
        let t = self
            .slots
            .get_mut(v.node.index())?
            .get_mut(v.slot)?
            .take()?;
        self.live_values -= 1;
        let key = Arc::as_ptr(&t) as usize;
        if let Some(entry) = self.buffers.get_mut(&key) {
            entry.0 -= 1;
            if entry.0 == 0 {
                self.releasing += entry.1;
                self.buffers.remove(&key);
            }
        }
        Some(t)
    }

    /// Ends a step: records the peak, then forgets what the step released.
    fn settle(&mut self, dead_values: usize) {
        let s = &mut self.stats;
        s.peak_live_values = s.peak_live_values.max(self.live_values + dead_values);
        s.peak_live_bytes = s.peak_live_bytes.max(self.live_bytes);
        self.live_bytes -= self.releasing;
        self.releasing = 0;
    }
}

// ---------------------------------------------------------------------------
// The executor
// ---------------------------------------------------------------------------

/// Checks the caller's inputs against the graph's declared inputs.
fn validate_inputs(graph: &Graph, inputs: &HashMap<String, Tensor>) -> Result<()> {
    let declared: Vec<&str> = graph
        .inputs
        .iter()
        .map(|&i| graph.node(i).outputs[0].name.as_str())
        .collect();
    let mut unknown: Vec<&String> = inputs
        .keys()
        .filter(|k| !declared.contains(&k.as_str()))
        .collect();
    unknown.sort();
    if let Some(k) = unknown.first() {
        return Err(Error::invalid(format!(
            "'{k}' is not an input of the graph; its inputs are: {}",
            declared.join(", ")
        )));
    }
    let mut bindings = BTreeMap::new();
    for &i in &graph.inputs {
        let out = &graph.node(i).outputs[0];
        let name = &out.name;
        let expected = out
            .ty
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_else(|| "any type".into());
        let t = inputs.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "input '{name}' ({expected}) is missing; pass a tensor under that name"
            ))
        })?;
        layout::check_consistent(t).map_err(|m| Error::invalid(format!("input '{name}': {m}")))?;
        if let Some(ty) = &out.ty {
            if t.dtype != ty.dtype {
                return Err(Error::invalid(format!(
                    "input '{name}' must be {ty}, got {}{:?}",
                    t.dtype, t.shape
                )));
            }
            ty.check_concrete(&t.shape, &mut bindings)
                .map_err(|m| Error::invalid(format!("input '{name}' must be {ty}: {m}")))?;
        }
    }
    Ok(())
}

/// Hands a value's f32 buffer to the pool when this was its last holder.
fn recycle(t: Arc<Tensor>) {
    if let Ok(t) = Arc::try_unwrap(t) {
        if let TensorData::F32(v) = t.data {
            pool::recycle(v);
        }
    }
}

fn execute(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    compute: ComputeDType,
) -> Result<(HashMap<String, Tensor>, RunStats)> {
    let sched = Schedule::new(graph)?;
    execute_with(graph, &sched, inputs, Resident::Decode(compute))
}

/// Nodes of `graph` that read only frozen weights, constants and other
/// such nodes (never an input, never a trainable weight when
/// `keep_trainable`): a session computes them once, when it is built.
/// Constants and weights themselves are not listed, nor nodes that nothing
/// at run time reads.
fn precomputable(graph: &Graph, keep_trainable: bool) -> std::collections::HashSet<NodeIndex> {
    let mut fixed: std::collections::HashSet<NodeIndex> = std::collections::HashSet::new();
    let mut out = std::collections::HashSet::new();
    let Ok(order) = graph.topo_order() else {
        return out;
    };
    for n in order {
        let node = graph.node(n);
        let is_fixed = match &node.op {
            Op::Weight { name } => {
                !(keep_trainable && graph.weights.get(name).is_some_and(|w| w.trainable))
            }
            Op::Constant { .. } => true,
            Op::Input => false,
            // Only the weight concatenation of a merge is worth keeping:
            // other weight-only work (a transpose, a cast) would keep a
            // second copy of a weight for little gain.
            Op::Concat { .. } => {
                let ins = graph.inputs_of(n);
                !ins.is_empty()
                    && ins
                        .iter()
                        .all(|v| v.is_some_and(|v| fixed.contains(&v.node)))
            }
            _ => false,
        };
        if is_fixed {
            fixed.insert(n);
            if matches!(node.op, Op::Concat { .. }) {
                out.insert(n);
            }
        }
    }
    out
}

/// Computes the precomputable nodes from the decoded weights.
fn precompute(
    graph: &Graph,
    nodes: &std::collections::HashSet<NodeIndex>,
    weights: &HashMap<String, Arc<Tensor>>,
) -> Result<HashMap<NodeIndex, Vec<Arc<Tensor>>>> {
    let mut done: HashMap<NodeIndex, Vec<Arc<Tensor>>> = HashMap::new();
    for n in graph.topo_order()? {
        if !nodes.contains(&n) {
            continue;
        }
        let node = graph.node(n);
        let fail = |msg: String| Error::exec(graph.display_name(n), node.op.name(), msg);
        let mut ins: Ins = Vec::new();
        for v in graph.inputs_of(n) {
            let t = match v {
                None => None,
                Some(v) => Some(match &graph.node(v.node).op {
                    Op::Weight { name } => weights
                        .get(name)
                        .cloned()
                        .ok_or_else(|| fail(format!("weight '{name}' is not decoded")))?,
                    Op::Constant { value } => Arc::new(value.clone()),
                    _ => done
                        .get(&v.node)
                        .and_then(|o| o.get(v.slot))
                        .cloned()
                        .ok_or_else(|| fail("an input was not precomputed".into()))?,
                }),
            };
            ins.push(t);
        }
        let outs = run_kernel(&node.op, &mut ins, node.outputs.len()).map_err(fail)?;
        done.insert(n, outs);
    }
    Ok(done)
}

/// Where a run's weights come from.
enum Resident<'a> {
    /// A [`Session`]'s, decoded once, and its precomputed nodes.
    Session(
        &'a HashMap<String, Arc<Tensor>>,
        &'a HashMap<NodeIndex, Vec<Arc<Tensor>>>,
    ),
    /// Decoded from the store when first read, for computing in this dtype.
    Decode(ComputeDType),
}

/// Runs `graph` in the order of `sched`. With `resident`, weights are read
/// from those already-decoded tensors (a [`Session`]'s) instead of being
/// decoded from the store.
fn execute_with(
    graph: &Graph,
    sched: &Schedule,
    inputs: &HashMap<String, Tensor>,
    weights: Resident,
) -> Result<(HashMap<String, Tensor>, RunStats)> {
    let (resident, precomputed, compute) = match weights {
        Resident::Session(r, p) => (Some(r), Some(p), ComputeDType::F32),
        Resident::Decode(c) => (None, None, c),
    };
    validate_inputs(graph, inputs)?;
    let mut values = Values::new(petgraph::visit::NodeIndexable::node_bound(&graph.g));
    // The run-time sizes of the graph's symbols, bound as values appear;
    // every value is checked against its inferred type.
    let mut bindings: BTreeMap<String, usize> = BTreeMap::new();

    // A weight read by several Weight nodes is decoded once and kept until
    // the last of them has run.
    let mut weight_readers: HashMap<&str, usize> = HashMap::new();
    for &n in &sched.order {
        if let Op::Weight { name } = &graph.node(n).op {
            *weight_readers.entry(name.as_str()).or_insert(0) += 1;
        }
    }
    let mut weight_cache: HashMap<&str, Arc<Tensor>> = HashMap::new();

    for (step, &n) in sched.order.iter().enumerate() {
        let node = graph.node(n);
        let fail = |msg: String| Error::exec(graph.display_name(n), node.op.name(), msg);
        let mut ins: Vec<Option<Arc<Tensor>>> = Vec::with_capacity(node.num_inputs);
        let is_precomputed = precomputed.is_some_and(|p| p.contains_key(&n));
        for (port, v) in graph.inputs_of(n).into_iter().enumerate() {
            if is_precomputed {
                break;
            }
            ins.push(match v {
                None => None,
                Some(v) => Some(values.get(v).cloned().ok_or_else(|| {
                    fail(format!(
                        "input {port} was not computed (it reads '{}'); the schedule is broken",
                        graph.display_name(v.node)
                    ))
                })?),
            });
        }
        // Release dead inputs now, so that a kernel holding the only
        // reference may reuse the buffer.
        let mut dead = 0;
        for &v in sched.frees_at(step) {
            if values.take(v).is_some() {
                dead += 1;
            }
        }

        let outs: Vec<Arc<Tensor>> = match &node.op {
            _ if is_precomputed => precomputed
                .and_then(|p| p.get(&n))
                .cloned()
                .unwrap_or_default(),
            Op::Input => {
                let name = &node.outputs[0].name;
                let t = inputs
                    .get(name)
                    .ok_or_else(|| fail(format!("input '{name}' is missing")))?;
                vec![Arc::new(t.clone())]
            }
            Op::Weight { name } if resident.is_some_and(|r| r.contains_key(name)) => {
                let t = resident.and_then(|r| r.get(name)).cloned();
                vec![t.ok_or_else(|| fail(format!("weight '{name}' is not resident")))?]
            }
            Op::Weight { name } => {
                let t = match weight_cache.get(name.as_str()) {
                    Some(t) => t.clone(),
                    None => {
                        let w = graph.weights.get(name).ok_or_else(|| {
                            fail(format!(
                                "weight '{name}' is not in the graph's weight store"
                            ))
                        })?;
                        let t = Arc::new(compute.decode(w).map_err(|e| fail(e.to_string()))?);
                        values.stats.weights_decoded += 1;
                        t
                    }
                };
                let left = weight_readers.get_mut(name.as_str()).map(|c| {
                    *c -= 1;
                    *c
                });
                if left.unwrap_or(0) > 0 {
                    weight_cache.insert(name.as_str(), t.clone());
                } else {
                    weight_cache.remove(name.as_str());
                }
                vec![t]
            }
            op => {
                let start = std::time::Instant::now();
                let outs = run_kernel(op, &mut ins, node.outputs.len()).map_err(fail)?;
                let e = values.stats.op_time.entry(op.name()).or_default();
                e.0 += 1;
                e.1 += start.elapsed();
                // Inputs that died here and that nothing else holds give
                // their buffers back.
                ins.into_iter().flatten().for_each(recycle);
                outs
            }
        };
        if outs.len() < node.outputs.len() {
            return Err(fail(format!(
                "the kernel produced {} outputs, the node declares {}",
                outs.len(),
                node.outputs.len()
            )));
        }
        for (slot, t) in outs.into_iter().take(node.outputs.len()).enumerate() {
            if let Some(ty) = &node.outputs[slot].ty {
                check_type(ty, &t, &mut bindings).map_err(|m| {
                    fail(format!(
                        "output {slot} does not have its inferred type: {m}"
                    ))
                })?;
            }
            values.insert(Value::new(n, slot), t);
        }
        // Outputs nothing reads die right away.
        for &v in sched.frees_at(step) {
            if v.node == n {
                if let Some(t) = values.take(v) {
                    dead += 1;
                    recycle(t);
                }
            }
        }
        values.settle(dead);
        values.stats.nodes_run += 1;
    }

    let mut result = HashMap::with_capacity(graph.outputs.len());
    for (name, v) in &graph.outputs {
        let t = values.get(*v).cloned().ok_or_else(|| {
            Error::exec(
                graph.display_name(v.node),
                graph.node(v.node).op.name(),
                format!("graph output '{name}' was not computed"),
            )
        })?;
        result.insert(name.clone(), t);
    }
    drop(values.slots);
    let result = result
        .into_iter()
        .map(|(k, t)| (k, Arc::try_unwrap(t).unwrap_or_else(|t| (*t).clone())))
        .collect();
    Ok((result, values.stats))
}

/// Checks a computed tensor against its inferred type: the shape (binding
/// symbols on first sight) and the kind of element. Floating dtypes may
/// differ, since weights stored as bf16/f16 compute in the session's dtype.
fn check_type(
    ty: &crate::ir::TensorType,
    t: &Tensor,
    bindings: &mut BTreeMap<String, usize>,
) -> std::result::Result<(), String> {
    let kind = |d: DType| {
        if d.is_float() {
            0
        } else if d == DType::Bool {
            1
        } else {
            2
        }
    };
    if kind(ty.dtype) != kind(t.dtype) {
        return Err(format!("it is {}{:?}, inferred {ty}", t.dtype, t.shape));
    }
    ty.check_concrete(&t.shape, bindings)
        .map_err(|m| format!("it is {}{:?}, inferred {ty} ({m})", t.dtype, t.shape))
}

// ---------------------------------------------------------------------------
// Kernel dispatch
// ---------------------------------------------------------------------------

type Ins = Vec<Option<Arc<Tensor>>>;

fn req(ins: &Ins, i: usize) -> std::result::Result<&Tensor, String> {
    ins.get(i)
        .and_then(|t| t.as_deref())
        .ok_or_else(|| format!("required input {i} is missing"))
}

fn opt(ins: &Ins, i: usize) -> Option<&Tensor> {
    ins.get(i).and_then(|t| t.as_deref())
}

/// Takes input `i` by value when this node holds the only reference.
fn take_unique(ins: &mut Ins, i: usize) -> Option<Tensor> {
    let arc = ins.get_mut(i)?.take()?;
    match Arc::try_unwrap(arc) {
        Ok(t) => Some(t),
        Err(arc) => {
            ins[i] = Some(arc);
            None
        }
    }
}

/// Input `i` by value: moved when unique, else copied.
fn take_owned(ins: &mut Ins, i: usize) -> std::result::Result<Tensor, String> {
    if let Some(t) = take_unique(ins, i) {
        return Ok(t);
    }
    req(ins, i).cloned()
}

fn int_list(t: &Tensor, what: &str) -> std::result::Result<Vec<i64>, String> {
    elementwise::shape_values(t, what)
}

fn one(t: Tensor) -> std::result::Result<Vec<Arc<Tensor>>, String> {
    Ok(vec![Arc::new(t)])
}

/// Evaluates one op on host tensors (in port order, `None` = absent), with
/// the same kernels the executor runs; for constant folding.
pub(crate) fn eval_node(
    op: &Op,
    inputs: &[Option<&Tensor>],
) -> std::result::Result<Vec<Tensor>, String> {
    let ins: Ins = inputs
        .iter()
        .map(|t| t.map(|t| Arc::new(t.clone())))
        .collect();
    let mut ins = ins;
    let outs = run_kernel(op, &mut ins, op.num_outputs())?;
    Ok(outs
        .into_iter()
        .map(|t| Arc::try_unwrap(t).unwrap_or_else(|t| (*t).clone()))
        .collect())
}

/// Runs one node's kernel on its inputs (in port order, `None` = absent).
/// Shared with the KV-cache decoder, which holds its weights as `Arc`s so
/// that a token step never copies them.
pub(crate) fn run_kernel(
    op: &Op,
    ins: &mut Ins,
    n_out: usize,
) -> std::result::Result<Vec<Arc<Tensor>>, String> {
    use elementwise as ew;
    use shape_ops as so;
    match op {
        Op::Input | Op::Weight { .. } => Err("graph boundary nodes have no kernel".into()),
        Op::Constant { value } => {
            layout::check_consistent(value)
                .map_err(|m| format!("the constant is malformed: {m}"))?;
            one(value.clone())
        }
        Op::Identity => Ok(vec![ins
            .first_mut()
            .and_then(|t| t.take())
            .ok_or("required input 0 is missing")?]),

        Op::Unary(u) => match take_unique(ins, 0) {
            Some(x) => one(ew::unary_owned(*u, x)?),
            None => one(ew::unary(*u, req(ins, 0)?)?),
        },
        Op::Binary(b) => match take_unique(ins, 0) {
            Some(a) => one(ew::binary_owned(*b, a, req(ins, 1)?)?),
            None => one(ew::binary(*b, req(ins, 0)?, req(ins, 1)?)?),
        },
        Op::Variadic(v) => {
            let xs: Vec<&Tensor> = ins.iter().flatten().map(|t| &**t).collect();
            one(ew::variadic(*v, &xs)?)
        }
        Op::Where => one(ew::where_op(req(ins, 0)?, req(ins, 1)?, req(ins, 2)?)?),
        Op::Cast { to } => {
            let x = req(ins, 0)?;
            if x.dtype == *to {
                let arc = ins[0].take().ok_or("required input 0 is missing")?;
                return Ok(vec![arc]);
            }
            one(ew::cast(x, *to)?)
        }
        Op::CumSum { exclusive, reverse } => one(ew::cumsum(
            req(ins, 0)?,
            req(ins, 1)?,
            *exclusive,
            *reverse,
        )?),
        Op::Trilu { upper } => one(ew::trilu(req(ins, 0)?, opt(ins, 1), *upper)?),
        Op::ConstantOfShape { value } => one(ew::constant_of_shape(req(ins, 0)?, value.as_ref())?),
        Op::Range => one(ew::range(req(ins, 0)?, req(ins, 1)?, req(ins, 2)?)?),

        Op::Reshape { allowzero } => {
            let shape = req(ins, 1)?.clone();
            one(so::reshape(take_owned(ins, 0)?, &shape, *allowzero)?)
        }
        Op::Unsqueeze { axes } => {
            let axes = match axes {
                Some(a) => a.clone(),
                None => int_list(req(ins, 1)?, "axes")?,
            };
            one(so::unsqueeze(take_owned(ins, 0)?, &axes)?)
        }
        Op::Squeeze { axes } => {
            let axes = match (axes, opt(ins, 1)) {
                (Some(a), _) => Some(a.clone()),
                (None, Some(t)) => Some(int_list(t, "axes")?),
                (None, None) => None,
            };
            one(so::squeeze(take_owned(ins, 0)?, axes.as_deref())?)
        }
        Op::Transpose { perm } => one(so::transpose(req(ins, 0)?, perm.as_deref())?),
        Op::Concat { axis } => {
            let xs: Vec<&Tensor> = ins.iter().flatten().map(|t| &**t).collect();
            one(so::concat(&xs, *axis)?)
        }
        Op::Slice => one(so::slice(
            req(ins, 0)?,
            req(ins, 1)?,
            req(ins, 2)?,
            opt(ins, 3),
            opt(ins, 4),
        )?),
        Op::Gather { axis } => one(so::gather(req(ins, 0)?, req(ins, 1)?, *axis)?),
        Op::GatherNd { batch_dims } => one(so::gather_nd(req(ins, 0)?, req(ins, 1)?, *batch_dims)?),
        Op::Expand => one(so::expand(req(ins, 0)?, req(ins, 1)?)?),
        Op::Shape { start, end } => one(so::shape_of(req(ins, 0)?, *start, *end)),
        Op::Size => one(so::size_of(req(ins, 0)?)),
        Op::Split {
            axis,
            split,
            num_outputs,
        } => {
            let sizes = match (split, opt(ins, 1)) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(t)) => Some(int_list(t, "split")?),
                (None, None) => None,
            };
            let parts = so::split(req(ins, 0)?, *axis, sizes.as_deref(), *num_outputs)?;
            Ok(parts.into_iter().map(Arc::new).collect())
        }

        Op::MatMul => one(linalg::matmul(req(ins, 0)?, req(ins, 1)?)?),
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => one(linalg::gemm(
            req(ins, 0)?,
            req(ins, 1)?,
            opt(ins, 2),
            *alpha,
            *beta,
            *trans_a,
            *trans_b,
        )?),
        Op::Softmax { axis } => one(kernels::softmax(req(ins, 0)?, *axis, false)?),
        Op::LogSoftmax { axis } => one(kernels::softmax(req(ins, 0)?, *axis, true)?),
        Op::Reduce {
            op,
            axes,
            keepdims,
            noop_with_empty_axes,
        } => {
            // In the input form an empty axes tensor means the same as an
            // absent one.
            let axes = match (axes, opt(ins, 1)) {
                (Some(a), _) => Some(a.clone()),
                (None, Some(t)) => Some(int_list(t, "axes")?).filter(|a| !a.is_empty()),
                (None, None) => None,
            };
            one(kernels::reduce(
                req(ins, 0)?,
                *op,
                axes.as_deref(),
                *keepdims,
                *noop_with_empty_axes,
            )?)
        }
        Op::RmsNormalization {
            axis,
            epsilon,
            stash_type,
        } => one(kernels::rms_normalization(
            req(ins, 0)?,
            req(ins, 1)?,
            *axis,
            *epsilon,
            *stash_type,
        )?),
        Op::RotaryEmbedding {
            interleaved,
            num_heads,
            rotary_embedding_dim,
        } => one(kernels::rotary_embedding(
            req(ins, 0)?,
            req(ins, 1)?,
            req(ins, 2)?,
            opt(ins, 3),
            *interleaved,
            *num_heads,
            *rotary_embedding_dim,
        )?),
        Op::OnnxAttention(attrs) => {
            let outs = kernels::onnx_attention(
                req(ins, 0)?,
                req(ins, 1)?,
                req(ins, 2)?,
                opt(ins, 3),
                opt(ins, 4),
                opt(ins, 5),
                attrs,
            )?;
            if outs.len() < n_out {
                return Err(format!(
                    "the kernel produced {} outputs, the node declares {n_out}",
                    outs.len()
                ));
            }
            Ok(outs.into_iter().take(n_out).map(Arc::new).collect())
        }
        Op::Embedding => one(kernels::embedding(req(ins, 0)?, req(ins, 1)?)?),
        Op::RmsNorm { eps } => one(kernels::rms_norm(req(ins, 0)?, req(ins, 1)?, *eps)?),
        Op::Rope(attrs) => one(kernels::rope(req(ins, 0)?, opt(ins, 1), attrs)?),
        Op::Attention(attrs) => one(kernels::attention(
            req(ins, 0)?,
            req(ins, 1)?,
            req(ins, 2)?,
            attrs,
        )?),
        Op::Linear => one(kernels::linear(req(ins, 0)?, req(ins, 1)?, opt(ins, 2))?),
        Op::SwiGlu => one(kernels::swiglu(req(ins, 0)?, req(ins, 1)?)?),
        Op::LoraLinear(attrs) => one(kernels::lora_linear(
            req(ins, 0)?,
            req(ins, 1)?,
            req(ins, 2)?,
            req(ins, 3)?,
            opt(ins, 4),
            attrs.scale(),
        )?),

        Op::CrossEntropy { ignore_index } => one(kernels::cross_entropy(
            req(ins, 0)?,
            req(ins, 1)?,
            *ignore_index,
        )?),
        Op::CrossEntropyGrad { ignore_index } => one(kernels::cross_entropy_grad(
            req(ins, 0)?,
            req(ins, 1)?,
            req(ins, 2)?,
            *ignore_index,
        )?),
        Op::AttentionFwd(attrs) => {
            let (o, lse) = kernels::attention_fwd(req(ins, 0)?, req(ins, 1)?, req(ins, 2)?, attrs)?;
            Ok(vec![Arc::new(o), Arc::new(lse)])
        }
        Op::AttentionGrad(attrs) => {
            let (dq, dk, dv) = kernels::attention_grad(
                req(ins, 0)?,
                req(ins, 1)?,
                req(ins, 2)?,
                req(ins, 3)?,
                req(ins, 4)?,
                req(ins, 5)?,
                attrs,
            )?;
            Ok(vec![Arc::new(dq), Arc::new(dk), Arc::new(dv)])
        }
        Op::RmsNormGrad { eps } => {
            let (dx, dw) = kernels::rms_norm_grad(req(ins, 0)?, req(ins, 1)?, req(ins, 2)?, *eps)?;
            Ok(vec![Arc::new(dx), Arc::new(dw)])
        }
        Op::RopeGrad(attrs) => one(kernels::rope_grad(req(ins, 0)?, opt(ins, 1), attrs)?),
        Op::SwiGluGrad => {
            let (dg, du) = kernels::swiglu_grad(req(ins, 0)?, req(ins, 1)?, req(ins, 2)?)?;
            Ok(vec![Arc::new(dg), Arc::new(du)])
        }
        Op::EmbeddingGrad => one(kernels::embedding_grad(
            req(ins, 0)?,
            req(ins, 1)?,
            req(ins, 2)?,
        )?),
        Op::LinearGradWeight => one(kernels::linear_grad_weight(req(ins, 0)?, req(ins, 1)?)?),
        Op::Fused(e) => {
            let xs: Vec<&Tensor> = ins
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_deref()
                        .ok_or_else(|| format!("required input {i} is missing"))
                })
                .collect::<std::result::Result<_, _>>()?;
            one(kernels::fused(e, &xs)?)
        }
        Op::MergedLinear(m) => {
            let loras: Vec<Option<(&Tensor, &Tensor)>> = m
                .lora_ports()
                .into_iter()
                .map(|p| match p {
                    Some((a, b)) => Ok(Some((req(ins, a)?, req(ins, b)?))),
                    None => Ok(None),
                })
                .collect::<std::result::Result<_, String>>()?;
            let outs = kernels::merged_linear(m, req(ins, 0)?, req(ins, 1)?, &loras)?;
            Ok(outs.into_iter().map(Arc::new).collect())
        }
    }
}

#[cfg(test)]
mod tests;
