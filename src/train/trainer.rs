//! The training loop: rewrite the model with the pipeline, differentiate it
//! (`autodiff`), and run optimizer steps on the CPU backend, with gradient
//! accumulation, clipping, a learning-rate schedule, checkpoints that a run
//! resumes from bit for bit, and the outputs users load elsewhere (a PEFT
//! adapter, LongLoRA's trainable_params, or a whole HF model).

use super::checkpoint::{self, TrainState};
use super::config::{OptimizerKind, ScheduleName, TrainConfig};
use super::data::{self, DataOptions, Dataset, Loader, TokenWidth};
use super::metrics::{MetricsLog, StepMetrics};
use super::optim::{LrSchedule, Optimizer, OptimizerConfig, ScheduleKind};
use super::tokenizer::Tokenizer;
use crate::ir::{DType, Graph, Op, Tensor, TensorData, Weight};
use crate::passes::autodiff::{autodiff, AutodiffOptions, GradInfo};
use crate::passes::{Pipeline, RunOptions};
use crate::runtime::{self, CompileOptions, Executable, TrainStep};
use crate::util::SplitMix64;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// All steps ran.
    Completed,
    /// Stopped on request (Ctrl-C) after writing a checkpoint.
    Interrupted { step: u64 },
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Summary {
    pub finish: Finish,
    pub steps_run: u64,
    pub last_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    pub trainable_params: u64,
    pub outputs: Vec<PathBuf>,
    pub elapsed_s: f64,
}

/// What a run writes into its `--out` directory (besides other files a
/// user may keep there, which lcc leaves alone).
const RUN_OUTPUTS: &[&str] = &[
    "checkpoints",
    "metrics.jsonl",
    "run.yaml",
    "loss.svg",
    "adapter",
    "trainable_params.safetensors",
    "model",
];

/// A new run into a directory that holds another run is refused unless it
/// continues it (`--resume`, with the run's own options) or replaces it
/// (`--overwrite`). Returns the earlier run's outputs to remove.
fn check_run_dir(cfg: &TrainConfig, out: &Path) -> Result<Vec<&'static str>> {
    let yaml = out.join("run.yaml");
    if cfg.resume {
        if yaml.is_file() {
            let previous = TrainConfig::from_yaml(&yaml)?;
            let diffs = cfg.resume_differences(&previous);
            if !diffs.is_empty() {
                return Err(Error::invalid(format!(
                    "--resume: the run in {} was started with other options, and its checkpoint cannot continue under these:\n  {}\ncontinue it with its own options (lcc run-train --config {} --resume), or start a new run in another --out",
                    out.display(),
                    diffs.join("\n  "),
                    yaml.display()
                )));
            }
        }
        return Ok(Vec::new());
    }
    let present: Vec<&'static str> = RUN_OUTPUTS
        .iter()
        .copied()
        .filter(|n| out.join(n).exists())
        .filter(|n| *n != "checkpoints" || !checkpoint::list(out).is_empty())
        .collect();
    if present.is_empty() {
        return Ok(present);
    }
    if !cfg.overwrite {
        return Err(Error::invalid(format!(
            "{} holds another run ({}); continue it with --resume, replace it with --overwrite, or write to another --out",
            out.display(),
            present.join(", ")
        )));
    }
    Ok(present)
}

/// Removes an earlier run's outputs from `out` (`--overwrite`).
fn clear_run_outputs(out: &Path, present: &[&str]) -> Result<()> {
    if present.is_empty() {
        return Ok(());
    }
    for name in RUN_OUTPUTS {
        let p = out.join(name);
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else if p.exists() {
            std::fs::remove_file(&p)
        } else {
            Ok(())
        };
        removed.map_err(|e| Error::io(&p, e))?;
    }
    eprintln!(
        "note: --overwrite: removed the earlier run's {} from {}",
        present.join(", "),
        out.display()
    );
    Ok(())
}

