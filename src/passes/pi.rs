//! `pi`: position interpolation and the other RoPE scalings (transformers'
//! `linear`, `dynamic`, `yarn`, `llama3`). Every LLaMA-level `Rope` gets the
//! new scaling; nothing else in the graph changes.
//!
//! ```text
//! before:  %5 = Rope{heads=4, head_dim=16, theta=10000.0}(%4)
//! after:   %5 = Rope{heads=4, head_dim=16, theta=10000.0, scaling=linear, factor=8.0}(%4)
//! ```
//!
//! Options (transformers' names): `scaling` (`linear` by default, `dynamic`,
//! `yarn`, `llama3`), `factor` or `target_len` (one of them),
//! `original_max_position_embeddings`, `low_freq_factor` (1) and
//! `high_freq_factor` (4) for llama3, `beta_fast` (32), `beta_slow` (1) and
//! `attention_factor` (transformers' default when absent) for yarn.
//!
//! # Lengths and composition
//!
//! The model's *original* length is its pretraining context: the
//! `original_max_position_embeddings` option if given, else the one an
//! existing dynamic/yarn/llama3 scaling records, else the `hf.config`
//! property's `max_position_embeddings` (only when the config records it:
//! a torch ONNX export raised by `raise` does not, and lcc never assumes
//! transformers' default of 2048 here) divided by an existing linear factor
//! (lcc records a linearly scaled model as transformers and LongLoRA's
//! released checkpoints do: `max_position_embeddings` = original · factor).
//! A config that left `max_position_embeddings` at the pretraining length
//! after linear scaling (LongLoRA's training scripts do) needs the option.
//!
//! The new scaling's factor is always the *total* factor relative to the
//! original model:
//! - `target_len: T` sets it to T / original. A 4k model already scaled
//!   linearly by 2 (config: 8192, linear 2) rewritten with `target_len:
//!   32768` gets factor 8, not 4 (= 32768 / 8192, LongLoRA's scripts) nor
//!   4 · 2.
//! - `factor: f` extends the model as it is: total = f · (existing factor),
//!   so `factor: 4` on that same model also gives 8.
//!
//! Running the pass again with the same `target_len` changes nothing and
//! says so. The `hf.config` property, if present, is updated so that an HF
//! export records the new scaling (`rope_scaling` / `rope_parameters`, in
//! the form the config was read in) and `max_position_embeddings` =
//! original · factor; for `dynamic` it stays at the original length, which
//! is where transformers' dynamic NTK reads the pretraining length from.

use super::{Pass, Report};
use crate::ir::{Graph, LlamaConfig, Op, Patch, PatchValue, RopeAttrs, RopeScaling, Value};
use crate::{Error, Result};
use serde::Deserialize;

const NAME: &str = "pi";

/// Which RoPE scaling to apply (transformers' `rope_type`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScalingKind {
    #[default]
    Linear,
    Dynamic,
    Yarn,
    Llama3,
}

impl ScalingKind {
    fn name(self) -> &'static str {
        match self {
            ScalingKind::Linear => "linear",
            ScalingKind::Dynamic => "dynamic",
            ScalingKind::Yarn => "yarn",
            ScalingKind::Llama3 => "llama3",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub scaling: ScalingKind,
    /// Extension relative to the model as it is (composes with an existing
    /// scaling).
    pub factor: Option<f64>,
    /// The context length wanted; factor = target_len / original length.
    pub target_len: Option<u64>,
    pub original_max_position_embeddings: Option<u64>,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub attention_factor: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scaling: ScalingKind::Linear,
            factor: None,
            target_len: None,
            original_max_position_embeddings: None,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        }
    }
}

pub struct PositionInterpolation {
    options: Options,
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("pass '{NAME}': {msg}"))
}

