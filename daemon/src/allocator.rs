//! The daemon's allocator is jemalloc (installed by the `messengerd` binary, not by this
//! library, so tests and tools keep theirs). Glibc's malloc kept 1.1–2.5 GB resident after a
//! flood had ended; jemalloc, with a background thread purging pages unused for a second,
//! returns them to the OS, and reports what it holds for `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};

/// jemalloc's start-up options, read from this symbol by the prefixed build that
/// tikv-jemallocator links (`_rjem_malloc_conf`): purge dirty and muzzy pages after 1 s, on a
/// background thread rather than on the allocating threads.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: a pointer to a static, immutable, NUL-terminated string.
unsafe impl Sync for MallocConf {}

pub const MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000".as_ptr());

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Called by a binary that made jemalloc its global allocator, so `stats` reports it.
pub fn mark_installed() {
    INSTALLED.store(true, Ordering::Relaxed);
}

pub struct Stats {
    /// Bytes allocated by the program.
    pub allocated: usize,
    /// Bytes in physically resident pages the allocator holds.
    pub resident: usize,
}

/// The allocator's figures, when jemalloc is the global allocator.
pub fn stats() -> Option<Stats> {
    if !INSTALLED.load(Ordering::Relaxed) {
        return None;
    }
    // Statistics are cached until the epoch advances.
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(Stats {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()?,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()?,
    })
}
