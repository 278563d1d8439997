//! LoRA as the graph names it: PEFT's weight names
//! (`base_model.model.<module>.lora_A.weight`), the projections a target
//! names, and [`LoraAdapter`], an adapter as read from files. The `lora` pass
//! builds branches with these names and applies adapters
//! (`passes::lora::apply_adapter`); `hf::peft` reads and writes them as PEFT
//! files. Neither knows the other.

use super::{Graph, NodeIndex, Op, Tensor};
use std::path::Path;

/// The prefix PEFT puts before the model's own module paths.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Short target names and the module path inside a decoder layer.
pub const TARGETS: [(&str, &str); 7] = [
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
];

/// Resolves a target (`q`, `q_proj` or `self_attn.q_proj`) to its short
/// name and module path.
pub fn resolve_target(target: &str) -> Option<(&'static str, &'static str)> {
    TARGETS.iter().copied().find(|(short, module)| {
        target == *short || target == *module || module.rsplit('.').next() == Some(target)
    })
}

/// PEFT's name for the A matrix of the projection at `module`
/// (`model.layers.0.self_attn.q_proj`).
pub fn lora_a_name(module: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_A.weight")
}

/// PEFT's name for the B matrix.
pub fn lora_b_name(module: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_B.weight")
}

/// Is `name` a LoRA A or B weight?
pub fn is_lora_weight(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// The model's name of a tensor named with or without PEFT's prefix.
pub fn strip_peft_prefix(name: &str) -> &str {
    name.strip_prefix(PEFT_PREFIX).unwrap_or(name)
}

/// The projection a `Linear`/`LoraLinear` node is: its module path
/// (`model.layers.0.self_attn.q_proj`) and target short name, found from the
/// name of the weight on port 1.
pub fn projection_of(graph: &Graph, n: NodeIndex) -> Option<(String, &'static str)> {
    if !matches!(graph.node(n).op, Op::Linear | Op::LoraLinear(_)) {
        return None;
    }
    let w = graph.inputs_of(n).get(1).copied().flatten()?;
    let Op::Weight { name } = &graph.node(w.node).op else {
        return None;
    };
    let module = name.strip_suffix(".weight")?;
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (short, _) = TARGETS.iter().copied().find(|(_, m)| *m == suffix)?;
    Some((module.to_string(), short))
}

/// A trained LoRA adapter, whatever file format it came in: the branches'
/// hyper-parameters, their targets, and the tensors under PEFT names (the A
/// and B of each branch; any other tensor replaces the model's weight of
/// the same name without [`PEFT_PREFIX`], as PEFT's `modules_to_save`).
#[derive(Clone, Copy, Debug)]
pub struct LoraAdapter<'a> {
    /// Where it was read from, named in errors and reports.
    pub source: &'a Path,
    /// The file under `source` that held the tensors, named when one is
    /// missing.
    pub tensor_file: &'a str,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    /// Targets as written (`q_proj`, …); [`resolve_target`] reads each.
    pub targets: &'a [String],
    pub tensors: &'a [(String, Tensor)],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_in_all_spellings() {
        assert_eq!(resolve_target("q"), Some(("q", "self_attn.q_proj")));
        assert_eq!(resolve_target("q_proj"), Some(("q", "self_attn.q_proj")));
        assert_eq!(
            resolve_target("mlp.down_proj"),
            Some(("down", "mlp.down_proj"))
        );
        assert_eq!(resolve_target("x"), None);
    }
}
