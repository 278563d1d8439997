//! Training and evaluation: data, the training loop, optimizers,
//! checkpoints, perplexity, passkey retrieval and generation.

pub mod tokenizer;
pub mod data;
