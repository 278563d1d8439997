//! Any bytes given as a Hugging Face config.json give a config or an error,
//! never a panic; a config small enough to build becomes a shape-only graph
//! that verifies and prints.
//!
//! ```sh
//! bash fuzz/run.sh 60 config_json
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz/config.json");
    let Ok(cfg) = lcc::ir::LlamaConfig::from_json_str(text, path) else {
        return;
    };
    // Building is linear in the layers; bound it so one input stays fast.
    if cfg.num_hidden_layers <= 8 && cfg.hidden_size <= 4096 {
        let weights = lcc::hf::shape_only_weights(&cfg);
        if let Ok(g) = lcc::hf::build_llama(&cfg, weights) {
            let _ = lcc::ir::verify(&g);
            let _ = lcc::ir::print(&g);
        }
    }
    let _ = cfg.to_json();
});
