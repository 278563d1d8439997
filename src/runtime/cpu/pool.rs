//! Buffer reuse across the runs of a [`super::Session`]: a training step
//! allocates the same activation and gradient buffers every time, so the
//! executor hands each dead value's buffer to a pool and the kernels take
//! their output buffers from it. After the first step a step allocates
//! (almost) nothing.
//!
//! The pool is owned by the session and installed on the executor's thread
//! for the length of a run; kernels reach it through [`zeroed`]. Outside a
//! session run (one-off `Backend::run`, constant folding, rayon worker
//! threads) [`zeroed`] simply allocates. Buffers are matched by exact
//! length, which is what repeated steps of one shape need.
//!
//! Only buffers the pool handed out come back to it (other dead values are
//! freed as usual). A request with no free buffer of its length takes the
//! smallest free one up to twice as long, so the pool holds about as much
//! as a run has alive at its peak.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

/// Free f32 buffers by length, with hit/miss counts.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    /// Addresses of the buffers this pool allocated.
    owned: HashSet<usize>,
    /// Buffers handed out from the pool.
    pub reused: usize,
    /// Buffers that had to be allocated.
    pub allocated: usize,
}

impl BufferPool {
    /// Bytes held by free buffers.
    pub fn held_bytes(&self) -> usize {
        self.free
            .iter()
            .map(|(len, v)| len * v.len() * std::mem::size_of::<f32>())
            .sum()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<BufferPool>> = const { RefCell::new(None) };
}

/// Installs `pool` on this thread until the guard is dropped, which puts it
/// back into `slot`.
pub(super) struct Active<'a> {
    slot: &'a mut BufferPool,
}

pub(super) fn activate(slot: &mut BufferPool) -> Active<'_> {
    let pool = std::mem::take(slot);
    CURRENT.with(|c| *c.borrow_mut() = Some(pool));
    Active { slot }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(pool) = CURRENT.with(|c| c.borrow_mut().take()) {
            *self.slot = pool;
        }
    }
}

/// A zeroed buffer of `len` f32s: a recycled one when this thread runs a
/// session and the pool has one of that length, else a new allocation.
pub fn zeroed(len: usize) -> Vec<f32> {
    let reused = CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        let pool = c.as_mut()?;
        let exact = pool.free.get_mut(&len).and_then(Vec::pop);
        // Else the smallest free buffer up to twice as long, cut to length
        // (so that buffers of lengths no longer asked for serve others and
        // the pool does not add up every length's high-water mark).
        let found = exact.or_else(|| {
            let key = pool
                .free
                .iter()
                .filter(|(&l, v)| l > len && l <= 2 * len && !v.is_empty())
                .map(|(&l, _)| l)
                .min()?;
            let mut v = pool.free.get_mut(&key)?.pop()?;
            v.truncate(len);
            Some(v)
        });
        match found {
            Some(v) => {
                pool.reused += 1;
                Some(v)
            }
            None => {
                pool.allocated += 1;
                None
            }
        }
    });
    match reused {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => {
            let v = vec![0.0; len];
            if len > 0 {
                CURRENT.with(|c| {
                    if let Some(pool) = c.borrow_mut().as_mut() {
                        pool.owned.insert(v.as_ptr() as usize);
                    }
                });
            }
            v
        }
    }
}

/// A copy of `src` in a pooled buffer.
pub fn copy_of(src: &[f32]) -> Vec<f32> {
    let mut v = zeroed(src.len());
    v.copy_from_slice(src);
    v
}

/// Gives a dead value's buffer back to this thread's pool if the pool
/// handed it out (else, or when no session runs here, it is freed).
pub(super) fn recycle(v: Vec<f32>) {
    if v.is_empty() {
        return;
    }
    CURRENT.with(|c| {
        if let Some(pool) = c.borrow_mut().as_mut() {
            if pool.owned.contains(&(v.as_ptr() as usize)) {
                pool.free.entry(v.len()).or_default().push(v);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_only_inside_a_session_run() {
        // No pool installed: plain allocations, recycling drops.
        recycle(vec![1.0; 4]);
        assert_eq!(zeroed(4), vec![0.0; 4]);

        let mut slot = BufferPool::default();
        {
            let _on = activate(&mut slot);
            let mut a = zeroed(16);
            a[3] = 5.0;
            let ptr = a.as_ptr();
            let c = copy_of(&[1.0, 2.0, 3.0]);
            recycle(vec![7.0; 16]); // not the pool's: freed
            recycle(a);
            recycle(c);
            let b = zeroed(16);
            assert_eq!(b.as_ptr(), ptr, "the same buffer comes back");
            assert_eq!(b, vec![0.0; 16], "zeroed on reuse");
            assert_eq!(copy_of(&[4.0, 5.0, 6.0]), vec![4.0, 5.0, 6.0]);
            assert_eq!(zeroed(16), vec![0.0; 16], "the foreign buffer was not kept");
            // A longer free buffer (up to twice the length) serves a shorter request.
            let mut d = zeroed(20);
            d[0] = 1.0;
            let ptr = d.as_ptr();
            recycle(d);
            let e = zeroed(12);
            assert_eq!((e.as_ptr(), e.len()), (ptr, 12));
            assert_eq!(e, vec![0.0; 12]);
            recycle(e);
            let f = zeroed(5);
            assert_ne!(f.as_ptr(), ptr, "not more than twice as long");
        }
        assert_eq!(slot.reused, 3);
        assert_eq!(slot.allocated, 5);
        assert_eq!(slot.held_bytes(), 12 * 4, "the 12-long buffer is kept");
        // Outside the run the pool is not reachable.
        recycle(vec![0.0; 8]);
        assert_eq!(slot.held_bytes(), 12 * 4);
    }
}
