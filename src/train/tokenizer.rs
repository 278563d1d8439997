//! Tokenizers: byte-level (vocab 256, for small models) or a Hugging Face
//! `tokenizer.json` (through the `tokenizers` crate).

use crate::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// Turns text into token ids and back.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per UTF-8 byte; ids 0–255. `eos` separates documents.
    Bytes { eos: u32 },
    /// A Hugging Face `tokenizer.json`. `eos` is the model config's
    /// `eos_token_id` when given, else the tokenizer's `</s>` token, if any.
    Hf {
        inner: Arc<tokenizers::Tokenizer>,
        eos: Option<u32>,
    },
}

/// The token LLaMA-family tokenizers use to end a document; the fallback end
/// of document when the model config does not name one.
const EOS_TOKEN: &str = "</s>";

impl Tokenizer {
    /// The byte-level tokenizer with NUL (id 0, which plain text never
    /// contains) as end of document.
    pub fn bytes() -> Self {
        Tokenizer::Bytes { eos: 0 }
    }

    /// Loads a Hugging Face `tokenizer.json`. End of document is `</s>` when
    /// the vocabulary has it (use [`Tokenizer::with_eos`] to set another).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::invalid(format!(
                "{}: no such tokenizer file (expected a Hugging Face tokenizer.json)",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::format(
                path,
                format!("not a tokenizer.json the tokenizers library can read: {e}"),
            )
        })?;
        let eos = inner.token_to_id(EOS_TOKEN);
        Ok(Tokenizer::Hf {
            inner: Arc::new(inner),
            eos,
        })
    }

    /// The same tokenizer with `eos` as end-of-document id.
    pub fn with_eos(self, eos: u32) -> Self {
        match self {
            Tokenizer::Bytes { .. } => Tokenizer::Bytes { eos },
            Tokenizer::Hf { inner, .. } => Tokenizer::Hf {
                inner,
                eos: Some(eos),
            },
        }
    }

    /// The tokenizer for a model: `tokenizer.json` in `model_dir` when there
    /// is one, else byte-level when the vocabulary has at least 256 entries.
    /// `eos` is the config's `eos_token_id`; it wins over the tokenizer's own
    /// `</s>`.
    pub fn for_model(
        model_dir: Option<&Path>,
        vocab_size: usize,
        eos: Option<u32>,
    ) -> Result<Self> {
        if let Some(dir) = model_dir {
            let path = dir.join("tokenizer.json");
            if path.is_file() {
                if let Some(e) = eos.filter(|&e| e as usize >= vocab_size) {
                    return Err(Error::invalid(format!(
                        "eos_token_id {e} is outside the model's vocabulary ({vocab_size} tokens); fix eos_token_id in {}",
                        dir.join("config.json").display()
                    )));
                }
                let tok = Tokenizer::from_file(&path)?;
                let tok = match eos {
                    Some(e) => tok.with_eos(e),
                    None => tok,
                };
                let n = tok.vocab_size();
                if n > vocab_size {
                    return Err(Error::invalid(format!(
                        "{}: the tokenizer has {n} tokens but the model's vocabulary has only {vocab_size}; use the tokenizer that belongs to this model",
                        path.display()
                    )));
                }
                return Ok(tok);
            }
        }
        if vocab_size < 256 {
            return Err(Error::invalid(format!(
                "the model has no tokenizer.json and its vocabulary ({vocab_size}) is too small for byte-level tokens (256)"
            )));
        }
        if let Some(e) = eos.filter(|&e| e as usize >= vocab_size) {
            return Err(Error::invalid(format!(
                "eos_token_id {e} is outside the model's vocabulary ({vocab_size} tokens); fix eos_token_id in config.json"
            )));
        }
        // Byte-level text with no stated end-of-document id uses 0 (NUL),
        // which no text contains.
        Ok(Tokenizer::Bytes {
            eos: eos.unwrap_or(0),
        })
    }

    /// Number of ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes { .. } => 256,
            Tokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
        }
    }

    /// Token ids of `text`. Hugging Face tokenizers run without special
    /// tokens (no BOS): documents are separated by EOS when packed, as
    /// LongLoRA's data pipeline does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes { .. } => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { inner, .. } => inner
                .encode_fast(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| Error::invalid(format!("tokenizer failed on the text: {e}"))),
        }
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD; ids the Hugging
    /// Face tokenizer does not know are skipped by it).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes { .. } => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            // Decoding only fails inside a decoder component on malformed
            // pieces; show that in the text rather than failing generation.
            Tokenizer::Hf { inner, .. } => inner
                .decode(ids, false)
                .unwrap_or_else(|e| format!("<decode error: {e}>")),
        }
    }

    /// The end-of-document id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes { eos } => Some(*eos),
            Tokenizer::Hf { eos, .. } => *eos,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer.json with a whitespace pre-tokenizer, written
    /// by the tokenizers crate itself (parsed, then saved), so the test does
    /// not depend on a download.
    pub(crate) fn write_word_level(dir: &Path) -> std::path::PathBuf {
        let json = r#"{
          "version": "1.0",
          "truncation": null, "padding": null,
          "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null,
          "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "the": 4, "cat": 5, ".": 6}, "unk_token": "<unk>"}
        }"#;
        let tok: tokenizers::Tokenizer = json.parse().expect("valid tokenizer json");
        let path = dir.join("tokenizer.json");
        tok.save(&path, true).expect("save tokenizer.json");
        path
    }

    #[test]
    fn hf_tokenizer_encodes_decodes_and_finds_eos() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_word_level(dir.path());
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.encode("hello world.").unwrap(), vec![2, 3, 6]);
        assert_eq!(tok.encode("the dog").unwrap(), vec![4, 0]);
        assert_eq!(tok.decode(&[4, 5]), "the cat");
        assert_eq!(tok.eos_id(), Some(1));
        assert_eq!(tok.vocab_size(), 7);

        let model = Tokenizer::for_model(Some(dir.path()), 32, Some(6)).unwrap();
        assert!(matches!(model, Tokenizer::Hf { .. }));
        assert_eq!(model.eos_id(), Some(6));
        let model = Tokenizer::for_model(Some(dir.path()), 32, None).unwrap();
        assert_eq!(model.eos_id(), Some(1));
        let err = Tokenizer::for_model(Some(dir.path()), 4, None).unwrap_err();
        assert!(err.to_string().contains("vocabulary has only 4"), "{err}");
    }

    #[test]
    fn bad_or_missing_tokenizer_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_file(&dir.path().join("nope.json")).unwrap_err();
        assert!(err.to_string().contains("no such tokenizer file"), "{err}");
        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let err = Tokenizer::for_model(Some(dir.path()), 300, None).unwrap_err();
        assert!(err.to_string().contains("not a tokenizer.json"), "{err}");
    }

    #[test]
    fn byte_level_without_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::for_model(Some(dir.path()), 256, Some(2)).unwrap();
        assert_eq!(tok.eos_id(), Some(2));
        assert_eq!(tok.encode("hé").unwrap(), vec![104, 195, 169]);
        assert_eq!(tok.decode(&[104, 195, 169]), "hé");
        assert!(Tokenizer::for_model(None, 100, None).is_err());
    }
}
