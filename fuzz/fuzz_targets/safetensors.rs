//! Any bytes given to the safetensors reader give tensors or an error, never
//! a panic, a hang or an allocation the input does not justify: the header
//! parses and validates (offsets, dtypes, shapes, overlaps), and every tensor
//! it accepts decodes.
//!
//! ```sh
//! bash fuzz/run.sh 60 safetensors
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz-input.safetensors");
    if let Ok(header) = lcc::hf::safetensors::parse_header(path, data) {
        for t in &header.tensors {
            let bytes = &data[t.offset..t.offset + t.len];
            let _ = lcc::ir::Tensor::from_le_bytes(t.dtype, t.shape.clone(), bytes);
        }
    }
});
