//! `lcc bench train`: the time and memory of one training step (forward,
//! backward, AdamW) on a randomly initialised LLaMA, as the PyTorch
//! reference measures it: batch 1, LoRA r=8 (alpha 16) on q, k, v, o, only
//! the LoRA weights trainable, median over the timed steps.

use super::optim::{Optimizer, OptimizerConfig};
use crate::ir::Tensor;
use crate::passes::autodiff::{autodiff, AutodiffOptions};
use crate::passes::{Pipeline, RunOptions};
use crate::runtime::{self, CompileOptions, TrainStep};
use crate::util::SplitMix64;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// One benchmark configuration.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub seq_len: usize,
    pub batch: usize,
    /// `None`: full causal attention; `Some(g)`: S²-Attn with groups of g tokens.
    pub s2_group: Option<usize>,
    /// Also train the embedding and norms (LongLoRA's LoRA+).
    pub train_embed_norm: bool,
    pub warmup_steps: usize,
    pub steps: usize,
    pub threads: Option<usize>,
    pub seed: u64,
    /// Run the `fuse` pass after autodiff.
    pub fuse: bool,
}

impl BenchOptions {
    /// `base` at each sequence length, with full attention (false) and/or
    /// S²-Attn (true, groups of a quarter of the length) as `s2` lists:
    /// the rows of `lcc bench`'s table, in order.
    pub fn grid(base: &BenchOptions, seq_lens: &[usize], s2: &[bool]) -> Vec<BenchOptions> {
        seq_lens
            .iter()
            .flat_map(|&seq| {
                s2.iter().map(move |&s2| BenchOptions {
                    seq_len: seq,
                    s2_group: s2.then_some((seq / 4).max(1)),
                    ..base.clone()
                })
            })
            .collect()
    }
}

/// What one configuration measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub seq_len: usize,
    pub batch: usize,
    pub attention: String,
    pub steps: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub tokens_per_s: f64,
    /// Peak resident memory of the process so far (Linux VmHWM).
    pub peak_rss_mb: Option<f64>,
    pub trainable_params: u64,
    /// Where a timed step's time goes: (op, nodes per step, ms per step),
    /// slowest first; the optimizer appears as `optimizer`.
    pub profile: Vec<(String, usize, f64)>,
    /// Kernel output buffers of the last timed step taken from the
    /// session's pool, and allocated anew.
    pub buffers_reused: usize,
    pub buffers_allocated: usize,
}

/// Peak resident set size of this process in MB (Linux), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Benchmarks a training step of the model described by `config`
/// (a config.json), randomly initialised.
pub fn bench_train_step(config: &Path, opts: &BenchOptions) -> Result<BenchResult> {
    let mut graph = super::init::init_model(config, opts.seed, Some(crate::ir::DType::F32))?;
    let mut names = String::from("lora");
    let mut set = vec![
        "lora.rank=8".to_string(),
        "lora.alpha=16".to_string(),
        "lora.targets=[q,k,v,o]".to_string(),
    ];
    if let Some(g) = opts.s2_group {
        names.push_str(",s2attn");
        set.push(format!("s2attn.group_size={g}"));
    }
    if opts.train_embed_norm {
        names.push_str(",trainable");
    }
    let mut p = Pipeline::from_names(&names)?;
    for s in &set {
        p.set(s)?;
    }
    p.run(&mut graph, &RunOptions::default(), |_, _| {})?;
    let info = autodiff(&mut graph, &AutodiffOptions { ignore_index: -100 })?;
    if opts.fuse {
        crate::passes::fuse_training_graph(&mut graph)?;
    }
    let mut session = runtime::backend(runtime::Device::Cpu, opts.threads)?.compile(
        &graph,
        &CompileOptions {
            training: true,
            ..Default::default()
        },
    )?;
    drop(graph);
    let sizes: Vec<(String, usize)> = info
        .grads
        .iter()
        .map(|(n, _)| Ok((n.clone(), session.weight(n)?.numel())))
        .collect::<Result<_>>()?;
    let mut optimizer = Optimizer::new(
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &sizes,
    );
    let vocab = session
        .graph()
        .weights
        .iter()
        .find(|w| w.name.ends_with("embed_tokens.weight"))
        .map(|w| w.shape[0])
        .ok_or_else(|| Error::invalid("the model has no embedding"))?;
    let mut rng = SplitMix64::new(opts.seed);
    let ids: Vec<i64> = (0..opts.batch * opts.seq_len)
        .map(|_| rng.below(vocab as u64) as i64)
        .collect();
    let ids = Tensor::i64(vec![opts.batch, opts.seq_len], ids);
    let mut inputs = HashMap::new();
    inputs.insert("labels".to_string(), ids.clone());
    inputs.insert("input_ids".to_string(), ids);
    let mut times = Vec::with_capacity(opts.steps);
    let mut profile: BTreeMap<&'static str, (usize, f64)> = BTreeMap::new();
    let mut buffers = (0, 0);
    for i in 0..opts.warmup_steps + opts.steps {
        let start = Instant::now();
        let outcome = session.train_step(
            &TrainStep {
                batches: std::slice::from_ref(&inputs),
                loss: &info.loss,
                params: &info.grads,
                max_grad_norm: 0.0,
                lr: 1e-4,
            },
            &mut optimizer,
        )?;
        if !outcome.applied {
            return Err(Error::invalid(format!(
                "the benchmark step's loss is {:?}",
                outcome.losses
            )));
        }
        let stats = session.stats().clone();
        if i >= opts.warmup_steps {
            times.push(start.elapsed().as_secs_f64() * 1e3);
            for (op, (n, t)) in stats.op_time {
                let e = profile.entry(op).or_default();
                e.0 += n;
                e.1 += t.as_secs_f64() * 1e3;
            }
            buffers = (stats.buffers_reused, stats.buffers_allocated);
        }
    }
    let denom = times.len().max(1);
    let mut profile: Vec<(String, usize, f64)> = profile
        .into_iter()
        .map(|(op, (n, ms))| (op.to_string(), n / denom, ms / denom as f64))
        .collect();
    profile.sort_by(|a, b| b.2.total_cmp(&a.2));
    times.sort_by(f64::total_cmp);
    let median = if times.is_empty() {
        0.0
    } else if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    Ok(BenchResult {
        seq_len: opts.seq_len,
        batch: opts.batch,
        attention: match opts.s2_group {
            None => "full".into(),
            Some(g) => format!("s2 (group {g})"),
        },
        steps: times.len(),
        median_ms: median,
        min_ms: times.first().copied().unwrap_or(0.0),
        tokens_per_s: (opts.batch * opts.seq_len) as f64 / (median / 1e3).max(1e-12),
        peak_rss_mb: peak_rss_mb(),
        trainable_params: sizes.iter().map(|(_, n)| *n as u64).sum(),
        profile,
        buffers_reused: buffers.0,
        buffers_allocated: buffers.1,
    })
}
