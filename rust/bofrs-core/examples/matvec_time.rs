//! Quick timing of the fused matvec kernel (batch 1, NF4, block 64, bf16 activations):
//! `cargo run --release --example matvec_time [out] [in] [reps]`. Prints ms per product per ISA
//! and activation mode (7 rounds, round-robin over the variants), and the weight rate;
//! `BOFRS_NUM_THREADS=1` gives the single-core rate, `MATVEC_ONLY=avx2-int8,avx512` picks
//! variants, `MATVEC_CPU=1` reports process CPU time instead of wall time. For exploring kernel variants only: the timing claims come from
//! benches/bench_matvec_vs_peers.py.

use bofrs_core::blockwise::codebook::NF4;
use bofrs_core::blockwise::matvec::{matvec_with_options, Activations, MatShape, PackedMatrix};
use bofrs_core::numeric::element::f32_to_bf16;
use bofrs_core::{Bf16, Codebook, Isa};
use std::time::Instant;
use synthetic::XorShift;

#[path = "../../../benches/synthetic.rs"]
mod synthetic;

/// Seconds: wall time, or (`cpu`) CPU time of the whole process (all threads), which a loaded
/// machine's time slicing does not inflate.
fn clock(cpu: bool) -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    if !cpu {
        return START.get_or_init(Instant::now).elapsed().as_secs_f64();
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes are integers"))
        .collect();
    let n_out = args.first().copied().unwrap_or(4096);
    let n_in = args.get(1).copied().unwrap_or(4096);
    let reps = args.get(2).copied().unwrap_or(200);
    let batch = args.get(3).copied().unwrap_or(1);
    let bs = 64;
    let mut rng = XorShift::new();
    let codes: Vec<u8> = (0..n_out * n_in / 2)
        .map(|_| rng.next_u64() as u8)
        .collect();
    let scales: Vec<f32> = (0..n_out * n_in / bs).map(|_| rng.unit()).collect();
    let x: Vec<Bf16> = (0..batch * n_in)
        .map(|_| Bf16(f32_to_bf16(2.0 * rng.unit() - 1.0)))
        .collect();
    let cb = Codebook::new(&NF4).unwrap();
    let shape = MatShape::new(n_out, n_in, bs);
    let weight = PackedMatrix::new(shape, &codes, &scales, &cb);
    let mut out = vec![0f32; batch * n_out];
    let only: Option<Vec<String>> = std::env::var("MATVEC_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let variants: Vec<(Isa, Activations)> = Isa::supported()
        .into_iter()
        .flat_map(|i| Activations::ALL.map(|a| (i, a)))
        .filter(|(i, a)| {
            only.as_ref().is_none_or(|o| {
                o.iter()
                    .any(|n| *n == format!("{}-{}", i.name(), a.name()) || n == i.name())
            })
        })
        .collect();
    let cpu = std::env::var("MATVEC_CPU").is_ok_and(|v| v == "1");
    let mut results: Vec<Vec<f32>> = Vec::new();
    let mut times = vec![Vec::new(); variants.len()];
    // Round-robin over the variants (a shared machine's load hits all of them alike).
    for _ in 0..7 {
        for (k, &(isa, mode)) in variants.iter().enumerate() {
            let run =
                |out: &mut [f32]| matvec_with_options(isa, mode, &weight, batch, &x, out).unwrap();
            run(&mut out);
            let r = if isa == Isa::Portable {
                reps / 10 + 1
            } else {
                reps
            };
            let start = clock(cpu);
            for _ in 0..r {
                run(&mut out);
            }
            times[k].push((clock(cpu) - start) / r as f64);
            if results.len() <= k {
                results.push(out.clone());
            }
        }
    }
    let bytes = (n_out * n_in / 2 + n_out * n_in / bs * 4) as f64;
    for (k, &(isa, mode)) in variants.iter().enumerate() {
        let t = &mut times[k];
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        let diff = results[k]
            .iter()
            .zip(&results[0])
            .map(|(a, b)| ((a - b).abs() / (a.abs() + 1.0)) as f64)
            .fold(0.0, f64::max);
        println!(
            "{:7} {:5} {n_out}x{n_in} batch {batch}: median {:.3} ms, best {:.3} ms, {:.2} Gweights/s, \
             {:.1} GB/s (codes + f32 scales), max rel diff vs first {diff:.2e}",
            isa.name(),
            mode.name(),
            med * 1e3,
            t[0] * 1e3,
            (n_out * n_in * batch) as f64 / med / 1e9,
            bytes / med / 1e9,
        );
    }
}
