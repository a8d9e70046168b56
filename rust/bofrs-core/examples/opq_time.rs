//! Quick timing of the core pack with and without OPQ / dq8 (one run, minima of wall and
//! process CPU time, ratios):
//! `cargo run --release --example opq_time [isa] [variant]`; with a variant, just loops it (for perf).
//! Outliers are laid out as `bofrs.pack` does (parts, then uint32 indices and u16 values).

use bofrs_core::blockwise::codebook::NF4;
use bofrs_core::blockwise::encode::{
    pack_ext_parts_with_isa, split_outliers, EncodeOptions, PackBuffers, PackExtras,
};
use bofrs_core::blockwise::opq::{OpqOptions, OutlierDType};
use bofrs_core::numeric::element::f32_to_bf16;
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::{Bf16, Codebook, Isa, Normalization, ScaleDType};
use std::time::Instant;
use synthetic::XorShift;

#[path = "../../../benches/synthetic.rs"]
mod synthetic;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// Process CPU time in seconds (all threads): less disturbed than wall time on a busy machine.
fn cpu_seconds() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: CLOCK_PROCESS_CPUTIME_ID (2) with a valid out-pointer.
    unsafe { clock_gettime(2, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// The core work of `bofrs.pack`: pack, then the outliers as index and value arrays.
fn pack_like_python(
    isa: Isa,
    input: &[Bf16],
    opts: &EncodeOptions<'_>,
    extras: &PackExtras,
    buffers: PackBuffers<'_>,
) -> (Vec<u32>, Vec<u16>) {
    let t0 = Instant::now();
    let parts = pack_ext_parts_with_isa(isa, input, opts, extras, buffers).unwrap();
    let t1 = Instant::now();
    let total = parts.total();
    let (mut indices, mut values) = (zeroed_vec::<u32>(total), zeroed_vec::<u16>(total));
    split_outliers(&parts, |i| i as u32, &mut indices, &mut values);
    let t2 = Instant::now();
    drop(parts);
    let t3 = Instant::now();
    if std::env::var("PHASES").is_ok() {
        eprintln!(
            "pack {:.2} split {:.2} drop {:.2} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3
        );
    }
    (indices, values)
}

fn main() {
    let n: usize = std::env::var("SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096 * 4096);
    // HEAVY=t4: Student-t(4); HEAVY=1: another heavy tail; unset: about N(0, 1/3).
    let heavy = std::env::var("HEAVY").ok();
    let mut rng = XorShift::new();
    let input: Vec<Bf16> = (0..n)
        .map(|_| {
            let acc = rng.bell();
            let u = rng.unit() + 1.0 / (1u64 << 24) as f32;
            let value = match heavy.as_deref() {
                // Student-t(4): normal / sqrt(chi2_4 / 4), chi2_4 = -2 ln(u1 u2).
                Some("t4") => {
                    let [a, b, c, d] = [(); 4].map(|_| rng.open_unit_f64());
                    let normal = (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos();
                    (normal / (-0.5 * (c * d).ln()).sqrt()) as f32
                }
                Some(_) => acc / u.powf(0.25),
                None => acc,
            };
            Bf16(f32_to_bf16(value))
        })
        .collect();
    let cb = Codebook::new(&NF4).unwrap();
    let opts = EncodeOptions {
        codebook: &cb,
        block_size: 64,
        // NORM=signed: signed absmax (as BOF4-S).
        normalization: if std::env::var("NORM").is_ok_and(|v| v == "signed") {
            Normalization::SignedAbsmax
        } else {
            Normalization::Absmax
        },
        scale_dtype: ScaleDType::BFloat16,
    };
    let mut codes = vec![0u8; n / 2];
    let mut scales = vec![0f32; n / 64];
    let mut sc = vec![0u8; n / 64];
    let mut sp = vec![0f32; 2 * n / 64 / 256];
    let variants: Vec<(&str, PackExtras)> = vec![
        ("plain", PackExtras::default()),
        (
            "opq95",
            PackExtras {
                opq: Some(OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap()),
                double_quant: false,
            },
        ),
        (
            "dq8",
            PackExtras {
                opq: None,
                double_quant: true,
            },
        ),
    ];
    let isa = std::env::args()
        .nth(1)
        .and_then(|s| Isa::parse(&s))
        .unwrap_or(Isa::best());
    if let Ok(pattern) = std::env::var("PATTERN") {
        // e.g. PATTERN=pppo: per position, the median wall time over ROUNDS repetitions.
        let rounds: usize = std::env::var("ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let mut times = vec![Vec::new(); pattern.len()];
        for _ in 0..rounds {
            for (k, c) in pattern.chars().enumerate() {
                let ex = if c == 'o' {
                    variants[1].1
                } else {
                    variants[0].1
                };
                let t = Instant::now();
                let b = PackBuffers {
                    codes: &mut codes,
                    scales: &mut scales,
                    scale_codes: &mut [],
                    scale_params: &mut [],
                };
                pack_like_python(isa, &input, &opts, &ex, b);
                times[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        for (k, c) in pattern.chars().enumerate() {
            times[k].sort_by(f64::total_cmp);
            println!(
                "{k} {c}: median {:.2} min {:.2}",
                times[k][times[k].len() / 2],
                times[k][0]
            );
        }
        return;
    }
    if let Some(only) = std::env::args().nth(2) {
        let ex = variants.iter().find(|v| v.0 == only).unwrap().1;
        let dq = ex.double_quant;
        let iterations = std::env::var("ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        for _ in 0..iterations {
            let b = PackBuffers {
                codes: &mut codes,
                scales: &mut scales,
                scale_codes: if dq { &mut sc } else { &mut [] },
                scale_params: if dq { &mut sp } else { &mut [] },
            };
            pack_like_python(isa, &input, &opts, &ex, b);
        }
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut walls = vec![Vec::new(); variants.len()];
    let mut cpus = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (k, (_, ex)) in variants.iter().enumerate() {
            let dq = ex.double_quant;
            let t = Instant::now();
            let c = cpu_seconds();
            let b = PackBuffers {
                codes: &mut codes,
                scales: &mut scales,
                scale_codes: if dq { &mut sc } else { &mut [] },
                scale_params: if dq { &mut sp } else { &mut [] },
            };
            pack_like_python(isa, &input, &opts, ex, b);
            walls[k].push(t.elapsed().as_secs_f64());
            cpus[k].push(cpu_seconds() - c);
        }
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let mut rows = Vec::new();
    for k in 0..variants.len() {
        rows.push((stats(&mut walls[k]), stats(&mut cpus[k])));
    }
    for (k, (name, _)) in variants.iter().enumerate() {
        let ((wmin, wmed), (cmin, cmed)) = rows[k];
        let ((bwmin, bwmed), (bcmin, bcmed)) = rows[0];
        println!(
            "{name:6}: wall min {:6.2} ms ({:.2}x) median {:6.2} ms ({:.2}x) | cpu min {:6.2} ({:.2}x) median {:6.2} ({:.2}x)",
            wmin * 1e3, wmin / bwmin, wmed * 1e3, wmed / bwmed, cmin * 1e3, cmin / bcmin, cmed * 1e3, cmed / bcmed
        );
    }
}
