//! Round trip of an empty job through the pool (wake-up + hand-back), and of a small
//! par_iter: `cargo run --release --example pool_time`.
use bofrs_core::runtime::pool::pool;
use rayon::prelude::*;
use std::time::Instant;
fn main() {
    for gap_us in [0u64, 50, 200] {
        let mut t = Vec::new();
        for _ in 0..2000 {
            let spin = Instant::now();
            while spin.elapsed().as_micros() < gap_us as u128 {}
            let s = Instant::now();
            pool().install(|| {
                (0..8).into_par_iter().for_each(|i| {
                    std::hint::black_box(i);
                })
            });
            t.push(s.elapsed().as_secs_f64() * 1e6);
        }
        t.sort_by(f64::total_cmp);
        println!(
            "gap {gap_us} us: median {:.1} us, p90 {:.1} us",
            t[t.len() / 2],
            t[t.len() * 9 / 10]
        );
    }
}
