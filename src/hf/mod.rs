//! Hugging Face model directories: `config.json` + safetensors weights in,
//! the LLaMA graph out, and back again.
//!
//! - [`load`] reads a dir (single `model.safetensors` or sharded with
//!   `model.safetensors.index.json`; weights stay memory-mapped) and builds
//!   the graph with [`build_llama`]. A dir with only `config.json` gives a
//!   shape-only model (weights typed, no values) for inspection.
//! - [`save`]/[`save_with`] write `config.json` (from the graph's `hf.config`
//!   property, with the RoPE of its `Rope` ops) and the graph's weights,
//!   sharded like `save_pretrained`. Files appear only when complete.
//! - [`read_tensors`]/[`write_tensors`] move host tensors of any dtype in and
//!   out of safetensors files (`lcc exec` inputs and outputs).

mod builder;
mod config;
pub mod peft;
pub mod safetensors;

pub use builder::{build_llama, expected_weights, shape_only_weights, IGNORED_PROP};
pub use config::read_config;
pub use safetensors::{
    load_dir_weights, parse_header, read_metadata, read_safetensors, read_tensors,
    write_safetensors, write_sharded, write_tensors, Header, TensorEntry, INDEX_FILE, SINGLE_FILE,
};

use crate::ir::{AttentionPattern, BinaryOp, Graph, LlamaConfig, Op, RopeAttrs, CONFIG_PROP};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// How [`save_with`] writes the weights.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Largest shard in bytes before the weights are split across files.
    pub max_shard_size: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        // transformers 4.x's default ("5GB"); 5.x raised it to 50 GB.
        SaveOptions {
            max_shard_size: 5_000_000_000,
        }
    }
}

/// Does `path` look like a Hugging Face model dir (a dir with
/// `config.json`, and no ONNX model in it)?
pub fn is_hf_dir(path: &Path) -> bool {
    if !path.is_dir() || !path.join("config.json").is_file() {
        return false;
    }
    let has_onnx = std::fs::read_dir(path).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".onnx"))
    });
    !has_onnx || path.join(SINGLE_FILE).is_file() || path.join(INDEX_FILE).is_file()
}

/// Loads a Hugging Face LLaMA dir into a graph. `path` may also be a
/// config `.json` file alone, which gives a shape-only model.
pub fn load(path: &Path) -> Result<Graph> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "json") {
            let cfg = read_config(path)?;
            return build_llama(&cfg, shape_only_weights(&cfg));
        }
        return Err(Error::invalid(format!(
            "{} is a file; a Hugging Face model is a directory holding config.json and model.safetensors",
            path.display()
        )));
    }
    let config = path.join("config.json");
    if !config.is_file() {
        return Err(Error::invalid(format!(
            "{} has no config.json; a Hugging Face model dir holds config.json and model.safetensors (or shards with model.safetensors.index.json)",
            path.display()
        )));
    }
    let cfg = read_config(&config)?;
    let weights = match load_dir_weights(path)? {
        Some(w) => w,
        None => shape_only_weights(&cfg),
    };
    build_llama(&cfg, weights)
}

/// Saves a LLaMA graph as a Hugging Face dir with default options.
pub fn save(graph: &Graph, dir: &Path) -> Result<()> {
    save_with(graph, dir, &SaveOptions::default())
}

/// The one RoPE the graph's `Rope` ops agree on, if it has any.
fn graph_rope(graph: &Graph) -> Result<Option<RopeAttrs>> {
    let mut found: Option<RopeAttrs> = None;
    for n in graph.topo_order()? {
        if let Op::Rope(r) = &graph.node(n).op {
            match &found {
                None => found = Some(r.clone()),
                Some(f) => {
                    if f.theta != r.theta || f.scaling != r.scaling || f.rotary_dim != r.rotary_dim
                    {
                        return Err(Error::invalid(format!(
                            "node '{}': its RoPE (theta {}, {:?}) differs from the other layers' (theta {}, {:?}); config.json records one RoPE for all layers",
                            graph.display_name(n),
                            r.theta,
                            r.scaling,
                            f.theta,
                            f.scaling
                        )));
                    }
                }
            }
        }
    }
    Ok(found)
}

