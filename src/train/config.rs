//! The resolved configuration of a training run: defaults, then a YAML file
//! (`--config train.yaml`), then the command line, each overriding the one
//! before. The resolved result is written to `OUT/run.yaml`, so a run can be
//! repeated with `lcc run-train --config OUT/run.yaml`.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which optimizer updates the trainable weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    AdamW,
    Sgd,
}

/// How the learning rate moves over the run (after linear warmup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleName {
    /// Constant after warmup (LongLoRA's `constant_with_warmup`).
    Constant,
    /// Cosine decay to 0 at the last step.
    Cosine,
    /// Linear decay to 0 at the last step.
    Linear,
}

/// Where the run computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The dtype a run computes activations in (see
/// [`crate::runtime::ComputeDType`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDTypeName {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ComputeDTypeName {
    pub fn parse(text: &str) -> Result<ComputeDTypeName> {
        Ok(match text {
            "f32" | "float32" => ComputeDTypeName::F32,
            "bf16" | "bfloat16" => ComputeDTypeName::Bf16,
            "f16" | "float16" => ComputeDTypeName::F16,
            other => {
                return Err(Error::invalid(format!(
                    "--compute-dtype {other}: expected f32, bf16 or f16"
                )))
            }
        })
    }

    pub fn compute(self) -> crate::runtime::ComputeDType {
        use crate::ir::DType;
        let d = match self {
            ComputeDTypeName::F32 => DType::F32,
            ComputeDTypeName::Bf16 => DType::BF16,
            ComputeDTypeName::F16 => DType::F16,
        };
        crate::runtime::ComputeDType::new(d).expect("a floating dtype")
    }
}

/// Every option of `lcc run-train`. Field docs are the `--help` texts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The base model: a Hugging Face dir or an ONNX file.
    pub model: Option<PathBuf>,
    /// A pipeline recipe (YAML path, or the name of one in passes/).
    pub pipeline: Option<String>,
    /// Passes by name instead of a recipe (e.g. pi,s2attn,lora,trainable).
    pub passes: Option<String>,
    /// Pass options, `pass.option=value`.
    pub set: Vec<String>,
    /// Training data: text files or dirs, .bin token files, or a
    /// safetensors file with `input_ids`.
    pub data: Vec<PathBuf>,
    /// Validation data (same kinds); when empty, `valid_fraction` of the
    /// training rows is held out.
    pub valid_data: Vec<PathBuf>,
    pub valid_fraction: f64,
    /// Width of .bin token files: 16 or 32 bits.
    pub token_bits: u32,
    pub seq_len: usize,
    /// Optimizer steps.
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    pub schedule: ScheduleName,
    pub optimizer: OptimizerKind,
    pub beta1: f64,
    /// AdamW β2. The LongLoRA paper states 0.95; its released code used
    /// 0.999. lcc follows the paper.
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Start from an existing PEFT adapter (its rank, alpha and targets).
    pub init_adapter: Option<PathBuf>,
    /// Start from trainable weights (LongLoRA's trainable_params.safetensors).
    pub init_trainable: Option<PathBuf>,
    pub seed: u64,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Write a checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    /// How many checkpoints to keep (0: all).
    pub keep_checkpoints: usize,
    /// Compute the validation loss every N steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (0: all validation rows).
    pub eval_batches: usize,
    pub device: DeviceKind,
    /// dtype of activations: f32 (default, whatever the weights' dtype) or
    /// bf16/f16 (frozen weights rounded to it, activations rounded after
    /// each op).
    pub compute_dtype: ComputeDTypeName,
    /// Output directory.
    pub out: Option<PathBuf>,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// With `resume`: continue from this checkpoint (`step-N`) instead of
    /// the newest one. A command-line action, not written to run.yaml.
    #[serde(skip)]
    pub resume_from: Option<String>,
    /// Replace the run already in `out` (its checkpoints, metrics and
    /// outputs). A command-line action, not written to run.yaml.
    #[serde(skip)]
    pub overwrite: bool,
    /// Label id that is not scored.
    pub ignore_index: i64,
    /// dtype of a fully fine-tuned model written to OUT/model (default: the
    /// base model's).
    pub save_dtype: Option<String>,
    /// Print a log line every N steps when stdout is not a terminal.
    pub log_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            pipeline: None,
            passes: None,
            set: Vec::new(),
            data: Vec::new(),
            valid_data: Vec::new(),
            valid_fraction: 0.01,
            token_bits: 16,
            seq_len: 0,
            steps: 0,
            batch_size: 1,
            grad_accum: 1,
            lr: 2e-5,
            warmup: 20,
            schedule: ScheduleName::Constant,
            optimizer: OptimizerKind::AdamW,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            max_grad_norm: 1.0,
            init_adapter: None,
            init_trainable: None,
            seed: 42,
            threads: None,
            save_every: 0,
            keep_checkpoints: 2,
            eval_every: 0,
            eval_batches: 8,
            device: DeviceKind::Cpu,
            compute_dtype: ComputeDTypeName::F32,
            out: None,
            resume: false,
            resume_from: None,
            overwrite: false,
            ignore_index: -100,
            save_dtype: None,
            log_every: 10,
        }
    }
}

