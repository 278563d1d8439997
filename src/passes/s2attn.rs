//! `s2attn`: LongLoRA's shifted sparse attention (S²-Attn) for training.
//! Every LLaMA-level full causal `Attention` becomes shifted sparse: the
//! first half of the heads attends causally within groups of G tokens, the
//! second half within groups shifted by G/2 (G = `group_fraction` of the
//! run-time length, or `group_size` tokens). RoPE stays before attention,
//! on true positions. With `inference: true` the pass goes the other way:
//! a model trained with S²-Attn is evaluated with full attention.
//!
//! ```text
//! before:  %7 = Attention{heads=4, kv_heads=2, head_dim=16, scale=0.25, pattern=full_causal}(%3, %5, %6)
//! after:   %7 = Attention{heads=4, kv_heads=2, head_dim=16, scale=0.25, pattern=shifted_sparse,
//!                         group_fraction=0.25}(%3, %5, %6)
//! ```
//!
//! `%3` is the rotated q, `%5` the rotated k, `%6` v: RoPE stays before the
//! grouping, on true positions. Only the pattern changes; the run-time
//! group size is G = round(L·fraction) (at least 1), and a run with G > L
//! fails with a message.
//!
//! Options: `group_fraction` (default 0.25) or `group_size` (tokens; not
//! both), `wrap` (false: LongLoRA's flash-attention path, nothing crosses
//! the end of the sequence; true: the paper's Algorithm 1, the shifted heads
//! are rolled so the first G/2 tokens share a group with the last ones),
//! `inference` (false).

use super::{Pass, Report};
use crate::ir::{AttentionPattern, Graph, GroupSize, Op, Patch, PatchValue, Value};
use crate::{Error, Result};
use serde::Deserialize;

const NAME: &str = "s2attn";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// G as a fraction of the sequence length (LongLoRA: 1/4).
    #[serde(default)]
    pub group_fraction: Option<f64>,
    /// G in tokens, whatever the sequence length.
    #[serde(default)]
    pub group_size: Option<usize>,
    /// Roll the shifted heads around the end of the sequence (Algorithm 1).
    #[serde(default)]
    pub wrap: bool,
    /// Restore full causal attention (evaluation of an S²-Attn-trained model).
    #[serde(default)]
    pub inference: bool,
}

pub struct ShiftedSparseAttention {
    /// The pattern every attention gets.
    pattern: AttentionPattern,
    notes: Vec<String>,
}

impl ShiftedSparseAttention {
    pub fn new(options: Options) -> Result<Self> {
        let mut notes = Vec::new();
        if options.inference {
            if options.group_fraction.is_some() || options.group_size.is_some() || options.wrap {
                notes.push(
                    "inference: true restores full attention; group_fraction, group_size and wrap are ignored"
                        .to_string(),
                );
            }
            return Ok(ShiftedSparseAttention {
                pattern: AttentionPattern::FullCausal,
                notes,
            });
        }
        let group = match (options.group_fraction, options.group_size) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "pass '{NAME}': group_fraction and group_size are exclusive; give one"
                )))
            }
            (_, Some(0)) => {
                return Err(Error::invalid(format!(
                    "pass '{NAME}': group_size must be at least 1 token"
                )))
            }
            (_, Some(n)) => GroupSize::Tokens(n),
            (f, None) => {
                let f = f.unwrap_or(0.25);
                if !(f > 0.0 && f <= 1.0) {
                    return Err(Error::invalid(format!(
                        "pass '{NAME}': group_fraction must be in (0, 1], got {f} (LongLoRA uses 0.25)"
                    )));
                }
                GroupSize::Fraction(f)
            }
        };
        Ok(ShiftedSparseAttention {
            pattern: AttentionPattern::ShiftedSparse {
                group,
                wrap: options.wrap,
            },
            notes,
        })
    }
}

impl Pass for ShiftedSparseAttention {
    fn needs_llama_level(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let mut report = Report {
            notes: self.notes.clone(),
            ..Default::default()
        };
        let attentions: Vec<_> = graph
            .topo_order()?
            .into_iter()
            .filter(|&n| matches!(graph.node(n).op, Op::Attention(_)))
            .collect();
        if attentions.is_empty() {
            return Err(Error::invalid(format!(
                "pass '{NAME}': the graph has no LLaMA-level Attention; raise it first (e.g. --passes raise,{NAME})"
            )));
        }
        let (mut unchanged, mut replaced_sparse) = (0usize, 0usize);
        // One patch for every layer: applying one per layer would re-verify
        // the whole graph each time (quadratic in the layer count).
        let mut patch = Patch::new();
        for n in attentions {
            let node = graph.node(n).clone();
            let Op::Attention(mut attrs) = node.op else {
                unreachable!("filtered to Attention above")
            };
            if attrs.pattern == self.pattern {
                unchanged += 1;
                continue;
            }
            let to_sparse = matches!(self.pattern, AttentionPattern::ShiftedSparse { .. });
            if to_sparse && attrs.num_heads % 2 != 0 {
                return Err(Error::invalid(format!(
                    "pass '{NAME}': node '{}' has {} heads; S²-Attn shifts half of the heads, so it needs an even count",
                    graph.display_name(n),
                    attrs.num_heads
                )));
            }
            if to_sparse && attrs.pattern != AttentionPattern::FullCausal {
                replaced_sparse += 1;
            }
            attrs.pattern = self.pattern.clone();
            let inputs: Vec<Option<PatchValue>> = graph
                .inputs_of(n)
                .into_iter()
                .map(|v| v.map(PatchValue::Existing))
                .collect();
            let new = patch.add(node.name, Op::Attention(attrs), &inputs, node.outputs);
            patch.replace(Value::new(n, 0), new);
            report.matched += 1;
        }
        if !patch.is_empty() {
            let stats = graph.apply(patch)?;
            report.nodes_added = stats.added;
            report.nodes_removed = stats.removed;
        }
        if unchanged > 0 {
            report.notes.push(format!(
                "{unchanged} attention node(s) already had this pattern (pass already applied)"
            ));
        }
        if replaced_sparse > 0 {
            report.notes.push(format!(
                "{replaced_sparse} shifted sparse attention node(s) got the new group settings"
            ));
        }
        Ok(report)
    }
}
