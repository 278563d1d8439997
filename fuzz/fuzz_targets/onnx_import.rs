//! Any bytes given to the ONNX importer give a graph or an error, never a
//! panic, a hang or an allocation the input does not justify.
//!
//! Run from the repository root (seed the corpus with the fixture exports):
//!
//! ```sh
//! mkdir -p fuzz/corpus/onnx_import && cp tests/fixtures/tiny/*.onnx fuzz/corpus/onnx_import/
//! RUSTC_BOOTSTRAP=1 cargo fuzz run onnx_import -- -max_total_time=300
//! # small inputs run ~100x faster:
//! python fuzz/make_seeds.py fuzz/corpus/onnx_small
//! RUSTC_BOOTSTRAP=1 cargo fuzz run onnx_import fuzz/corpus/onnx_small -- -max_len=4096
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A directory that does not exist: external data references fail cleanly.
    let source = std::path::Path::new("/nonexistent/fuzz-input.onnx");
    if let Ok(graph) = lcc::onnx::load_bytes(data, source) {
        // Whatever imports must also print (the canonical order walks it).
        let _ = lcc::ir::print(&graph);
    }
});
