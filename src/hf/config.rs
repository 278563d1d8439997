//! `config.json` on disk. What it means, and its JSON form, is the model
//! description [`crate::ir::LlamaConfig`]; this is the file side.

use crate::ir::LlamaConfig;
use crate::Result;
use std::path::Path;

/// The largest config.json lcc reads (real ones are a few KiB).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads and checks `path` (a config.json).
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    let text = crate::util::read_text_capped(path, MAX_CONFIG_BYTES)?;
    LlamaConfig::from_json_str(&text, path)
}
