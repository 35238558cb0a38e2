//! The allocator's housekeeping: freed memory goes back to the kernel within about a
//! second of going unused, also on a node that has gone quiet.
//!
//! mimalloc (the global allocator, `src/main.rs`) returns ("purges") free pages only
//! after a delay, and only when some thread calls into it: by default 1 s for a page and
//! 10 times that for its arenas, checked on allocations. After a burst of misses the
//! threads go idle, so the pages the burst freed (its buffers, between the cache's
//! long-lived entries) stayed resident for good: 10,000 new names left 13.5 MiB resident,
//! still 13.5 MiB 12 s later. With [`PURGE_DELAY_MS`] and [`collect`] once a second:
//! 12.0 MiB 2 s after the load and 11.5 MiB after 12 s (the peer table's "+10k": 11.6).
//! Purging at once instead costs a page fault per query on the miss path (11,800 minor
//! faults per 10,000 misses instead of 1,500-1,700, and about 15% more CPU).
#![allow(unsafe_code)]

use std::time::Duration;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`, mimalloc v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// A page unused this long is purged; arenas wait ten times as long (mimalloc's
/// `arena_purge_mult`). mimalloc v2 used 10 ms.
pub const PURGE_DELAY_MS: i64 = 100;
/// How often [`collect`] should run.
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Set the purge delay, unless the environment sets it (`MIMALLOC_PURGE_DELAY`, which
/// mimalloc reads itself). Call it first in `main`, before any other thread starts:
/// mimalloc's option setters are not thread-safe.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain value store into mimalloc's option table (an in-range option,
        // no pointers); only the main thread runs at this point.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
    }
}

/// Purge what has been free longer than the delay: the calling thread's retired pages
/// and every arena's expired free ranges (those are process-wide).
pub fn collect() {
    // SAFETY: mimalloc's collection entry point, thread-safe, takes no pointers.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// Run [`collect`] every [`COLLECT_EVERY`] on the current tokio runtime, until it stops.
pub fn spawn_collector() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(COLLECT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            collect();
        }
    })
}
