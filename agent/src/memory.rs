//! The agent lives beside the guests on every host, so it hands memory back.
//! glibc keeps freed memory in per-thread arenas and rarely returns it to the
//! kernel; a scrape's megabytes of text would otherwise stay resident until
//! the next one.
#![allow(unsafe_code)]

/// At most two malloc arenas: the agent's threads mostly wait on I/O, so
/// more arenas only hold more idle memory.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once at start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap pages to the kernel.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