/// Refuses a graph that a Hugging Face directory (config.json + weights)
/// would not reproduce: what transformers builds from the config is the
/// plain LLaMA forward, so anything else in the graph would be dropped
/// without a word on the way out.
fn check_expressible(graph: &Graph, dir: &Path) -> Result<()> {
    if let Some(n) = graph
        .g
        .node_indices()
        .find(|&n| graph.node(n).op.is_training())
    {
        return Err(Error::invalid(format!(
            "node '{}' ({}) is a training op: a training graph cannot be saved as a Hugging Face model ({}); save the model before the autodiff pass",
            graph.display_name(n),
            graph.node(n).op.name(),
            dir.display()
        )));
    }
    let lora = graph
        .g
        .node_weights()
        .filter(|n| matches!(n.op, Op::LoraLinear(_)))
        .count();
    if lora > 0 {
        return Err(Error::invalid(format!(
            "the graph has {lora} LoRA branches, which a Hugging Face model directory cannot hold; \
             fold them into the weights first (the merge-lora pass: --passes …,merge-lora), \
             save them as a PEFT adapter, or write ONNX (*.onnx) instead of {}",
            dir.display()
        )));
    }
    if let Some(what) = graph.meta.prop(crate::ir::BEYOND_CONFIG_PROP) {
        return Err(Error::invalid(format!(
            "the model holds {what} (recorded by lcc when it wrote this ONNX), which config.json cannot express; {} would lose it. Keep it as ONNX, or rewrite the original model (s2attn.inference=true, merge-lora) before converting",
            dir.display()
        )));
    }
    if !graph.g.node_weights().any(|n| n.op.is_llama_level()) {
        // ONNX that lcc wrote from a plain LLaMA: lowered to primitives, the
        // config it carries describes it.
        return Ok(());
    }
    for n in graph.topo_order()? {
        let node = graph.node(n);
        let name = graph.display_name(n);
        match &node.op {
            Op::Attention(a) if a.pattern != AttentionPattern::FullCausal => {
                return Err(Error::invalid(format!(
                    "node '{name}' uses shifted sparse attention (S²-Attn), which config.json cannot express: transformers would run full attention from {}. \
                     S²-Attn is for training; restore full attention for inference (--set s2attn.inference=true), or write ONNX (*.onnx), which keeps it",
                    dir.display()
                )));
            }
            Op::Input
            | Op::Weight { .. }
            | Op::Embedding
            | Op::RmsNorm { .. }
            | Op::Linear
            | Op::Rope(_)
            | Op::Attention(_)
            | Op::SwiGlu
            | Op::Binary(BinaryOp::Add)
            | Op::Identity => {}
            op => {
                return Err(Error::invalid(format!(
                    "node '{name}' ({}) is not part of the LLaMA forward that config.json describes, so {} would lose it; write ONNX (*.onnx) instead, or find why 'raise' left it (lcc rewrite --passes raise --explain)",
                    op.name(),
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// Saves a LLaMA graph as a Hugging Face dir: `config.json` and the graph's
/// weights. The dir is created if needed; other files in it (tokenizer, …)
/// are kept, weight files of an earlier save are replaced. Nothing is
/// half-written: everything is written into a temporary sibling dir first
/// and moved in at the end.
pub fn save_with(graph: &Graph, dir: &Path, opts: &SaveOptions) -> Result<()> {
    let cfg = LlamaConfig::from_graph(graph).ok_or_else(|| {
        Error::invalid(format!(
            "the graph is not a LLaMA that lcc recognises as a Hugging Face model: it has no '{CONFIG_PROP}' property (the config.json of a model loaded from a Hugging Face dir); cannot write config.json to {}",
            dir.display()
        ))
    })?;
    check_expressible(graph, dir)?;
    let mut cfg = cfg?;
    if let Some(rope) = graph_rope(graph)? {
        cfg.set_rope(&rope);
    }
    let weights: Vec<&crate::ir::Weight> = graph.weights.iter().collect();
    if let Some(w) = weights
        .iter()
        .find(|w| matches!(w.data, crate::ir::WeightData::Absent))
    {
        return Err(Error::invalid(format!(
            "weight '{}' has no data (a shape-only model); only a model with weights can be saved to {}",
            w.name,
            dir.display()
        )));
    }

    let target = absolute(dir)?;
    let parent = target
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    if target.exists() && !target.is_dir() {
        return Err(Error::invalid(format!(
            "{} exists and is not a directory; a Hugging Face model is saved as a directory (give another -o, or an .onnx name to write ONNX)",
            dir.display()
        )));
    }
    let staging = safetensors::temp_sibling(&target);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let written = (|| -> Result<()> {
        let config_json =
            serde_json::to_string_pretty(&cfg.to_json()).expect("JSON serializes") + "\n";
        let config_path = staging.join("config.json");
        std::fs::write(&config_path, config_json).map_err(|e| Error::io(&config_path, e))?;
        let mut names = write_sharded(&staging, &weights, opts.max_shard_size)?;
        names.insert(0, "config.json".into());
        if !target.exists() {
            return std::fs::rename(&staging, &target).map_err(|e| Error::io(&target, e));
        }
        move_into(&staging, &target, &names)
    })();
    // Whatever happened, no staging dir stays behind (after a rename there
    // is none; after a move it is empty).
    let _ = std::fs::remove_dir_all(&staging);
    written.map_err(|e| e.naming_output(&staging, &target))
}

/// Moves the staged files into an existing dir so that at no moment does
/// the dir's index point at shards that are not there: a stale index goes
/// first, shards before a new index, stale shards last.
fn move_into(staging: &Path, target: &Path, names: &[String]) -> Result<()> {
    let new_index = names.iter().any(|n| n == INDEX_FILE);
    let old_index = target.join(INDEX_FILE);
    if !new_index && old_index.exists() {
        std::fs::remove_file(&old_index).map_err(|e| Error::io(&old_index, e))?;
    }
    let mut ordered: Vec<&String> = names.iter().filter(|n| *n != INDEX_FILE).collect();
    ordered.extend(names.iter().filter(|n| *n == INDEX_FILE));
    for name in ordered {
        let (from, to) = (staging.join(name), target.join(name));
        std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    }
    // Weight files of an earlier save that this one did not replace.
    if let Ok(entries) = std::fs::read_dir(target) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_weights = name == SINGLE_FILE || is_shard_name(&name);
            if is_weights && !names.contains(&name) {
                let p = e.path();
                std::fs::remove_file(&p).map_err(|err| Error::io(&p, err))?;
            }
        }
    }
    Ok(())
}

/// `model-00001-of-00003.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name
        .strip_prefix("model-")
        .and_then(|s| s.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let b = mid.as_bytes();
    b.len() == 14
        && b[..5].iter().all(u8::is_ascii_digit)
        && &b[5..9] == b"-of-"
        && b[9..].iter().all(u8::is_ascii_digit)
}

/// `dir` made absolute without requiring it to exist (so `.` and `..` get
/// a real name for the temporary sibling).
fn absolute(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        return dir.canonicalize().map_err(|e| Error::io(dir, e));
    }
    std::path::absolute(dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert!(is_shard_name("model-00001-of-00003.safetensors"));
        assert!(!is_shard_name("model-1-of-3.safetensors"));
        assert!(!is_shard_name("adapter_model.safetensors"));
        assert!(!is_shard_name("model-00001-of-00003.bin"));
    }
}
