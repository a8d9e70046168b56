//! Criterion benches of the core: pack and unpack of a bf16 weight, and the fused 4-bit matvec,
//! per kernel variant.
//!
//! `cargo bench` (from the repository root). Sizes: one 4096x11008 LLM projection, and 1M
//! values (cache-resident) to show the kernels without memory traffic.

use bofrs_core::blockwise::codebook::NF4;
use bofrs_core::blockwise::decode::{unpack_with_isa, Packed, StoredScales};
use bofrs_core::blockwise::encode::{pack_with_isa, EncodeOptions};
use bofrs_core::blockwise::matvec::{matvec_with_options, Activations, MatShape, PackedMatrix};
use bofrs_core::numeric::element::f32_to_bf16;
use bofrs_core::{Bf16, BlockLayout, Codebook, Isa, Normalization, ScaleDType};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use synthetic::XorShift;

mod synthetic;

fn weights(n: usize) -> Vec<Bf16> {
    let mut rng = XorShift::new();
    (0..n)
        .map(|_| Bf16(f32_to_bf16(rng.bell() * 0.02)))
        .collect()
}

fn bench(c: &mut Criterion) {
    let codebook = Codebook::new(&NF4).unwrap();
    let block_size: usize = std::env::var("BENCH_BLOCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let options = EncodeOptions {
        codebook: &codebook,
        block_size,
        normalization: Normalization::Absmax,
        scale_dtype: ScaleDType::BFloat16,
    };
    for (label, n) in [("1M", 1usize << 20), ("4096x11008", 4096 * 11008)] {
        let input = weights(n);
        let layout = BlockLayout::new(n, block_size).unwrap();
        let mut codes = vec![0u8; layout.code_bytes()];
        let mut scales = vec![0f32; layout.num_blocks()];
        let mut out = vec![Bf16::default(); n];
        let mut group = c.benchmark_group(format!("nf4-b64-bf16-{label}"));
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(if n > 1 << 22 { 10 } else { 30 });
        for isa in Isa::supported() {
            group.bench_function(BenchmarkId::new("pack", isa.name()), |b| {
                b.iter(|| {
                    pack_with_isa(isa, black_box(&input), &options, &mut codes, &mut scales)
                        .unwrap()
                })
            });
            group.bench_function(BenchmarkId::new("unpack", isa.name()), |b| {
                b.iter(|| {
                    let packed = Packed {
                        codes: black_box(&codes),
                        scales: StoredScales::F32(&scales),
                        codebook: &codebook,
                        block_size,
                        outliers: None,
                    };
                    unpack_with_isa(isa, &packed, &mut out).unwrap()
                })
            });
        }
        group.finish();
    }
}

/// Fused matvec (NF4, block 64, bf16 activations; float and the opt-in int16 / int8 modes) for
/// the Python benchmark's shapes; throughput in weights per second.
fn bench_matvec(c: &mut Criterion) {
    let codebook = Codebook::new(&NF4).unwrap();
    let block_size = 64;
    let options = EncodeOptions {
        codebook: &codebook,
        block_size,
        normalization: Normalization::Absmax,
        scale_dtype: ScaleDType::BFloat16,
    };
    for (out_features, in_features) in [(4096usize, 4096usize), (4096, 11008)] {
        let n = out_features * in_features;
        let layout = BlockLayout::new(n, block_size).unwrap();
        let mut codes = vec![0u8; layout.code_bytes()];
        let mut scales = vec![0f32; layout.num_blocks()];
        pack_with_isa(Isa::best(), &weights(n), &options, &mut codes, &mut scales).unwrap();
        let shape = MatShape::new(out_features, in_features, block_size);
        let mut group = c.benchmark_group(format!("matvec-nf4-b64-{out_features}x{in_features}"));
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(20);
        for batch in [1usize, 4] {
            let x = weights(batch * in_features);
            let mut out = vec![0f32; batch * out_features];
            let variants = Isa::supported()
                .into_iter()
                .flat_map(|i| Activations::ALL.map(|a| (i, a)));
            for (isa, mode) in variants {
                let name = format!("{}-{}", isa.name(), mode.name());
                group.bench_function(BenchmarkId::new(format!("batch{batch}"), name), |b| {
                    b.iter(|| {
                        let weight =
                            PackedMatrix::new(shape, black_box(&codes), &scales, &codebook);
                        matvec_with_options(isa, mode, &weight, batch, &x, &mut out).unwrap()
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench, bench_matvec);
criterion_main!(benches);
