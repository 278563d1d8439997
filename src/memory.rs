//! What lcc may allocate: the machine's available memory, an optional
//! `--max-memory` limit, and the live heap a counting allocator keeps, so
//! that a size that comes from input is refused with a message instead of
//! ending in an allocation failure (an abort) or the OOM killer.

use crate::util::human_bytes;
use crate::{Error, Result};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The system allocator, counting the bytes it has live. The `lcc` binary
/// installs it as the global allocator; a library user who does not sees a
/// live heap of 0 (the machine check still applies).
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` with the same arguments; the
// counters are only statistics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Bytes the counting allocator has live now (0 where it is not installed).
pub fn live_heap() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes the counting allocator has had live at once.
pub fn peak_heap() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// `--max-memory`, in bytes; 0 when not set.
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the `--max-memory` limit on the live heap (`None` removes it).
pub fn set_limit(bytes: Option<u64>) {
    LIMIT.store(bytes.unwrap_or(0), Ordering::Relaxed);
}

/// The `--max-memory` limit, if one is set.
pub fn limit() -> Option<u64> {
    match LIMIT.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// Parses a size as typed: `123456`, `512K`, `64M`, `8G`, `1T` (powers of
/// 1024; `KiB`/`KB`/`k` spellings accepted).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 512M, 8G)"))?;
    let bytes = v * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("'{text}' is not a size lcc can use"));
    }
    Ok(bytes as u64)
}

/// Memory the kernel says a new allocation can get now (`MemAvailable` plus
/// free swap), or `None` where /proc/meminfo cannot be read.
/// This process's resident size now (Linux `VmRSS`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// Allocations below this size are not checked against the machine
/// (reading /proc/meminfo costs more than they do).
pub const CHECKED_BYTES: u128 = 64 << 20;

/// Under `--max-memory`, allocations from this size up are checked.
pub const CHECKED_BYTES_LIMITED: u128 = 1 << 20;

/// Why `bytes` more cannot be had now — "N of memory and …" — or `None`
/// when they can, when they are too small to check, or when the machine
/// does not say.
pub fn shortfall(bytes: u128) -> Option<String> {
    let show = |b: u128| human_bytes(u64::try_from(b).unwrap_or(u64::MAX));
    if let Some(max) = limit() {
        let live = live_heap() as u128;
        if bytes >= CHECKED_BYTES_LIMITED && live + bytes > u128::from(max) {
            return Some(format!(
                "{} of memory and --max-memory {} leaves {} ({} in use)",
                show(bytes),
                show(max.into()),
                show(u128::from(max).saturating_sub(live)),
                show(live)
            ));
        }
    }
    if bytes < CHECKED_BYTES {
        return None;
    }
    let avail = available_memory()?;
    (bytes > u128::from(avail)).then(|| {
        format!(
            "{} of memory and this machine has {} available",
            show(bytes),
            show(avail.into())
        )
    })
}

/// Refuses, before allocating, work that needs more memory than can be had:
/// `bytes` (saturated, so overflowing sizes refuse too) for `what`.
pub fn check(bytes: u128, what: &str) -> Result<()> {
    match shortfall(bytes) {
        Some(why) => Err(Error::invalid(format!("{what} needs {why}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_typed() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert!(parse_size("8X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("").is_err());
    }
}
