//! Running graphs: the [`Backend`] trait, the execution [`schedule`] and the
//! CPU backend, the reference every other backend is tested against.

use crate::ir::{Graph, Tensor};
use crate::Result;
use std::collections::HashMap;

pub mod cpu;
pub mod plan;
pub mod schedule;

pub use cpu::{ComputeDType, CpuBackend, Session};
pub use schedule::Schedule;

/// Something that runs a graph.
pub trait Backend {
    /// A short name for messages (`cpu`, `cuda`).
    fn name(&self) -> &str;

    /// Runs `graph` on `inputs` (by graph input name) and returns every graph
    /// output by name.
    fn run(
        &self,
        graph: &Graph,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>>;
}
