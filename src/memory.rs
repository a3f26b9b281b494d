//! Memory the process keeps from the system. glibc gives threads that
//! allocate at once their own malloc arenas and keeps what was freed for
//! the next allocation. `limit_arenas` (at start) caps the arenas;
//! `give_back_freed` (after a burst of work, such as the reconciler's pass
//! over every record, tens of MiB held for a moment at 100,000 volumes)
//! returns the free pages. Both are glibc's; elsewhere they do nothing.

/// Cap glibc's malloc arenas at two. By default a process gets up to 8
/// per core, and each keeps what was freed in it: with tokio's worker and
/// blocking threads, the standalone holding 100,000 volumes reached 200
/// MiB of RSS; with two arenas the same run measured 124 to 127 MiB
/// (docs/benchmarks.md, "Many volumes"). An operator's MALLOC_ARENA_MAX or
/// GLIBC_TUNABLES wins. Call it first in `main`: arenas made before it
/// stay.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt sets an allocator parameter under glibc's own lock.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}

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
