//! Small helpers shared across the crate: formatting for reports, and
//! reading input files with bounds.

use crate::{Error, Result};
use std::path::Path;

/// The largest small text file lcc reads whole (YAML configs, JSON configs
/// and indexes, checkpoint states): real ones are a few KiB.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// The most worker threads lcc starts: a few per core (more only queue
/// behind each other, and a mistyped count would spend minutes starting
/// threads).
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
}

/// Checks a `--threads` value: at least 1, at most [`max_threads`].
pub fn check_threads(n: usize) -> Result<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n == 0 || n > max_threads() {
        return Err(Error::invalid(format!(
            "--threads {n}: use 1 to {} (this machine has {cores} cores)",
            max_threads()
        )));
    }
    Ok(n)
}

/// Starts the global worker pool with `n` threads (`--threads` of the
/// commands that run on it: eval, generate).
pub fn init_global_threads(n: usize) -> Result<()> {
    check_threads(n)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::invalid(format!("starting the worker threads: {e}")))
}

/// Refuses anything but a regular file (after following links): opening a
/// FIFO blocks until a writer comes, and a device has no end.
pub fn check_regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "a FIFO, device or socket"
        };
        return Err(Error::format(
            path,
            format!("is {what}, not a regular file; lcc reads regular files only"),
        ));
    }
    Ok(meta)
}

/// Reads a regular file of at most `max` bytes as bytes.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta = check_regular_file(path)?;
    if meta.len() > max {
        return Err(Error::format(
            path,
            format!(
                "{} bytes is more than this kind of file can hold (at most {})",
                meta.len(),
                human_bytes(max)
            ),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a regular UTF-8 text file of at most `max` bytes.
pub fn read_text_capped(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_capped(path, max)?).map_err(|_| Error::format(path, "is not UTF-8 text"))
}

/// `1234567` → `1,234,567`.
pub fn group_digits(n: u64) -> String {
    group_digits_u128(n.into())
}

/// [`group_digits`] for counts that may pass `u64` (FLOPs at long lengths).
pub fn group_digits_u128(n: u128) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units (`1.5 GiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Whether every byte is zero. An OR-fold over 4 KiB blocks vectorises
/// (gigabytes per second) yet still stops at the first block with data; the
/// writers use it to leave all-zero blocks as holes in sparse files.
pub fn is_all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped_by_thousands() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(6738415616), "6,738,415,616");
    }

    #[test]
    fn zero_blocks_are_recognised() {
        let mut v = vec![0u8; 10_000];
        assert!(is_all_zero(&v));
        assert!(is_all_zero(&[]));
        v[9_999] = 1;
        assert!(!is_all_zero(&v));
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}

/// Deterministic pseudo-random numbers (SplitMix64): seeded LoRA init, data
/// shuffling, sampling. The whole state is one `u64` (`state`), so a
/// checkpoint can save and restore it exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}
