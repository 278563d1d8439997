//! `dce`: dead code elimination. Removes every node that no graph output
//! depends on, and the weights only they read.
//!
//! ```text
//! before:  %0 = Neg(%x)        after:  %0 = Exp(%x)
//!          %1 = Exp(%x)                output y = %0
//!          output y = %1
//! ```

use super::{Pass, Report};
use crate::ir::Graph;
use crate::Result;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

pub struct DeadCodeElimination;

impl DeadCodeElimination {
    pub fn new(_options: Options) -> Self {
        DeadCodeElimination
    }
}

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, graph: &mut Graph) -> Result<Report> {
        let weights_before = graph.weights.len();
        let removed = graph.remove_dead();
        let mut report = Report {
            matched: removed,
            nodes_removed: removed,
            ..Default::default()
        };
        let dropped = weights_before - graph.weights.len();
        if dropped > 0 {
            report
                .notes
                .push(format!("dropped {dropped} weights nothing reads"));
        }
        Ok(report)
    }
}
