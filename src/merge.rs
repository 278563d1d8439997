//! `lcc merge`: folds what a fine-tuning run trained into its base model, so
//! that the result is an ordinary checkpoint.
//!
//! - [`merge`]: a PEFT adapter (and LongLoRA's trainable embedding and norm
//!   weights) onto a base model.
//! - [`merge_run`]: LongLoRA's release step for a `run-train --out` directory:
//!   the run's position interpolation (from its `run.yaml`), its adapter and
//!   its trainable weights, merged. The graph's `hf.config` then records
//!   `rope_scaling` and `max_position_embeddings`, so a Hugging Face export
//!   loads in transformers with no further edits and computes what
//!   `lcc eval --run` computes.

use crate::hf::peft;
use crate::ir::Graph;
use crate::passes::{self, lora, merge_lora, Pass, Report, RunOptions};
use crate::train::trainer::RunOutputs;
use crate::{Error, Result};
use std::path::Path;

/// Applies a PEFT adapter and trainable weights to `graph` (LLaMA-level, see
/// [`passes::ensure_llama_level`]) without merging them.
pub fn apply(graph: &mut Graph, adapter: Option<&Path>, trainable: Option<&Path>) -> Result<()> {
    if let Some(dir) = adapter {
        let a = peft::load_adapter(dir)?;
        lora::apply_adapter(graph, &a.lora())
            .map_err(|e| Error::invalid(format!("applying the adapter {}: {e}", dir.display())))?;
    }
    if let Some(file) = trainable {
        peft::load_trainable(graph, file)?;
    }
    Ok(())
}

/// Applies a run's outputs to its base `graph`: the run's `pi` pass as it
/// was configured (S²-Attn is for training only; LoRA comes back through the
/// adapter), then its adapter and trainable weights. Returns the reports of
/// the passes run.
pub fn apply_run(graph: &mut Graph, run: &Path) -> Result<Vec<Report>> {
    let outputs = RunOutputs::read(run)?;
    let mut reports = Vec::new();
    if let Some(p) = &outputs.rewrites {
        reports = p
            .run(graph, &RunOptions::default(), |_, _| {})
            .map_err(|e| {
                Error::invalid(format!(
                    "applying the rewrites of the run {}: {e}",
                    run.display()
                ))
            })?;
    }
    if outputs.adapter.is_none() && outputs.trainable.is_none() {
        if run.join("model").is_dir() {
            return Err(Error::invalid(format!(
                "the run {} saved a whole fine-tuned model: use {} itself",
                run.display(),
                run.join("model").display()
            )));
        }
        return Err(Error::invalid(format!(
            "the run {} has neither adapter/ nor trainable_params.safetensors (did it finish?)",
            run.display()
        )));
    }
    apply(
        graph,
        outputs.adapter.as_deref(),
        outputs.trainable.as_deref(),
    )?;
    Ok(reports)
}

/// Folds every LoRA branch of `graph` into its base weight.
pub fn fold_lora(graph: &mut Graph) -> Result<Report> {
    merge_lora::MergeLora::new(merge_lora::Options::default()).run(graph)
}

/// `lcc merge MODEL --adapter DIR [--trainable FILE]`: loads `model` (an HF
/// dir or ONNX; a torch export is raised first), applies the adapter and
/// the trainable weights, and folds the LoRA branches into the base weights.
/// The result has the base model's structure and names.
pub fn merge(model: &Path, adapter: &Path, trainable: Option<&Path>) -> Result<Graph> {
    let mut graph = crate::model::load(model)?;
    passes::ensure_llama_level(&mut graph, "merge")?;
    apply(&mut graph, Some(adapter), trainable)?;
    fold_lora(&mut graph)?;
    Ok(graph)
}

/// What `lcc merge` folds into a base model.
#[derive(Clone, Copy, Debug)]
pub enum MergeSource<'a> {
    /// A `run-train --out` directory ([`merge_run`]).
    Run(&'a Path),
    /// A PEFT adapter and, optionally, LongLoRA's trainable weights.
    Adapter {
        adapter: &'a Path,
        trainable: Option<&'a Path>,
    },
}

/// `lcc merge`: loads `model` (an HF dir or ONNX), raises a torch export to
/// LLaMA-level ops (with `no_raise`, refuses it), and merges `source` into
/// it; with no source, the model is still loaded and checked first, then
/// the error says what to give. The warnings and the raise's note go to
/// `note`.
pub fn merge_into(
    model: &Path,
    source: Option<MergeSource>,
    no_raise: bool,
    note: &mut dyn FnMut(&str),
) -> Result<Graph> {
    let mut graph = crate::model::load_noting(model, note)?;
    if let Some(line) = crate::model::raise_on_demand(&mut graph, model, no_raise, "merge")? {
        note(&line);
    }
    match source {
        Some(MergeSource::Run(run)) => {
            merge_run(&mut graph, run)?;
        }
        Some(MergeSource::Adapter { adapter, trainable }) => {
            apply(&mut graph, Some(adapter), trainable)?;
            fold_lora(&mut graph)?;
        }
        None => {
            return Err(Error::invalid(
                "name what to merge: --adapter DIR or --run DIR",
            ))
        }
    }
    Ok(graph)
}

/// `lcc merge MODEL --run DIR`: the base `graph` with the run's position
/// interpolation, adapter and trainable weights, merged.
pub fn merge_run(graph: &mut Graph, run: &Path) -> Result<Vec<Report>> {
    let mut reports: Vec<Report> = passes::ensure_llama_level(graph, "merge")?
        .into_iter()
        .collect();
    reports.extend(apply_run(graph, run)?);
    reports.push(fold_lora(graph)?);
    Ok(reports)
}
