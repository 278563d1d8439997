//! `trainable`: chooses which weights train besides the LoRA matrices
//! (LongLoRA trains the embeddings and the norms). A weight is trainable
//! when its name matches one of `patterns`; every other weight is frozen,
//! except LoRA A/B weights, which keep what the `lora` pass gave them. The
//! graph's nodes do not change, only the weights' flags (the `trainable`
//! suffix of the canonical print's weight lines).
//!
//! ```text
//! before:  weight @model.embed_tokens.weight: f32[256,64]
//!          weight @model.norm.weight: f32[64]
//! after:   weight @model.embed_tokens.weight: f32[256,64] trainable
//!          weight @model.norm.weight: f32[64] trainable
//! ```
//!
//! Patterns: `embed` (`model.embed_tokens.weight`), `norm` (every
//! `*norm.weight`), `lm_head` (`lm_head.weight`), a glob with `*`/`?`
//! matched against the whole name, or else any substring of the name.
//! A pattern that matches no weight is an error. Running it twice is the
//! same as once.

use super::{Pass, Report};
use crate::ir::lora::is_lora_weight;
use crate::ir::Graph;
use crate::{Error, Result};
use serde::Deserialize;

fn default_patterns() -> Vec<String> {
    vec!["embed".into(), "norm".into()]
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub patterns: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            patterns: default_patterns(),
        }
    }
}

pub struct Trainable {
    options: Options,
}

impl Trainable {
    pub fn new(options: Options) -> Self {
        Trainable { options }
    }
}

/// `*` matches any run of characters, `?` any one.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &name[1..]),
        (Some(p), Some(c)) if p == c => glob(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Does weight `name` match `pattern`?
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern {
        "embed" => name == "model.embed_tokens.weight",
        "norm" => name.ends_with("norm.weight"),
        "lm_head" => name == "lm_head.weight",
        p if p.contains('*') || p.contains('?') => glob(p.as_bytes(), name.as_bytes()),
        p => name.contains(p),
    }
}

impl Pass for Trainable {
    fn needs_llama_level(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "trainable"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let patterns = &self.options.patterns;
        if let Some(p) = patterns.iter().find(|p| p.is_empty()) {
            return Err(Error::invalid(format!(
                "pass 'trainable': empty pattern '{p}' in patterns; use embed, norm, lm_head, a glob or a name substring"
            )));
        }
        let names: Vec<String> = graph.weights.iter().map(|w| w.name.clone()).collect();
        for p in patterns {
            if !names.iter().any(|n| !is_lora_weight(n) && matches(p, n)) {
                return Err(Error::invalid(format!(
                    "pass 'trainable': pattern '{p}' matches no weight of the model (e.g. lm_head is absent when the embeddings are tied); drop it from patterns"
                )));
            }
        }
        let (mut trainable, mut trainable_params, mut frozen, mut lora, mut changed) =
            (0usize, 0u64, 0usize, 0usize, 0usize);
        for name in &names {
            let w = graph.weights.get_mut(name).expect("name from the store");
            if is_lora_weight(name) {
                lora += 1;
                continue;
            }
            let want = patterns.iter().any(|p| matches(p, name));
            if w.trainable != want {
                changed += 1;
                w.trainable = want;
            }
            if want {
                trainable += 1;
                trainable_params += w.numel() as u64;
            } else {
                frozen += 1;
            }
        }
        Ok(Report {
            matched: trainable,
            notes: vec![format!(
                "trainable: {trainable} weights ({} parameters) matching {}; frozen: {frozen}; LoRA weights left as they are: {lora}; flags changed: {changed}",
                crate::util::group_digits(trainable_params),
                patterns.join(", ")
            )],
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_longlora_weights() {
        assert!(matches("embed", "model.embed_tokens.weight"));
        assert!(matches("norm", "model.layers.0.input_layernorm.weight"));
        assert!(matches(
            "norm",
            "model.layers.1.post_attention_layernorm.weight"
        ));
        assert!(matches("norm", "model.norm.weight"));
        assert!(!matches("norm", "model.layers.0.self_attn.q_proj.weight"));
        assert!(matches(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!matches(
            "model.layers.?.mlp",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(matches("q_proj", "model.layers.3.self_attn.q_proj.weight"));
    }
}
