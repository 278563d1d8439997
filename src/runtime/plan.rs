//! The memory plan: where every value of a run lives, from the schedule's
//! liveness and the values' inferred byte sizes under a binding of the
//! symbolic dims (`batch`, `seq`). One plan serves every backend: the CPU
//! reports it (`lcc inspect --memory`) and checks its accounting against it;
//! the CUDA backend allocates its arena from it.
//!
//! A value is live from the step that produces it to the step of its last
//! reader (graph outputs to the end); while a kernel runs, its inputs and
//! outputs coexist. Offsets are assigned greedily by size (largest first,
//! each at the lowest offset free for its whole lifetime), the heuristic of
//! TFLite's arena planner; the arena is at least the peak of live bytes and
//! usually equal to it.

use super::schedule::{Schedule, LIVE_TO_END};
use crate::ir::{DType, Graph, Op, TensorType, Value};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// Bytes per element of each dtype on a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemBytes {
    /// The dtype's own size (a device storing bf16 as bf16).
    Storage,
    /// The CPU backend's: floats of 4 bytes or fewer are held as f32, f64
    /// and every integer as 8 bytes, bool as 1.
    Cpu,
}

impl ElemBytes {
    pub fn of(self, d: DType) -> u64 {
        match self {
            ElemBytes::Storage => d.size() as u64,
            ElemBytes::Cpu => match d {
                DType::Bool => 1,
                DType::F64 => 8,
                d if d.is_float() => 4,
                _ => 8,
            },
        }
    }
}

/// One value's place in the plan.
#[derive(Clone, Debug, Serialize)]
pub struct Buffer {
    /// The producing node's display name and output slot.
    pub name: String,
    #[serde(skip)]
    pub value: Value,
    pub bytes: u64,
    /// First and last step it is live (inclusive).
    pub first: usize,
    pub last: usize,
    /// Weights stay resident outside the arena; everything else has an offset.
    pub resident: bool,
    pub offset: u64,
}

/// Where a run's memory goes.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    pub buffers: Vec<Buffer>,
    /// The arena the offsets fit in.
    pub arena_bytes: u64,
    /// The most non-resident bytes live at one step, and that step.
    pub peak_live_bytes: u64,
    pub peak_step: usize,
    /// The most bytes live at one step counting weights while they are read
    /// as values too (what the CPU executor's own accounting reports).
    pub peak_value_bytes: u64,
    /// Every weight, resident for the whole run.
    pub weight_bytes: u64,
    pub steps: usize,
}

/// Binds the symbols of the graph: the dims of `input_ids` (else of the
/// first input) are `[batch, seq]`, and so are lcc's own `batch` and `seq`.
/// A value whose size reads any other symbol is an error naming it when it
/// is planned.
pub fn bind_batch_seq(graph: &Graph, batch: usize, seq: usize) -> BTreeMap<String, usize> {
    let mut b = BTreeMap::new();
    let first = graph
        .inputs
        .iter()
        .find(|&&i| graph.node(i).outputs[0].name == "input_ids")
        .or(graph.inputs.first());
    if let Some(&i) = first {
        if let Some(dims) = graph.node(i).outputs[0].ty.as_ref().and_then(|t| t.dims()) {
            for (d, v) in dims.iter().zip([batch, seq]) {
                if let crate::ir::Dim::Sym(s) = d {
                    if !s.is_empty() {
                        b.insert(s.clone(), v);
                    }
                }
            }
        }
    }
    // The names lcc's own builders use, for graphs whose inputs say less.
    b.entry("batch".into()).or_insert(batch);
    b.entry("seq".into()).or_insert(seq);
    b
}

