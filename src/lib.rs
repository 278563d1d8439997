//! lcc: a compiler for long-context fine-tuning of LLaMA models.
//!
//! Data flows one way: `onnx`/`hf` import into the [`ir`] graph, passes rewrite
//! it, and it either goes out again (`onnx`/`hf` export) or is lowered and run
//! by a [`runtime`] backend. Nothing downstream reaches back up.

pub mod cost;
pub mod error;
pub mod hf;
pub mod ir;
pub mod memory;
pub mod merge;
pub mod model;
pub mod onnx;
pub mod passes;
pub mod runtime;
pub mod train;
pub mod util;

pub use error::{Error, Result};