impl PositionInterpolation {
    /// Checks the options that need no graph.
    pub fn new(options: Options) -> Result<Self> {
        let o = &options;
        match (o.factor, o.target_len) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "give either 'factor' (relative to the model as it is) or 'target_len' (the context wanted), not both",
                ))
            }
            (None, None) => {
                return Err(bad(
                    "say how far to extend the context: 'factor' (e.g. --set pi.factor=8) or 'target_len' (e.g. --set pi.target_len=32768)",
                ))
            }
            (Some(f), None) if !(f.is_finite() && f > 0.0) => {
                return Err(bad(format!("option 'factor' must be positive, got {f}")))
            }
            (None, Some(0)) => return Err(bad("option 'target_len' must be at least 1, got 0")),
            _ => {}
        }
        if o.original_max_position_embeddings == Some(0) {
            return Err(bad(
                "option 'original_max_position_embeddings' must be at least 1, got 0",
            ));
        }
        if o.scaling == ScalingKind::Llama3
            && !(o.low_freq_factor > 0.0 && o.high_freq_factor > o.low_freq_factor)
        {
            return Err(bad(format!(
                "llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got {} and {}",
                o.low_freq_factor, o.high_freq_factor
            )));
        }
        if o.scaling == ScalingKind::Yarn {
            if !(o.beta_fast > 0.0 && o.beta_slow > 0.0) {
                return Err(bad(format!(
                    "yarn needs positive beta_fast and beta_slow, got {} and {}",
                    o.beta_fast, o.beta_slow
                )));
            }
            if let Some(a) = o.attention_factor {
                if !(a.is_finite() && a > 0.0) {
                    return Err(bad(format!(
                        "option 'attention_factor' must be positive, got {a}"
                    )));
                }
            }
        }
        Ok(PositionInterpolation { options })
    }
}

/// The factor a scaling applies and the original length it records.
fn current_factor(s: &RopeScaling) -> (f64, Option<u64>) {
    match s {
        RopeScaling::None => (1.0, None),
        RopeScaling::Linear { factor } => (*factor, None),
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: o,
        }
        | RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: o,
            ..
        }
        | RopeScaling::Llama3 {
            factor,
            original_max_position_embeddings: o,
            ..
        } => (*factor, Some(*o)),
    }
}

fn describe(s: &RopeScaling) -> String {
    let (f, _) = current_factor(s);
    match s {
        RopeScaling::None => "no scaling".into(),
        RopeScaling::Linear { .. } => format!("linear factor {f}"),
        RopeScaling::Dynamic { .. } => format!("dynamic factor {f}"),
        RopeScaling::Yarn { .. } => format!("yarn factor {f}"),
        RopeScaling::Llama3 { .. } => format!("llama3 factor {f}"),
    }
}

