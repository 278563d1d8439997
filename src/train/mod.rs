//! Training and evaluation: data, the training loop, optimizers,
//! checkpoints, perplexity, passkey retrieval and generation.

pub mod bench;
pub mod config;
pub mod demo;
pub mod init;
pub mod progress;
pub mod tokenizer;
pub mod trainer;