impl TrainConfig {
    /// Reads a YAML config; unknown keys are errors (a typo must not be
    /// silently ignored).
    pub fn from_yaml(path: &Path) -> Result<TrainConfig> {
        let text = crate::util::read_text_capped(path, crate::util::MAX_TEXT_BYTES)?;
        Self::from_yaml_str(&text, path)
    }

    /// Parses YAML text read from `path` (named in errors).
    pub fn from_yaml_str(text: &str, path: &Path) -> Result<TrainConfig> {
        serde_saphyr::from_str(text).map_err(|e| {
            Error::invalid(format!(
                "{}: not a valid training config: {e}",
                path.display()
            ))
        })
    }

    pub fn to_yaml(&self) -> Result<String> {
        serde_saphyr::to_string(self)
            .map_err(|e| Error::invalid(format!("cannot write the config as YAML: {e}")))
    }

    /// The options a resumed run must share with the run it continues (the
    /// checkpoint's optimizer state, loader position and trainable weights
    /// mean nothing under others). Steps, logging, checkpointing and the
    /// learning rate may change.
    pub const RESUME_FIXED: &'static [&'static str] = &[
        "model",
        "pipeline",
        "passes",
        "set",
        "data",
        "valid_data",
        "valid_fraction",
        "token_bits",
        "seq_len",
        "batch_size",
        "grad_accum",
        "optimizer",
        "seed",
        "compute_dtype",
        "ignore_index",
        "init_adapter",
        "init_trainable",
    ];

    /// The options in [`Self::RESUME_FIXED`] that differ from `previous`'s,
    /// one line each: `option: was X, now Y`.
    pub fn resume_differences(&self, previous: &TrainConfig) -> Vec<String> {
        let (now, was) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(previous).unwrap_or_default(),
        );
        Self::RESUME_FIXED
            .iter()
            .filter(|k| now.get(**k) != was.get(**k))
            .map(|k| {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or("(none)".to_string(), |v| v.to_string())
                };
                format!("{k}: was {}, now {}", show(was.get(*k)), show(now.get(*k)))
            })
            .collect()
    }

    /// Checks the values that have no sensible default and the ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.model.is_none() {
            return bad("no model: pass --model DIR (a Hugging Face dir or .onnx)".into());
        }
        if self.data.is_empty() {
            return bad("no training data: pass --data PATH (text files or dirs, .bin tokens, or a safetensors file with input_ids)".into());
        }
        if self.out.is_none() {
            return bad("no output directory: pass --out DIR".into());
        }
        if self.seq_len < 2 {
            return bad(format!(
                "--seq-len must be at least 2 (got {})",
                self.seq_len
            ));
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("--batch-size and --grad-accum must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!(
                "--lr must be a non-negative number (got {})",
                self.lr
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!(
                "AdamW betas must lie in [0, 1) (got {}, {})",
                self.beta1, self.beta2
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!(
                "--eps must be positive (AdamW divides by sqrt(v) + eps), got {}",
                self.eps
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be ≥ 0, got {}",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!(
                "--momentum must lie in [0, 1), got {}",
                self.momentum
            ));
        }
        if let Some(n) = self.threads {
            crate::util::check_threads(n)?;
        }
        if self.max_grad_norm < 0.0 || !self.max_grad_norm.is_finite() {
            return bad(format!(
                "--max-grad-norm must be ≥ 0 (0 = off), got {}",
                self.max_grad_norm
            ));
        }
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return bad(format!(
                "valid_fraction must lie in [0, 1) (got {})",
                self.valid_fraction
            ));
        }
        if self.token_bits != 16 && self.token_bits != 32 {
            return bad(format!(
                "token_bits must be 16 or 32 (got {})",
                self.token_bits
            ));
        }
        if self.resume && self.overwrite {
            return bad(
                "--resume continues the run in --out and --overwrite replaces it: give one".into(),
            );
        }
        if self.resume_from.is_some() && !self.resume {
            return bad("--resume-from goes with --resume".into());
        }
        if self.pipeline.is_some() && self.passes.is_some() {
            return bad("give either --pipeline or --passes, not both".into());
        }
        Ok(())
    }
}