impl Pass for PositionInterpolation {
    fn needs_llama_level(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let o = &self.options;
        let ropes: Vec<_> = graph
            .topo_order()?
            .into_iter()
            .filter(|&n| matches!(graph.node(n).op, Op::Rope(_)))
            .collect();
        let Some(&first) = ropes.first() else {
            return Err(bad(
                "no LLaMA-level Rope op in the graph: RoPE written out in ONNX primitives (a torch export) must be raised first; run the 'raise' pass before this one (e.g. --passes raise,pi)",
            ));
        };
        let Op::Rope(base) = graph.node(first).op.clone() else {
            unreachable!("filtered on Op::Rope above")
        };
        for &n in &ropes[1..] {
            if let Op::Rope(r) = &graph.node(n).op {
                if r.scaling != base.scaling || r.theta != base.theta {
                    return Err(bad(format!(
                        "node '{}': its RoPE ({}, theta {}) differs from node '{}' ({}, theta {}); the pass rescales one RoPE shared by all layers",
                        graph.display_name(n),
                        describe(&r.scaling),
                        r.theta,
                        graph.display_name(first),
                        describe(&base.scaling),
                        base.theta
                    )));
                }
            }
        }

        let config = LlamaConfig::from_graph(graph)
            .transpose()
            .map_err(|e| bad(format!("reading the model's config: {e}")))?;
        let (old_factor, recorded_original) = current_factor(&base.scaling);
        let original = match (
            o.original_max_position_embeddings,
            recorded_original,
            &config,
        ) {
            (Some(n), _, _) => Some(n),
            (None, Some(n), _) => Some(n),
            (None, None, Some(cfg)) if cfg.records_max_position_embeddings() => {
                let n = cfg.max_position_embeddings as f64 / old_factor;
                if n.fract() != 0.0 || n < 1.0 {
                    return Err(bad(format!(
                        "the config's max_position_embeddings ({}) is not a multiple of the model's linear factor {old_factor}, so the original length is unclear; give it with 'original_max_position_embeddings'",
                        cfg.max_position_embeddings
                    )));
                }
                Some(n as u64)
            }
            _ => None,
        };
        let need_original = |why: &str| {
            bad(format!(
                "{why} needs the model's original (pretraining) context length, and the model does not record it ({}); give it: --set pi.original_max_position_embeddings=N",
                match &config {
                    Some(_) => "its config has no max_position_embeddings, and its RoPE no scaling that records one: torch's ONNX exports compute cos/sin from the positions and keep no length",
                    None => "no config and no scaling that records one",
                }
            ))
        };
        let factor = match (o.factor, o.target_len) {
            (Some(f), _) => f * old_factor,
            (None, Some(t)) => {
                let orig = original.ok_or_else(|| need_original("'target_len'"))?;
                t as f64 / orig as f64
            }
            (None, None) => unreachable!("checked in new()"),
        };
        let scaling = match o.scaling {
            ScalingKind::Linear => RopeScaling::Linear { factor },
            kind => {
                let orig =
                    original.ok_or_else(|| need_original(&format!("'{}' scaling", kind.name())))?;
                match kind {
                    ScalingKind::Dynamic => RopeScaling::Dynamic {
                        factor,
                        original_max_position_embeddings: orig,
                    },
                    ScalingKind::Yarn => RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: orig,
                        beta_fast: o.beta_fast,
                        beta_slow: o.beta_slow,
                        attention_factor: o.attention_factor,
                    },
                    _ => RopeScaling::Llama3 {
                        factor,
                        original_max_position_embeddings: orig,
                        low_freq_factor: o.low_freq_factor,
                        high_freq_factor: o.high_freq_factor,
                    },
                }
            }
        };
        let context = original.map(|n| (n as f64 * factor).round() as u64);
        let context_note = match (original, context) {
            (Some(n), Some(c)) => format!(" (original context {n}, now {c})"),
            _ => String::new(),
        };

        let mut report = Report::default();
        let new_attrs = RopeAttrs {
            scaling: scaling.clone(),
            ..base.clone()
        };
        if scaling == base.scaling {
            report.notes.push(format!(
                "already applied: every Rope has {}{context_note}; nothing changed",
                describe(&scaling)
            ));
        } else {
            let mut patch = Patch::new();
            for &n in &ropes {
                let node = graph.node(n);
                let Op::Rope(r) = &node.op else {
                    unreachable!("filtered on Op::Rope above")
                };
                let attrs = RopeAttrs {
                    scaling: scaling.clone(),
                    ..r.clone()
                };
                let inputs: Vec<Option<PatchValue>> = graph
                    .inputs_of(n)
                    .into_iter()
                    .map(|v| v.map(PatchValue::Existing))
                    .collect();
                let new = patch.add(
                    node.name.clone(),
                    Op::Rope(attrs),
                    &inputs,
                    node.outputs.clone(),
                );
                patch.replace(Value::new(n, 0), new);
            }
            let stats = graph.apply(patch)?;
            report.matched = ropes.len();
            report.nodes_added = stats.added;
            report.nodes_removed = stats.removed;
            report.notes.push(format!(
                "{} Rope ops: {} -> {}{context_note}",
                ropes.len(),
                describe(&base.scaling),
                describe(&scaling)
            ));
            if factor < 1.0 {
                report.notes.push(format!(
                    "the factor {factor} is below 1: the context shrinks"
                ));
            }
        }

        if let Some(mut cfg) = config {
            cfg.set_rope(&new_attrs);
            match (&scaling, original, context) {
                (RopeScaling::Dynamic { .. }, Some(n), _) => cfg.max_position_embeddings = n,
                (_, _, Some(c)) => cfg.max_position_embeddings = c,
                _ => {}
            }
            cfg.store_in(graph);
        }
        Ok(report)
    }
}
