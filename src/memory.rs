//! Giving the allocator's free memory back to the system.
//!
//! The store allocates and frees in many small pieces (mailbox chunks, decoded records), so
//! after recovery, a wave of acks or a sweep of idle mailboxes much of the heap can be free but
//! still resident: glibc returns free pages in the middle of its heap only when asked, and
//! mimalloc (the relay binary's allocator with the `mimalloc` feature) after a delay, or at
//! once when asked.

/// Store bytes a sweep must see freed (payload removed since the last release, plus growth
/// room trimmed) before the relay asks the allocator to give free pages back: the call walks
/// the whole heap, so it is kept for changes worth it.
pub const RELEASE_AFTER_FREED_BYTES: u64 = 64 * 1024 * 1024;

/// Hands the allocator's free pages back to the system (both glibc's and mimalloc's: which
/// one serves Rust's allocations depends on the binary; a no-op for neither).
pub fn release_free_memory() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: mi_collect only returns mimalloc's free memory to the system.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free memory of the allocator back to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
