//! Memory given back to the system after a burst of work. glibc keeps what
//! its arenas freed for the next allocation; after the reconciler's pass
//! over every record (tens of MiB held for a moment at 100,000 volumes) that
//! memory would stay resident until the process ends. `give_back_freed`
//! returns the free pages (glibc's `malloc_trim`); elsewhere it does nothing.

/// Returns the allocator's free pages to the system. Costs a walk over the
/// free lists: call it after a burst, not per request.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back_freed() {
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_freed() {}
