//! Training and evaluation: data, the training loop, optimizers,
//! checkpoints, perplexity, passkey retrieval and generation.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod init;
pub mod metrics;
/// The optimizers live beside the backends that apply them.
pub use crate::runtime::optim;
pub mod passkey;
pub mod progress;
pub mod tokenizer;
pub mod trainer;
