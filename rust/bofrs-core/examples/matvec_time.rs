//! Quick timing of the fused matvec kernel (batch 1, NF4, block 64, bf16 activations):
//! `cargo run --release --example matvec_time [out] [in] [reps]`. Prints ms per product per ISA
//! and activation mode, and the weight rate; `BOFRS_NUM_THREADS=1` gives the single-core rate. For exploring kernel
//! variants only: the timing claims come from benches/bench_matvec_vs_peers.py.

use bofrs_core::blockwise::codebook::NF4;
use bofrs_core::blockwise::matvec::{matvec_with_options, Activations, MatShape, PackedMatrix};
use bofrs_core::numeric::element::f32_to_bf16;
use bofrs_core::{Bf16, Codebook, Isa};
use std::time::Instant;

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
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let codes: Vec<u8> = (0..n_out * n_in / 2).map(|_| next() as u8).collect();
    let scales: Vec<f32> = (0..n_out * n_in / bs)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32)
        .collect();
    let x: Vec<Bf16> = (0..batch * n_in)
        .map(|_| {
            Bf16(f32_to_bf16(
                (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0,
            ))
        })
        .collect();
    let cb = Codebook::new(&NF4).unwrap();
    let shape = MatShape {
        out_features: n_out,
        in_features: n_in,
        block_size: bs,
    };
    let weight = PackedMatrix {
        shape,
        codes: &codes,
        scales: &scales,
        codebook: &cb,
    };
    let mut out = vec![0f32; batch * n_out];
    let mut reference: Option<Vec<f32>> = None;
    let modes = Isa::supported()
        .into_iter()
        .flat_map(|i| Activations::ALL.map(|a| (i, a)));
    for (isa, mode) in modes {
        let run =
            |out: &mut [f32]| matvec_with_options(isa, mode, &weight, batch, &x, out).unwrap();
        run(&mut out);
        let mut times = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let r = if isa == Isa::Portable {
                reps / 10 + 1
            } else {
                reps
            };
            for _ in 0..r {
                run(&mut out);
            }
            times.push(start.elapsed().as_secs_f64() / r as f64);
        }
        times.sort_by(f64::total_cmp);
        let med = times[2];
        let diff = reference.as_ref().map_or(0.0, |r| {
            r.iter()
                .zip(&out)
                .map(|(a, b)| ((a - b).abs() / (a.abs() + 1.0)) as f64)
                .fold(0.0, f64::max)
        });
        println!(
            "{:9} {:5} {n_out}x{n_in} batch {batch}: median {:.3} ms, best {:.3} ms, {:.2} Gweights/s, \
             max rel diff vs portable {diff:.2e}",
            isa.name(),
            mode.name(),
            med * 1e3,
            times[0] * 1e3,
            (n_out * n_in * batch) as f64 / med / 1e9
        );
        if reference.is_none() {
            reference = Some(out.clone());
        }
    }
}
