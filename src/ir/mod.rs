//! The intermediate representation: a petgraph `StableGraph` of ops with
//! ported edges, symbolic shapes, memory-mapped weights, a verifier, a
//! canonical print and a patch API for rewrites.

pub mod diff;
mod dtype;
mod fused;
mod graph;
pub mod infer;
mod llama_config;
pub mod lora;
mod op;
mod patch;
pub mod print;
pub mod rope;
mod shape;
pub mod tensor;
mod verify;
mod weights;

pub use dtype::DType;
pub use fused::{
    expand, expand_all, fusable_binary, fusable_unary, FusedExpr, FusedStep, MergedLinear,
    MergedPart,
};
pub use graph::{beyond_config, Edge, Graph, ModelMeta, Node, Output, Value, BEYOND_CONFIG_PROP};
pub use llama_config::{ConfigForm, LlamaConfig, Recorded, StructuralConfig, CONFIG_PROP};
pub use op::*;
pub use patch::{Patch, PatchStats, PatchValue};
pub use petgraph::stable_graph::NodeIndex;
pub use print::print;
pub use shape::{Dim, DimExpr, TensorType};
pub use tensor::{Tensor, TensorData};
pub use verify::verify;
pub use weights::{MappedFile, Weight, WeightData, WeightStore};
