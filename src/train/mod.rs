//! Training and evaluation: data, the training loop, optimizers,
//! checkpoints, perplexity, passkey retrieval and generation.

pub mod eval;
pub mod generate;
pub mod passkey;
pub mod tokenizer;
