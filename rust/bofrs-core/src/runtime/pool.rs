//! The dedicated rayon pool every heavy call runs on.
//!
//! Its size comes from `BOFRS_NUM_THREADS` (read once, at first use); unset, empty or `0`
//! means one thread per available core.

use std::sync::OnceLock;

/// Environment variable that sizes the pool.
pub const THREADS_ENV: &str = "BOFRS_NUM_THREADS";

/// Values each parallel task handles, about: large enough to amortize scheduling, small enough
/// to balance across cores and stay in L2.
pub const TASK_VALUES: usize = 1 << 15;

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

fn configured_threads() -> usize {
    std::env::var(THREADS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The pool, built on first use.
pub fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(configured_threads())
            .thread_name(|i| format!("bofrs-{i}"))
            .build()
            .unwrap_or_else(|_| {
                // Spawning threads failed (resource limits): fall back to running inline.
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("one-thread pool")
            })
    })
}

/// Number of threads of the pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Blocks per parallel task for a block size.
pub fn blocks_per_task(block_size: usize) -> usize {
    (TASK_VALUES / block_size).max(1)
}