/// Moves checkpoints newer than `step` aside as hidden `.superseded-step-N`
/// directories: a run continued from `step` replaces their future.
fn set_aside_newer(out: &Path, step: u64) -> Result<()> {
    for (s, dir) in checkpoint::list(out) {
        if s <= step {
            continue;
        }
        let mut to = checkpoint::checkpoints_dir(out).join(format!(".superseded-step-{s}"));
        let mut k = 1;
        while to.exists() {
            to = checkpoint::checkpoints_dir(out).join(format!(".superseded-step-{s}.{k}"));
            k += 1;
        }
        std::fs::rename(&dir, &to).map_err(|e| Error::io(&dir, e))?;
        eprintln!(
            "note: {} is newer than the checkpoint this run continues from; moved to {}",
            dir.display(),
            to.display()
        );
    }
    Ok(())
}

/// Loads the base model (raising an ONNX export to LLaMA-level ops) and
/// applies the pipeline (and the initial adapter/trainable weights). The
/// result is the forward graph that trains.
pub fn prepare_model(cfg: &TrainConfig) -> Result<Graph> {
    let model = cfg
        .model
        .as_deref()
        .ok_or_else(|| Error::invalid("no model given"))?;
    let mut graph = crate::model::load_noting(model, &mut |w| eprintln!("{w}"))?;
    if let Some(report) = crate::passes::ensure_llama_level(&mut graph, "run-train")? {
        eprintln!("{}", report.summary_line());
    }
    let mut pipeline = match (&cfg.pipeline, &cfg.passes) {
        (Some(p), _) => Some(Pipeline::recipe(p)?),
        (None, Some(list)) => Some(Pipeline::from_names(list)?),
        (None, None) => None,
    };
    if let Some(dir) = &cfg.init_adapter {
        // The adapter decides rank, alpha and targets: a `lora` pass in the
        // pipeline would add a second branch.
        let adapter = crate::hf::peft::load_adapter(dir)?;
        if let Some(p) = &mut pipeline {
            p.passes.retain(|s| s.name != "lora");
        }
        if let Some(p) = &pipeline {
            run_pipeline(&mut graph, p, &cfg.set, true)?;
        }
        crate::passes::lora::apply_adapter(&mut graph, &adapter.lora())?;
    } else if let Some(p) = &pipeline {
        run_pipeline(&mut graph, p, &cfg.set, false)?;
    }
    if let Some(file) = &cfg.init_trainable {
        crate::hf::peft::load_trainable(&mut graph, file)?;
    }
    Ok(graph)
}

/// What a finished run (`lcc run-train --out DIR`) brings to inference:
/// its rewrites of the base model that stay at inference (position
/// interpolation, with the run's options; S²-Attn is for training only and
/// LoRA comes back through the adapter), and its adapter and trainable
/// weights when the run wrote them.
pub struct RunOutputs {
    /// The run's `pi` pass as configured, if it had one.
    pub rewrites: Option<Pipeline>,
    pub adapter: Option<PathBuf>,
    pub trainable: Option<PathBuf>,
}

impl RunOutputs {
    /// Reads `DIR/run.yaml` and looks for `DIR/adapter/` and
    /// `DIR/trainable_params.safetensors`.
    pub fn read(dir: &Path) -> Result<RunOutputs> {
        let yaml = dir.join("run.yaml");
        if !yaml.is_file() {
            return Err(Error::invalid(format!(
                "{} is not a run-train output directory (it has no run.yaml)",
                dir.display()
            )));
        }
        let cfg = TrainConfig::from_yaml(&yaml)?;
        let mut pipeline = match (&cfg.pipeline, &cfg.passes) {
            (Some(p), _) => Pipeline::recipe(p)?,
            (None, Some(list)) => Pipeline::from_names(list)?,
            (None, None) => Pipeline { passes: Vec::new() },
        };
        for s in &cfg.set {
            pipeline.set(s)?;
        }
        pipeline.passes.retain(|s| s.name == "pi");
        let adapter = dir.join("adapter");
        let trainable = dir.join("trainable_params.safetensors");
        Ok(RunOutputs {
            rewrites: (!pipeline.passes.is_empty()).then_some(pipeline),
            adapter: adapter
                .join("adapter_config.json")
                .is_file()
                .then_some(adapter),
            trainable: trainable.is_file().then_some(trainable),
        })
    }
}

