//! The allocator's settings: mimalloc, the `gateway` binary's global allocator.

use std::ffi::c_long;

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// mimalloc's `mi_option_purge_delay`, in the numbering of the mimalloc (v3) the crate builds
/// (checked by a test against the option's default).
const PURGE_DELAY: mi_option_t = 15;

/// How long memory the process freed stays with it before mimalloc gives it back to the
/// system, in milliseconds (mimalloc's default: 1000).
pub const PURGE_DELAY_MS: c_long = 5_000;

/// Keeps freed memory for [`PURGE_DELAY_MS`] before giving it back to the system. The usage
/// flusher reads and stores a spool segment every `flush_interval` (1 s by default) and then
/// frees it all: with mimalloc's default delay of 1 s, each pass found that memory given back
/// already, and the kernel zeroed every page of it again on first touch (about a third of the
/// flusher's time, and half the metered route's page faults: BENCHMARKS.md). Memory freed
/// after a peak (a new snapshot replacing the old one) is still given back, 5 s later.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` takes any option number and value and may be called at any time
    // from any thread; it stores the value in mimalloc's option table.
    unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_option_set_is_the_purge_delay() {
        // Option 15 is the purge delay where its default is 1000 ms (no other option's is): a
        // mimalloc that numbered its options otherwise fails here, not silently in production.
        // SAFETY: reads an option.
        let default = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(default, 1000);
    }
}
