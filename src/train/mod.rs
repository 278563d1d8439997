//! Training and evaluation: data, the training loop, optimizers,
//! checkpoints, perplexity, passkey retrieval and generation.

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod tokenizer;