fn run_pipeline(graph: &mut Graph, p: &Pipeline, set: &[String], skip_lora: bool) -> Result<()> {
    let mut p = p.clone();
    for s in set {
        if skip_lora && s.starts_with("lora.") {
            continue;
        }
        p.set(s)?;
    }
    p.run(graph, &RunOptions::default(), |_, _| {})?;
    Ok(())
}

/// Makes every trainable weight f32 (optimizer updates in bf16 would lose
/// most small steps), updating the types of the nodes that read them.
fn trainable_to_f32(graph: &mut Graph) -> Result<()> {
    let names: Vec<String> = graph
        .weights
        .iter()
        .filter(|w| w.trainable && w.dtype != DType::F32)
        .map(|w| w.name.clone())
        .collect();
    for name in &names {
        let w = graph.weights.get(name).expect("listed above");
        let mut t = w.to_tensor()?;
        if !matches!(t.data, TensorData::F32(_)) {
            return Err(Error::invalid(format!(
                "weight '{name}' is {}; only floating-point weights can train",
                w.dtype
            )));
        }
        // f16/bf16 values are held as f32 already.
        t.dtype = DType::F32;
        graph
            .weights
            .insert(Weight::from_tensor(name.clone(), &t, true));
    }
    let nodes: Vec<_> = graph.g.node_indices().collect();
    for n in nodes {
        let is_listed = matches!(&graph.node(n).op, Op::Weight { name } if names.contains(name));
        if is_listed {
            if let Some(ty) = graph.node_mut(n).outputs[0].ty.as_mut() {
                ty.dtype = DType::F32;
            }
        }
    }
    Ok(())
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    out: PathBuf,
    /// The rewritten forward graph, for writing results.
    forward: Graph,
    /// The training graph, compiled: owns the weights and applies the
    /// optimizer where they live.
    session: Box<dyn Executable>,
    info: GradInfo,
    /// Element counts of the trainable weights, in `info.grads` order.
    sizes: Vec<usize>,
    dataset: Dataset,
    loader: Loader,
    optimizer: Optimizer,
    schedule: LrSchedule,
    rng: SplitMix64,
    metrics: MetricsLog,
    /// Optimizer steps done.
    step: u64,
    /// Training time of earlier sessions of this run (resume).
    elapsed_before: f64,
    /// Forward graph with the loss, for validation (built on first use).
    valid_session: Option<Box<dyn Executable>>,
    pub tokenizer: Tokenizer,
}

