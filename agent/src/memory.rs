//! The agent lives beside the guests on every host, so it hands memory back.
//! glibc keeps freed memory in per-thread arenas and rarely returns it to the
//! kernel; a scrape's megabytes of text would otherwise stay resident until
//! the next one.
#![allow(unsafe_code)]

/// One malloc arena: the agent's few threads mostly wait on I/O, so more
/// arenas only hold more idle memory. And a fixed mmap threshold: glibc
/// otherwise raises it to the size of the largest block freed, so after the
/// first scrape its megabytes of text come from the heap, where they leave
/// holes between long-lived blocks; mapped, they go back when freed.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called once at start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
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