fn value_bytes(
    graph: &Graph,
    v: Value,
    ty: Option<&TensorType>,
    bindings: &BTreeMap<String, usize>,
    elem: ElemBytes,
) -> Result<u64> {
    let who = || {
        format!(
            "'{}' ({})",
            graph.display_name(v.node),
            graph.node(v.node).op.name()
        )
    };
    let ty = ty.ok_or_else(|| {
        Error::invalid(format!(
            "value {} output {} has no type to plan",
            who(),
            v.slot
        ))
    })?;
    let numel = ty.numel(bindings).ok_or_else(|| {
        let unbound: Vec<String> = ty
            .dims()
            .unwrap_or(&[])
            .iter()
            .filter(|d| d.eval(bindings).is_none())
            .map(|d| d.to_string())
            .collect();
        Error::invalid(format!(
            "the size of {} output {} ({ty}) is not known: {} unbound (bound: {})",
            who(),
            v.slot,
            unbound.join(", "),
            bindings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    u64::try_from(numel.saturating_mul(u128::from(elem.of(ty.dtype))))
        .map_err(|_| Error::invalid(format!("the size of {} overflows", who())))
}

/// Plans `graph` run in the order of `sched` with `bindings` for its symbols.
pub fn plan(
    graph: &Graph,
    sched: &Schedule,
    bindings: &BTreeMap<String, usize>,
    elem: ElemBytes,
) -> Result<MemoryPlan> {
    let steps = sched.len();
    let mut buffers = Vec::new();
    for (step, &n) in sched.order.iter().enumerate() {
        let node = graph.node(n);
        let resident = matches!(node.op, Op::Weight { .. });
        for (slot, o) in node.outputs.iter().enumerate() {
            let v = Value::new(n, slot);
            let last = match sched.last_use.get(&v) {
                Some(&LIVE_TO_END) | None => steps.saturating_sub(1),
                Some(&s) => s,
            };
            buffers.push(Buffer {
                name: if node.outputs.len() > 1 {
                    format!("{}:{slot}", graph.display_name(n))
                } else {
                    graph.display_name(n)
                },
                value: v,
                bytes: value_bytes(graph, v, o.ty.as_ref(), bindings, elem)?,
                first: step,
                last,
                resident,
                offset: 0,
            });
        }
    }
    // Live bytes per step by a difference array.
    let mut delta = vec![0i128; steps + 1];
    let mut delta_all = vec![0i128; steps + 1];
    for b in &buffers {
        if !b.resident {
            delta[b.first] += b.bytes as i128;
            delta[b.last + 1] -= b.bytes as i128;
        }
        delta_all[b.first] += b.bytes as i128;
        delta_all[b.last + 1] -= b.bytes as i128;
    }
    let (mut live, mut live_all) = (0i128, 0i128);
    let (mut peak, mut peak_step, mut peak_all) = (0i128, 0usize, 0i128);
    for s in 0..steps {
        live += delta[s];
        live_all += delta_all[s];
        if live > peak {
            peak = live;
            peak_step = s;
        }
        peak_all = peak_all.max(live_all);
    }
    let arena_bytes = assign_offsets(&mut buffers);
    let weight_bytes = graph
        .weights
        .iter()
        .map(|w| w.numel() as u64 * elem.of(w.dtype))
        .sum();
    Ok(MemoryPlan {
        buffers,
        arena_bytes,
        peak_live_bytes: peak as u64,
        peak_step,
        peak_value_bytes: peak_all as u64,
        weight_bytes,
        steps,
    })
}

/// Greedy by size: each buffer, largest first, at the lowest offset that no
/// placed buffer with an overlapping lifetime occupies. Returns the arena size.
fn assign_offsets(buffers: &mut [Buffer]) -> u64 {
    const ALIGN: u64 = 64;
    let mut idx: Vec<usize> = (0..buffers.len())
        .filter(|&i| !buffers[i].resident)
        .collect();
    idx.sort_by(|&a, &b| {
        buffers[b]
            .bytes
            .cmp(&buffers[a].bytes)
            .then(buffers[a].first.cmp(&buffers[b].first))
    });
    let mut placed: Vec<usize> = Vec::with_capacity(idx.len());
    let mut arena = 0u64;
    for &i in &idx {
        let (first, last) = (buffers[i].first, buffers[i].last);
        let size = buffers[i].bytes.div_ceil(ALIGN) * ALIGN;
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .map(|&j| &buffers[j])
            .filter(|b| b.first <= last && first <= b.last)
            .map(|b| (b.offset, b.offset + b.bytes.div_ceil(ALIGN) * ALIGN))
            .collect();
        busy.sort_unstable();
        let mut offset = 0u64;
        for (s, e) in busy {
            if s >= offset + size {
                break;
            }
            offset = offset.max(e);
        }
        buffers[i].offset = offset;
        arena = arena.max(offset + size);
        placed.push(i);
    }
    arena
}

/// A training step's memory, by kind, from the plan of its graph.
#[derive(Clone, Debug, Serialize)]
pub struct StepMemory {
    pub batch: usize,
    pub seq_len: usize,
    /// The model's own bytes (its mapped files, or the store's in-memory
    /// copy), read once to decode the weights; resident while mapped pages
    /// stay cached, and counted in the process's RSS.
    pub model_store_bytes: u64,
    /// Frozen weights as the backend holds them.
    pub frozen_weight_bytes: u64,
    /// Trainable weights (f32 masters).
    pub trainable_weight_bytes: u64,
    /// Gradients of the trainable weights (graph outputs, live to the end).
    pub gradient_bytes: u64,
    /// Optimizer state: AdamW's two moments per trainable element (f32).
    pub optimizer_bytes: u64,
    /// Activations and other intermediates at the peak step (gradients
    /// excluded).
    pub activation_bytes: u64,
    /// The planned arena (activations and gradients, with their offsets).
    pub arena_bytes: u64,
    /// The running process before any model is loaded (code, libraries),
    /// measured, when known.
    pub process_bytes: Option<u64>,
    /// Process + model store + weights + optimizer state + arena.
    pub total_bytes: u64,
    /// The largest buffers live at the peak step: (value, bytes).
    pub largest: Vec<(String, u64)>,
    /// The memory this machine has available, for comparison.
    pub available_bytes: Option<u64>,
}

/// The memory of one step of `graph` (a training graph when it has `grad:`
/// outputs, else a forward) under `bindings`.
pub fn step_memory(
    graph: &Graph,
    batch: usize,
    seq_len: usize,
    elem: ElemBytes,
    optimizer_states: u64,
    process_bytes: Option<u64>,
) -> Result<StepMemory> {
    let bindings = bind_batch_seq(graph, batch, seq_len);
    let sched = Schedule::new(graph)?;
    let p = plan(graph, &sched, &bindings, elem)?;
    let grads: std::collections::HashSet<Value> = graph
        .outputs
        .iter()
        .filter(|(n, _)| n.starts_with("grad:"))
        .map(|(_, v)| *v)
        .collect();
    let gradient_bytes: u64 = p
        .buffers
        .iter()
        .filter(|b| grads.contains(&b.value))
        .map(|b| b.bytes)
        .sum();
    let grads_at_peak: u64 = p
        .buffers
        .iter()
        .filter(|b| grads.contains(&b.value) && b.first <= p.peak_step)
        .map(|b| b.bytes)
        .sum();
    let (mut frozen, mut trainable, mut trainable_numel) = (0u64, 0u64, 0u64);
    for w in graph.weights.iter() {
        if w.trainable {
            trainable += w.numel() as u64 * 4;
            trainable_numel += w.numel() as u64;
        } else {
            frozen += w.numel() as u64 * elem.of(w.dtype);
        }
    }
    let optimizer_bytes = trainable_numel * 4 * optimizer_states;
    let model_store_bytes: u64 = graph.weights.iter().map(|w| w.nbytes() as u64).sum();
    let mut at_peak: Vec<(String, u64)> = p
        .buffers
        .iter()
        .filter(|b| !b.resident && b.first <= p.peak_step && p.peak_step <= b.last)
        .map(|b| (b.name.clone(), b.bytes))
        .collect();
    at_peak.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    at_peak.truncate(5);
    Ok(StepMemory {
        batch,
        seq_len,
        model_store_bytes,
        frozen_weight_bytes: frozen,
        trainable_weight_bytes: trainable,
        gradient_bytes,
        optimizer_bytes,
        activation_bytes: p.peak_live_bytes.saturating_sub(grads_at_peak),
        arena_bytes: p.arena_bytes,
        process_bytes,
        total_bytes: process_bytes.unwrap_or(0)
            + model_store_bytes
            + frozen
            + trainable
            + optimizer_bytes
            + p.arena_bytes,
        largest: at_peak,
        available_bytes: crate::memory::available_memory(),
    })
}

impl std::fmt::Display for StepMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = |b: u64| crate::util::human_bytes(b);
        writeln!(
            f,
            "planned peak of a step, batch {} × seq {}",
            self.batch, self.seq_len
        )?;
        if let Some(p) = self.process_bytes {
            writeln!(
                f,
                "  lcc process         {:>12}  (measured: code, libraries)",
                h(p)
            )?;
        }
        writeln!(
            f,
            "  model file/store    {:>12}  (read once to decode the weights)",
            h(self.model_store_bytes)
        )?;
        writeln!(
            f,
            "  frozen weights      {:>12}",
            h(self.frozen_weight_bytes)
        )?;
        writeln!(
            f,
            "  trainable weights   {:>12}",
            h(self.trainable_weight_bytes)
        )?;
        writeln!(f, "  gradients           {:>12}", h(self.gradient_bytes))?;
        writeln!(f, "  optimizer state     {:>12}", h(self.optimizer_bytes))?;
        writeln!(f, "  activations (peak)  {:>12}", h(self.activation_bytes))?;
        writeln!(f, "  arena (planned)     {:>12}", h(self.arena_bytes))?;
        writeln!(f, "  total               {:>12}", h(self.total_bytes))?;
        if let Some(a) = self.available_bytes {
            let fits = if self.total_bytes <= a {
                "fits"
            } else {
                "does not fit"
            };
            writeln!(f, "  this machine has {} available: {fits}", h(a))?;
        }
        writeln!(f, "largest values live at the peak:")?;
        for (name, b) in &self.largest {
            writeln!(f, "  {:>12}  {name}", h(*b))?;
        }
        Ok(())
    }
}
