//! Any bytes given as a run-train YAML config give a config or an error,
//! never a panic or a hang (nesting, anchors and aliases included); a config
//! that parses validates and writes back.
//!
//! ```sh
//! bash fuzz/run.sh 60 train_yaml
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz/run.yaml");
    if let Ok(cfg) = lcc::train::config::TrainConfig::from_yaml_str(text, path) {
        let _ = cfg.validate();
        let _ = cfg.to_yaml();
    }
});
