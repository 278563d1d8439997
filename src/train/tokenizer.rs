//! Tokenizers: byte-level (vocab 256, for small models) or a Hugging Face
//! `tokenizer.json`.

use crate::{Error, Result};
use std::path::Path;

/// Turns text into token ids and back.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per UTF-8 byte; ids 0–255. `eos` separates documents.
    Bytes { eos: u32 },
}

impl Tokenizer {
    /// The byte-level tokenizer with NUL (id 0, which plain text never
    /// contains) as end of document.
    pub fn bytes() -> Self {
        Tokenizer::Bytes { eos: 0 }
    }

    /// The tokenizer for a model: `tokenizer.json` in `model_dir` when there
    /// is one, else byte-level when the vocabulary has at least 256 entries.
    pub fn for_model(
        model_dir: Option<&Path>,
        vocab_size: usize,
        eos: Option<u32>,
    ) -> Result<Self> {
        if let Some(dir) = model_dir {
            let path = dir.join("tokenizer.json");
            if path.is_file() {
                return Err(Error::invalid(format!(
                    "{}: Hugging Face tokenizers are not supported yet",
                    path.display()
                )));
            }
        }
        if vocab_size < 256 {
            return Err(Error::invalid(format!(
                "the model has no tokenizer.json and its vocabulary ({vocab_size}) is too small for byte-level tokens (256)"
            )));
        }
        Ok(Tokenizer::Bytes {
            eos: eos.filter(|&e| e < 256).unwrap_or(0),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes { .. } => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes { .. } => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes { eos } => Some(*eos),
        }
    }
}