impl Trainer {
    /// Prepares a run: model, graph, data, optimizer; resumes from the
    /// newest checkpoint in `out` when `cfg.resume`.
    pub fn new(cfg: TrainConfig) -> Result<Trainer> {
        cfg.validate()?;
        if cfg.device != super::config::DeviceKind::Cpu {
            return Err(Error::invalid(
                "--device cuda: the CUDA backend is not built yet; train with --device cpu",
            ));
        }
        let out = cfg.out.clone().expect("validated");
        let replaced = check_run_dir(&cfg, &out)?;
        let mut forward = prepare_model(&cfg)?;
        trainable_to_f32(&mut forward)?;
        for n in forward.g.node_weights() {
            if let Op::LoraLinear(a) = &n.op {
                if a.dropout != 0.0 {
                    return Err(Error::invalid(format!(
                        "LoRA dropout {} is not supported in training yet; set lora.dropout=0",
                        a.dropout
                    )));
                }
            }
        }
        let mut train_graph = forward.clone();
        let info = autodiff(
            &mut train_graph,
            &AutodiffOptions {
                ignore_index: cfg.ignore_index,
            },
        )?;
        if info.grads.is_empty() {
            return Err(Error::invalid(
                "no weight is trainable: add lora and/or trainable passes (e.g. --pipeline longlora-train, or --passes trainable --set 'trainable.patterns=[\"*\"]' for full fine-tuning)",
            ));
        }
        let session = runtime::backend(runtime::Device::Cpu, cfg.threads)?
            .compile(&train_graph, &training_options(&cfg))?;
        drop(train_graph);
        let mut sizes = Vec::with_capacity(info.grads.len());
        for (w, _) in &info.grads {
            let t = session
                .weight(w)
                .map_err(|_| Error::invalid(format!("trainable weight '{w}' is missing")))?;
            sizes.push(t.numel());
        }

        let model_dir = cfg.model.as_deref().filter(|p| p.is_dir());
        let (vocab, eos) = vocab_and_eos(&forward);
        let tokenizer = Tokenizer::for_model(model_dir, vocab, eos)?;
        let dataset = data::load(
            &cfg.data,
            &cfg.valid_data,
            &tokenizer,
            &DataOptions {
                seq_len: cfg.seq_len,
                valid_fraction: cfg.valid_fraction,
                seed: cfg.seed,
                token_width: if cfg.token_bits == 32 {
                    TokenWidth::U32
                } else {
                    TokenWidth::U16
                },
                vocab_size: vocab,
            },
        )?;
        if cfg.batch_size > dataset.train.len() {
            return Err(Error::invalid(format!(
                "--batch-size {} is more rows than the training data has ({} rows of {} tokens); lower --batch-size or --seq-len, or add data",
                cfg.batch_size,
                dataset.train.len(),
                cfg.seq_len
            )));
        }
        let loader = Loader::new(dataset.train.clone(), cfg.seed, true)?;

        let opt_cfg = match cfg.optimizer {
            OptimizerKind::AdamW => OptimizerConfig::AdamW {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
            },
        };
        let named: Vec<(String, usize)> = info
            .grads
            .iter()
            .zip(&sizes)
            .map(|((w, _), &n)| (w.clone(), n))
            .collect();
        let optimizer = Optimizer::new(opt_cfg, &named);
        let schedule = LrSchedule {
            kind: match cfg.schedule {
                ScheduleName::Constant => ScheduleKind::Constant,
                ScheduleName::Cosine => ScheduleKind::Cosine,
                ScheduleName::Linear => ScheduleKind::Linear,
            },
            base_lr: cfg.lr as f32,
            warmup_steps: cfg.warmup,
            total_steps: cfg.steps,
        };
        // Only now, with the model, data and optimizer ready, is the earlier
        // run removed (--overwrite).
        clear_run_outputs(&out, &replaced)?;
        std::fs::create_dir_all(&out)
            .map_err(|e| Error::invalid(format!("cannot create {}: {e}", out.display())))?;
        let metrics_path = out.join("metrics.jsonl");
        let metrics = if cfg.resume {
            // Truncated to the checkpoint's step in `resume`.
            MetricsLog::resume(&metrics_path, u64::MAX)?
        } else {
            MetricsLog::create(&metrics_path)?
        };
        let mut trainer = Trainer {
            rng: SplitMix64::new(cfg.seed),
            cfg,
            out,
            forward,
            session,
            info,
            sizes,
            dataset,
            loader,
            optimizer,
            schedule,
            metrics,
            step: 0,
            elapsed_before: 0.0,
            valid_session: None,
            tokenizer,
        };
        if trainer.cfg.resume {
            trainer.resume()?;
        }
        let yaml = trainer.cfg.to_yaml()?;
        std::fs::write(trainer.out.join("run.yaml"), yaml).map_err(|e| {
            Error::invalid(format!(
                "cannot write {}: {e}",
                trainer.out.join("run.yaml").display()
            ))
        })?;
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Trainable parameters (elements).
    pub fn trainable_params(&self) -> u64 {
        self.sizes.iter().map(|&n| n as u64).sum()
    }

    /// Rows of training and validation data.
    pub fn data_rows(&self) -> (usize, usize) {
        (self.dataset.train.len(), self.dataset.valid.len())
    }

    /// The rewritten forward graph (with the weights of the last
    /// [`Trainer::sync_forward`]).
    pub fn forward(&self) -> &Graph {
        &self.forward
    }

    /// The checkpoint to continue from: `--resume-from`'s, else the newest
    /// intact one (a damaged newer one is named and passed over). Newer
    /// checkpoints than the chosen one are moved aside (hidden, kept), so
    /// that cleanup never mixes them with the continued run's.
    fn pick_checkpoint(&self) -> Result<checkpoint::Checkpoint> {
        let all = checkpoint::list(&self.out);
        let available = || {
            all.iter()
                .map(|(s, _)| format!("step-{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let candidates: Vec<(u64, PathBuf)> = match &self.cfg.resume_from {
            Some(name) => {
                let step = name
                    .strip_prefix("step-")
                    .unwrap_or(name)
                    .parse::<u64>()
                    .ok()
                    .and_then(|s| all.iter().find(|(n, _)| *n == s).cloned());
                match step {
                    Some(c) => vec![c],
                    None => {
                        return Err(Error::invalid(format!(
                            "--resume-from {name}: no such checkpoint in {} (there are: {})",
                            checkpoint::checkpoints_dir(&self.out).display(),
                            if all.is_empty() {
                                "none".into()
                            } else {
                                available()
                            }
                        )))
                    }
                }
            }
            None => all.iter().rev().cloned().collect(),
        };
        if candidates.is_empty() {
            return Err(Error::invalid(format!(
                "--resume: no checkpoint in {}; start without --resume",
                checkpoint::checkpoints_dir(&self.out).display()
            )));
        }
        let mut damaged = Vec::new();
        for (step, dir) in candidates {
            let loaded = checkpoint::load(&dir).and_then(|ck| {
                if ck.state.step != step {
                    return Err(Error::format(
                        dir.join(checkpoint::STATE_FILE),
                        format!(
                            "records step {} but is the checkpoint of step {step}",
                            ck.state.step
                        ),
                    ));
                }
                Ok(ck)
            });
            match loaded {
                Ok(ck) => {
                    if ck.state.step > self.cfg.steps {
                        return Err(Error::invalid(format!(
                            "--resume: the checkpoint {} is at step {}, past --steps {}; raise --steps to train further",
                            dir.display(),
                            ck.state.step,
                            self.cfg.steps
                        )));
                    }
                    for (msg, _) in &damaged {
                        eprintln!("note: {msg}");
                    }
                    if !damaged.is_empty() {
                        eprintln!(
                            "note: resuming from the newest intact checkpoint, {}",
                            dir.display()
                        );
                    }
                    set_aside_newer(&self.out, step)?;
                    return Ok(ck);
                }
                Err(e) if self.cfg.resume_from.is_none() => {
                    damaged.push((format!("checkpoint {} is damaged: {e}", dir.display()), dir));
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::invalid(format!(
            "--resume: every checkpoint in {} is damaged ({}); start again with --overwrite",
            checkpoint::checkpoints_dir(&self.out).display(),
            damaged
                .iter()
                .map(|(m, _)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }

    fn resume(&mut self) -> Result<()> {
        let ck = self.pick_checkpoint()?;
        let dir = ck.dir.clone();
        for (name, t) in &ck.trainable {
            self.session
                .set_weight(name, t.clone())
                .map_err(|e| Error::invalid(format!("{}: {e}", dir.display())))?;
        }
        let opt: HashMap<String, Tensor> = ck.optimizer.into_iter().collect();
        self.optimizer.load_state(&opt, ck.state.optimizer_steps)?;
        self.loader = Loader::restore(
            self.dataset.train.clone(),
            self.cfg.seed,
            true,
            &ck.state.loader,
        )?;
        self.rng = SplitMix64::new(ck.state.rng_state);
        self.step = ck.state.step;
        self.elapsed_before = ck
            .state
            .extra
            .get("elapsed_s")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        self.metrics = MetricsLog::resume(&self.out.join("metrics.jsonl"), ck.state.step)?;
        Ok(())
    }

    /// Writes a checkpoint for the current step.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let mut weights = Vec::with_capacity(self.info.grads.len());
        for (w, _) in &self.info.grads {
            weights.push((w.clone(), self.session.weight(w)?));
        }
        let state = TrainState {
            step: self.step,
            loader: self.loader.state(),
            rng_state: self.rng.state,
            optimizer_steps: self.optimizer.steps(),
            extra: serde_json::json!({ "elapsed_s": self.elapsed_before }),
        };
        let dir = checkpoint::save(&self.out, &state, &weights, &self.optimizer.state_tensors())?;
        if self.cfg.keep_checkpoints > 0 {
            checkpoint::keep_last(&self.out, self.cfg.keep_checkpoints)?;
        }
        Ok(dir)
    }

    /// One optimizer step: `grad_accum` micro-batches, clipping, update,
    /// all done by the executable where the weights live.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let k = self.cfg.grad_accum;
        let step_no = self.step + 1;
        let batches: Vec<HashMap<String, Tensor>> = (0..k)
            .map(|_| {
                let ids = self.loader.next_batch(self.cfg.batch_size);
                HashMap::from([
                    ("labels".to_string(), ids.clone()),
                    ("input_ids".to_string(), ids),
                ])
            })
            .collect();
        let lr = self.schedule.lr_at(self.step);
        let outcome = self.session.train_step(
            &TrainStep {
                batches: &batches,
                loss: &self.info.loss,
                params: &self.info.grads,
                max_grad_norm: self.cfg.max_grad_norm as f32,
                lr,
            },
            &mut self.optimizer,
        )?;
        if let Some(&bad) = outcome.losses.iter().find(|l| !l.is_finite()) {
            return Err(nonfinite(step_no, "loss", bad, &self.out));
        }
        let grad_norm = outcome.grad_norm;
        if !outcome.applied {
            return Err(nonfinite(
                step_no,
                "gradient norm",
                grad_norm as f64,
                &self.out,
            ));
        }
        let loss = outcome.mean_loss();
        self.step = step_no;
        let step_time = start.elapsed().as_secs_f64();
        self.elapsed_before += step_time;
        let tokens = (self.cfg.batch_size * k * self.cfg.seq_len) as f64;
        let m = StepMetrics {
            step: self.step,
            loss,
            lr: lr as f64,
            grad_norm: grad_norm as f64,
            step_time_s: step_time,
            tokens_per_s: tokens / step_time.max(1e-9),
            elapsed_s: self.elapsed_before,
        };
        self.metrics.append(&m)?;
        Ok(m)
    }

    /// Mean loss over the validation rows (or `eval_batches` batches of
    /// them), with the current weights; `None` without validation data.
    pub fn validation_loss(&mut self) -> Result<Option<f64>> {
        let rows = self.dataset.valid.len();
        if rows == 0 {
            return Ok(None);
        }
        if self.valid_session.is_none() {
            let g = loss_graph(&self.forward, self.cfg.ignore_index)?;
            self.valid_session = Some(
                runtime::backend(runtime::Device::Cpu, self.cfg.threads)?
                    .compile(&g, &training_options(&self.cfg))?,
            );
        }
        let names: Vec<String> = self.info.grads.iter().map(|(w, _)| w.clone()).collect();
        let vs = self.valid_session.as_mut().expect("built above");
        for name in &names {
            vs.set_weight(name, self.session.weight(name)?)?;
        }
        let b = self.cfg.batch_size.max(1);
        let batches = rows.div_ceil(b);
        let batches = match self.cfg.eval_batches {
            0 => batches,
            n => batches.min(n),
        };
        let mut total = 0f64;
        let mut count = 0usize;
        for i in 0..batches {
            let lo = i * b;
            let hi = (lo + b).min(rows);
            let idx: Vec<usize> = (lo..hi).collect();
            let ids = self.dataset.valid.batch(&idx);
            let mut inputs = HashMap::with_capacity(2);
            inputs.insert("labels".to_string(), ids.clone());
            inputs.insert("input_ids".to_string(), ids);
            let outs = vs.run(&inputs)?;
            total += scalar(&outs, "loss")? * (hi - lo) as f64;
            count += hi - lo;
        }
        Ok(Some(total / count.max(1) as f64))
    }

    /// Copies the trained weights into the forward graph.
    pub fn sync_forward(&mut self) -> Result<&Graph> {
        for (name, _) in &self.info.grads {
            let t = self.session.weight(name)?;
            self.forward
                .weights
                .insert(Weight::from_tensor(name.clone(), &t, true));
        }
        Ok(&self.forward)
    }

    /// Writes what users load: `adapter/` (PEFT) when the graph has LoRA
    /// branches, `trainable_params.safetensors` (embedding and norms, HF
    /// names) when those train, or `model/` (a whole HF dir) when every
    /// weight trained; plus `loss.svg`.
    pub fn write_outputs(&mut self) -> Result<Vec<PathBuf>> {
        let out = self.out.clone();
        let save_dtype = self.cfg.save_dtype.clone();
        let base_dtypes: HashMap<String, DType> =
            crate::model::load(self.cfg.model.as_deref().expect("validated"))
                .map(|g| {
                    g.weights
                        .iter()
                        .map(|w| (w.name.clone(), w.dtype))
                        .collect()
                })
                .unwrap_or_default();
        let graph = self.sync_forward()?.clone();
        let mut written = Vec::new();
        let has_lora = graph
            .g
            .node_weights()
            .any(|n| matches!(n.op, Op::LoraLinear(_)));
        let all_trainable = graph.weights.iter().all(|w| w.trainable);
        if has_lora {
            let dir = out.join("adapter");
            crate::hf::peft::save_adapter(&graph, &dir)?;
            written.push(dir);
        }
        if all_trainable && !has_lora {
            let mut g = graph.clone();
            let target = match save_dtype.as_deref() {
                None => None,
                Some(s) => Some(parse_dtype(s)?),
            };
            let names: Vec<String> = g.weights.iter().map(|w| w.name.clone()).collect();
            for name in names {
                let w = g.weights.get(&name).expect("listed");
                let dt = target
                    .or(base_dtypes.get(&name).copied())
                    .unwrap_or(w.dtype);
                if dt != w.dtype {
                    let mut t = w.to_tensor()?;
                    t.dtype = dt;
                    g.weights.insert(Weight::from_tensor(name, &t, false));
                } else {
                    let mut w = w.clone();
                    w.trainable = false;
                    g.weights.insert(w);
                }
            }
            if let Some(dt) = target {
                super::init::set_config_dtype(&mut g, dt)?;
            }
            let dir = out.join("model");
            crate::hf::save(&g, &dir)?;
            written.push(dir);
        } else if graph
            .weights
            .iter()
            .any(|w| w.trainable && !crate::ir::lora::is_lora_weight(&w.name))
        {
            let file = out.join("trainable_params.safetensors");
            crate::hf::peft::save_trainable(&graph, &file)?;
            written.push(file);
        }
        let svg = out.join("loss.svg");
        super::metrics::plot_loss(&out.join("metrics.jsonl"), &svg)?;
        written.push(svg);
        Ok(written)
    }

    /// Runs the remaining steps. `stop` is polled between steps (Ctrl-C);
    /// `on_step` sees each step's metrics (progress display).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&StepMetrics, &Trainer),
    ) -> Result<Summary> {
        let start = Instant::now();
        let first = self.step;
        let mut last_loss = None;
        let mut valid_loss = None;
        let mut finish = Finish::Completed;
        while self.step < self.cfg.steps {
            if stop.load(Ordering::SeqCst) {
                self.save_checkpoint()?;
                finish = Finish::Interrupted { step: self.step };
                break;
            }
            let m = self.train_step()?;
            last_loss = Some(m.loss);
            on_step(&m, self);
            let every = self.cfg.save_every;
            if every > 0 && self.step % every == 0 && self.step < self.cfg.steps {
                self.save_checkpoint()?;
            }
            let every = self.cfg.eval_every;
            if every > 0 && self.step % every == 0 && self.step < self.cfg.steps {
                valid_loss = self.validation_loss()?;
            }
        }
        if finish == Finish::Completed {
            self.save_checkpoint()?;
            valid_loss = self.validation_loss()?;
        }
        let outputs = self.write_outputs()?;
        Ok(Summary {
            finish,
            steps_run: self.step - first,
            last_loss,
            valid_loss,
            trainable_params: self.trainable_params(),
            outputs,
            elapsed_s: start.elapsed().as_secs_f64(),
        })
    }
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::invalid(format!(
            "save_dtype '{other}': expected f32, bf16 or f16"
        ))),
    }
}

/// A training graph's compile options: trainable weights stay f32 masters.
fn training_options(cfg: &TrainConfig) -> CompileOptions {
    CompileOptions {
        compute: cfg.compute_dtype.compute(),
        training: true,
    }
}

fn scalar(outs: &HashMap<String, Tensor>, name: &str) -> Result<f64> {
    outs.get(name)
        .and_then(|t| t.to_f64_vec().first().copied())
        .ok_or_else(|| Error::invalid(format!("the graph computed no '{name}'")))
}

fn nonfinite(step: u64, what: &str, value: f64, out: &Path) -> Error {
    let last = checkpoint::latest(out);
    Error::invalid(format!(
        "step {step}: the {what} is {value}; stopping before applying it. {}",
        match last {
            Some(dir) => format!(
                "The last good checkpoint is {} (lower --lr or set --max-grad-norm, then --resume)",
                dir.display()
            ),
            None => "No checkpoint was written yet (lower --lr or set --max-grad-norm)".into(),
        }
    ))
}

/// The vocabulary size and EOS id of a LLaMA graph (from its embedding and
/// hf.config).
pub fn vocab_and_eos(graph: &Graph) -> (usize, Option<u32>) {
    let vocab = graph
        .weights
        .iter()
        .find(|w| w.name.ends_with("embed_tokens.weight"))
        .map(|w| w.shape[0])
        .unwrap_or(0);
    let eos = graph
        .meta
        .prop(crate::ir::CONFIG_PROP)
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .and_then(|v| v.get("eos_token_id").and_then(|e| e.as_u64()))
        .map(|e| e as u32);
    (vocab, eos)
}

/// The forward graph with a `labels` input and the mean next-token loss
/// as its only output (validation and perplexity).
pub fn loss_graph(forward: &Graph, ignore_index: i64) -> Result<Graph> {
    let mut g = forward.clone();
    let logits = g
        .outputs
        .iter()
        .find(|(n, _)| n == "logits")
        .map(|(_, v)| *v)
        .ok_or_else(|| Error::invalid("the model has no 'logits' output"))?;
    let ids_ty = g
        .inputs
        .iter()
        .map(|&i| &g.node(i).outputs[0])
        .find(|o| o.name == "input_ids")
        .and_then(|o| o.ty.clone())
        .ok_or_else(|| Error::invalid("the model has no 'input_ids' input"))?;
    let labels = g.add_input("labels", ids_ty);
    let loss = g.add(
        "loss",
        Op::CrossEntropy { ignore_index },
        &[logits, labels],
        Some(crate::ir::TensorType::fixed(DType::F32, &[])),
    )?;
    g.outputs = vec![("loss".to_string(), loss)];
    g.remove_dead();
    Ok(g)
}
