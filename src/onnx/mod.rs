//! ONNX: the protobuf messages (`proto`), import into the IR and export from it.
//!
//! ```no_run
//! use lcc::onnx::{load, save, ExportOptions};
//! # fn main() -> lcc::Result<()> {
//! let graph = load(std::path::Path::new("model.onnx"))?;
//! save(&graph, std::path::Path::new("out.onnx"), &ExportOptions::default())?;
//! # Ok(())
//! # }
//! ```

mod export;
mod import;
mod lower;
mod proto;

pub use export::{save, ExportOptions, ExternalData};
pub use import::{load, load_bytes, read_tensor_file};

#[cfg(test)]
mod tests;
