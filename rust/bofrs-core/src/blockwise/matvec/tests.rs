//! Tests of the fused matvec: every ISA and activation mode against a float64 reference.

use super::*;
use crate::blockwise::codebook::{FP4, NF4};
use crate::numeric::element::{Bf16, F16};
use crate::testing::uniform;
use quant::{quantize_activations, Order};

/// A uniform value in [-1, 1).
fn lcg(state: &mut u64) -> f64 {
    uniform(state) * 2.0 - 1.0
}

/// Random codes and scales for `shape`, every fifth scale (from the fourth) zero.
fn random_weight(st: &mut u64, shape: MatShape) -> (Vec<u8>, Vec<f32>) {
    let n = shape.out_features * shape.in_features;
    let codes = (0..n / 2)
        .map(|_| ((lcg(st) + 1.0) * 128.0) as u8)
        .collect();
    let scales = (0..n / shape.block_size)
        .map(|b| {
            if b % 5 == 3 {
                0.0
            } else {
                lcg(st) as f32 * 3.0
            }
        })
        .collect();
    (codes, scales)
}

/// Code `k` of a packed row-major weight.
fn code(codes: &[u8], k: usize) -> u8 {
    if k % 2 == 0 {
        codes[k / 2] >> 4
    } else {
        codes[k / 2] & 15
    }
}

/// Float64 reference and the bound on |error| of an f32 evaluation.
fn reference(
    shape: MatShape,
    codes: &[u8],
    scales: &[f32],
    levels: &[f32; 16],
    x: &[f32],
    batch: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (n_in, n_out) = (shape.in_features, shape.out_features);
    let mut y = vec![0f64; batch * n_out];
    let mut mag = vec![0f64; batch * n_out];
    for b in 0..batch {
        for o in 0..n_out {
            for i in 0..n_in {
                let k = o * n_in + i;
                let c = code(codes, k);
                let w = levels[c as usize] as f64 * scales[k / shape.block_size] as f64;
                y[b * n_out + o] += w * x[b * n_in + i] as f64;
                mag[b * n_out + o] += (w * x[b * n_in + i] as f64).abs();
            }
        }
    }
    (y, mag)
}

/// `batch` rows of `x` through `weight` in this variant and mode, into a NaN-filled output.
fn product<X: Element>(
    isa: Isa,
    mode: Activations,
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
) -> Result<Vec<f32>> {
    let mut out = vec![f32::NAN; batch * weight.shape.out_features];
    matvec_with_options(isa, mode, weight, batch, x, &mut out).map(|()| out)
}

/// Calls `check(st, weight, batch)` with random weights (codes and scales from `st`) of every
/// codebook in `books` and every `(out, in, block size)` in `shapes`, for every batch size.
fn on_random_weights(
    st: &mut u64,
    books: &[[f32; 16]],
    shapes: &[(usize, usize, usize)],
    batches: std::ops::RangeInclusive<usize>,
    mut check: impl FnMut(&mut u64, &PackedMatrix<'_>, usize),
) {
    for levels in books {
        let cb = Codebook::new(levels).unwrap();
        for &(n_out, n_in, bs) in shapes {
            let shape = MatShape::new(n_out, n_in, bs);
            let (codes, scales) = random_weight(st, shape);
            for batch in batches.clone() {
                check(st, &PackedMatrix::new(shape, &codes, &scales, &cb), batch);
            }
        }
    }
}

/// `n` values `10 * lcg`, multiplied by `big` where `i % big_every == 0` and set to `zero`
/// where `i % zero_every == zero_at` (`zero_every` 0: nowhere): mixed magnitudes and zeros.
fn spiky(
    st: &mut u64,
    n: usize,
    (big_every, big): (usize, f32),
    zero: (usize, usize, f32),
) -> Vec<f32> {
    let (zero_every, zero_at, zero_value) = zero;
    (0..n)
        .map(|i| {
            let v = lcg(st) as f32 * 10.0;
            if i % big_every == 0 {
                v * big
            } else if zero_every > 0 && i % zero_every == zero_at {
                zero_value
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn every_isa_matches_the_float64_reference() {
    let shapes = [
        (1, 16, 16),
        (3, 48, 16),
        (5, 64, 64),
        (6, 192, 64),
        (7, 96, 32),
        (33, 256, 128),
        (4, 576, 64),
        (3, 1152, 128),
        (2, 2048, 256),
        (3, 80, 16),
        (2, 160, 32),
        (17, 4096, 4096),
        (2, 0, 64),
    ];
    on_random_weights(&mut 7, &[NF4, FP4], &shapes, 1..=9, |st, w, batch| {
        let (shape, n_in) = (w.shape, w.shape.in_features);
        // Mixed magnitudes (1e-6 to 1e4), exact zeros and negative zeros.
        let x: Vec<f32> = (0..batch * n_in)
            .map(|i| {
                let v = lcg(st) as f32 * 10.0;
                match i % 13 {
                    0 => v * 1e3,
                    5 => v * 1e-7,
                    7 => 0.0,
                    9 => -0.0,
                    _ => v,
                }
            })
            .collect();
        let levels = w.codebook.levels();
        let (want, mag) = reference(shape, w.codes, w.scales, levels, &x, batch);
        for isa in Isa::supported() {
            let got = product(isa, Activations::Float, w, batch, &x);
            assert!(got.is_ok(), "{isa:?} {shape:?}: {got:?}");
            let out = got.unwrap();
            for (k, (&g, (&w, &m))) in out.iter().zip(want.iter().zip(&mag)).enumerate() {
                let tol = m * (n_in as f64 + 4.0) * f32::EPSILON as f64 + 1e-30;
                assert!(
                    (g as f64 - w).abs() <= tol,
                    "{isa:?} {shape:?} batch={batch} k={k}: {g} vs {w} (tol {tol})"
                );
            }
        }
    });
}

/// Group size and largest integer of an integer activation mode.
fn group_and_qmax(mode: Activations) -> (usize, f32) {
    match mode {
        Activations::Int16 => (<i16 as QInt>::GROUP, <i16 as QInt>::QMAX),
        Activations::Int8 => (<i8 as QInt>::GROUP, <i8 as QInt>::QMAX),
        Activations::Float => unreachable!("the float path is not quantized"),
    }
}

/// Every (integer mode, supported ISA) pair.
fn integer_cases() -> Vec<(Activations, Isa)> {
    [Activations::Int16, Activations::Int8]
        .into_iter()
        .flat_map(|m| Isa::supported().into_iter().map(move |i| (m, i)))
        .collect()
}

/// Bound on |error| of an integer path: the quantization of levels and activations
/// ([`quant::error_bound_terms`]) plus f32 rounding of the sums.
fn quantized_bound(
    mode: Activations,
    shape: MatShape,
    codes: &[u8],
    scales: &[f32],
    levels: &[f32; 16],
    x: &[f32],
    batch: usize,
) -> Vec<f64> {
    let (n_in, n_out) = (shape.in_features, shape.out_features);
    let (group, qmax) = group_and_qmax(mode);
    let top = levels.iter().fold(0f32, |m, l| m.max(l.abs()));
    let dl = top / qmax;
    let mut bound = vec![0f64; batch * n_out];
    for b in 0..batch {
        let xb = &x[b * n_in..(b + 1) * n_in];
        let d: Vec<f32> = xb
            .chunks(group)
            .map(|g| g.iter().fold(0f32, |m, v| m.max(v.abs())) / qmax)
            .collect();
        for o in 0..n_out {
            let mut q = 0f64;
            let mut mag = 0f64;
            for i in 0..n_in {
                let k = o * n_in + i;
                let c = code(codes, k);
                let l = levels[c as usize];
                let s = scales[k / shape.block_size].abs() as f64;
                let dg = d[i / group];
                q += s * quant::error_bound_terms(l, xb[i], dg, dl);
                mag += s * (l.abs() as f64 + dl as f64) * (xb[i].abs() as f64 + dg as f64);
            }
            bound[b * n_out + o] =
                q * 1.001 + mag * (n_in as f64 + 8.0) * f32::EPSILON as f64 + 1e-30;
        }
    }
    bound
}

#[test]
fn integer_activations_stay_within_their_error_bound() {
    let shapes = [
        (1, 16, 16),
        (3, 48, 16),
        (4, 80, 16),
        (7, 96, 32),
        (5, 64, 64),
        (6, 192, 64),
        (33, 256, 128),
        (4, 576, 64),
        (3, 1152, 128),
        (2, 2048, 256),
        (17, 4096, 4096),
        (2, 0, 64),
    ];
    on_random_weights(&mut 11, &[NF4, FP4], &shapes, 1..=9, |st, w, batch| {
        let shape = w.shape;
        // Mixed magnitudes per group (the quantization step follows the largest).
        let x = spiky(st, batch * shape.in_features, (7, 100.0), (64, 5, 0.0));
        let levels = w.codebook.levels();
        let (want, _) = reference(shape, w.codes, w.scales, levels, &x, batch);
        for (mode, isa) in integer_cases() {
            let bound = quantized_bound(mode, shape, w.codes, w.scales, levels, &x, batch);
            let got = product(isa, mode, w, batch, &x);
            assert!(got.is_ok(), "{mode:?} {isa:?} {shape:?}: {got:?}");
            let out = got.unwrap();
            for (k, (&g, (&w, &t))) in out.iter().zip(want.iter().zip(&bound)).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= t,
                    "{mode:?} {isa:?} {shape:?} batch={batch} k={k}: {g} vs {w} \
                     (bound {t})"
                );
            }
        }
    });
}

#[test]
fn integer_orders_are_permutations_and_zero_rows_stay_zero() {
    for n in [16, 32, 48, 64, 128] {
        // Distinct magnitudes within each group, so a misplaced value shows.
        let x: Vec<f32> = (0..n).map(|i| ((i % 32) + 1) as f32).collect();
        let orders: &[Order] = if n % 64 == 0 {
            &[Order::Step32, Order::Step64]
        } else {
            &[Order::Step32]
        };
        for &order in orders {
            let q: Quantized<i16> = quantize_activations(&x, 1, n, order);
            let mut seen: Vec<i16> = q.q.clone();
            seen.sort_unstable();
            let mut natural = quantize_activations::<_, i16>(&x, 1, n, Order::Natural).q;
            natural.sort_unstable();
            assert_eq!(seen, natural, "{order:?} n={n}");
        }
        let natural: Quantized<i8> = quantize_activations(&x, 1, n, Order::Natural);
        let step32: Quantized<i8> = quantize_activations(&x, 1, n, Order::Step32);
        for j in 0..n {
            // Step32: per 32, the even values then the odd ones.
            let to = 32 * (j / 32) + 16 * (j % 2) + (j % 32) / 2;
            assert_eq!(step32.q[to], natural.q[j], "step32 n={n} j={j}");
        }
        if n % 64 == 0 {
            let step64: Quantized<i8> = quantize_activations(&x, 1, n, Order::Step64);
            for j in 0..n {
                let (c, r) = ((j % 64) / 32, j % 32);
                let to = 64 * (j / 64) + 32 * (r % 2) + 16 * c + r / 2;
                assert_eq!(step64.q[to], natural.q[j], "step64 n={n} j={j}");
            }
            for (g, &d) in natural.d.iter().enumerate() {
                let lane = (g / 2) * 8 + (g % 2) * 4;
                assert_eq!(step64.lane_steps[lane..lane + 4], [d; 4], "n={n} g={g}");
            }
        }
    }
    // All-zero activations: zero step, zero outputs (no 0/0).
    let cb = Codebook::new(&NF4).unwrap();
    let shape = MatShape::new(3, 128, 64);
    let codes = vec![0x5Au8; 3 * 64];
    for (mode, isa) in integer_cases() {
        let w = PackedMatrix::new(shape, &codes, &[1.0; 6], &cb);
        let out = product(isa, mode, &w, 1, &[0f32; 128]).unwrap();
        assert_eq!(out, vec![0.0; 3], "{mode:?} {isa:?}");
    }
}

#[test]
fn integer_paths_give_non_finite_outputs_for_non_finite_activations() {
    let cb = Codebook::new(&NF4).unwrap();
    for bs in [16, 64] {
        let shape = MatShape::new(2, 128, bs);
        let codes = vec![0x9Fu8; 128];
        let scales = vec![1f32; 256 / bs];
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![1f32; 128];
            x[70] = bad;
            for (mode, isa) in integer_cases() {
                let mut out = vec![0f32; 2];
                matvec_with_options(
                    isa,
                    mode,
                    &PackedMatrix::new(shape, &codes, &scales, &cb),
                    1,
                    &x,
                    &mut out,
                )
                .unwrap();
                assert!(
                    out.iter().all(|v| !v.is_finite()),
                    "{mode:?} {isa:?} bs={bs} {bad}: {out:?}"
                );
            }
        }
    }
}

#[test]
fn activation_modes_parse_by_name() {
    for a in Activations::ALL {
        assert_eq!(Activations::parse(a.name()), Some(a));
    }
    assert_eq!(Activations::parse("int4"), None);
    assert_eq!(Activations::default(), Activations::Float);
}

#[test]
fn half_activations_widen_exactly() {
    let cb = Codebook::new(&NF4).unwrap();
    let shape = MatShape::new(4, 64, 32);
    let codes: Vec<u8> = (0..128).map(|i| (i * 29 + 3) as u8).collect();
    let scales = vec![0.5f32, -2.0, 1.25, 3.0, 0.0, 1.0, 7.0, 0.125];
    let w = PackedMatrix::new(shape, &codes, &scales, &cb);
    let xf: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) * 0.25).collect();
    let xb: Vec<Bf16> = xf
        .iter()
        .map(|&v| Bf16(crate::numeric::element::f32_to_bf16(v)))
        .collect();
    let xh: Vec<F16> = xf
        .iter()
        .map(|&v| F16(crate::numeric::element::f32_to_f16(v)))
        .collect();
    for isa in Isa::supported() {
        let a = product(isa, Activations::Float, &w, 2, &xf).unwrap();
        let b = product(isa, Activations::Float, &w, 2, &xb).unwrap();
        let h = product(isa, Activations::Float, &w, 2, &xh).unwrap();
        assert_eq!(a, b, "{isa:?}");
        assert_eq!(a, h, "{isa:?}");
    }
}

#[test]
fn reports_the_first_non_finite_scale_across_tasks() {
    let cb = Codebook::new(&NF4).unwrap();
    // Above the inline limit, 16 rows per task: the bad scales sit in tasks 12 and 17.
    let shape = MatShape::new(320, 4096, 64);
    let codes = vec![0x37u8; 320 * 2048];
    let x = vec![1f32; 2 * 4096];
    for mode in Activations::ALL {
        for isa in Isa::supported() {
            let mut scales = vec![1f32; 320 * 64];
            scales[280 * 64 + 3] = f32::INFINITY;
            scales[200 * 64 + 9] = f32::NAN;
            for batch in [1, 2] {
                let w = PackedMatrix::new(shape, &codes, &scales, &cb);
                let got = product(isa, mode, &w, batch, &x[..batch * 4096]);
                let message = format!("{:?}", got.unwrap_err());
                assert!(
                    message.contains(&format!("scale of block {}", 200 * 64 + 9)),
                    "{mode:?} {isa:?}: {message}"
                );
            }
        }
    }
}

#[test]
fn rejects_bad_shapes_and_buffers() {
    let cb = Codebook::new(&NF4).unwrap();
    let shape = MatShape::new(2, 64, 64);
    let (codes, scales, x) = (vec![0u8; 64], vec![1f32; 2], vec![1f32; 64]);
    let mut out = vec![0f32; 2];
    let run = |shape, codes, scales, x: &[f32], out: &mut [f32]| {
        matvec(&PackedMatrix::new(shape, codes, scales, &cb), 1, x, out)
    };
    assert!(run(shape, &codes, &scales, &x, &mut out).is_ok());
    assert!(run(shape, &codes[..63], &scales, &x, &mut out).is_err());
    assert!(run(shape, &codes, &scales[..1], &x, &mut out).is_err());
    assert!(run(shape, &codes, &scales, &x[..63], &mut out).is_err());
    assert!(run(shape, &codes, &scales, &x, &mut out[..1]).is_err());
    assert!(run(shape, &codes, &[1.0, f32::INFINITY], &x, &mut out).is_err());
    let odd = MatShape {
        in_features: 48,
        block_size: 32,
        ..shape
    };
    assert!(run(odd, &codes[..48], &scales, &x[..48], &mut out).is_err());
    let bad_bs = MatShape {
        block_size: 48,
        ..shape
    };
    assert!(run(bad_bs, &codes, &scales, &x, &mut out).is_err());
}

#[test]
fn avx512_integer_paths_equal_avx2_bit_for_bit() {
    if !Isa::Avx512.is_supported() {
        eprintln!("skipped: this CPU has no AVX-512 (VNNI, VBMI)");
        return;
    }
    let shapes = [
        (3, 48, 16),
        (5, 96, 32),
        (5, 64, 64),
        (6, 192, 64),
        (4, 576, 64),
        (3, 1152, 128),
        (2, 2048, 256),
        (3, 640, 128),
        (9, 4096, 4096),
    ];
    on_random_weights(&mut 23, &[NF4, FP4], &shapes, 1..=6, |st, w, batch| {
        let x = spiky(st, batch * w.shape.in_features, (11, 300.0), (37, 1, -0.0));
        for mode in [Activations::Int16, Activations::Int8] {
            let bits = |isa| -> Vec<u32> {
                let out = product(isa, mode, w, batch, &x).unwrap();
                out.iter().map(|v| v.to_bits()).collect()
            };
            assert_eq!(
                bits(Isa::Avx2),
                bits(Isa::Avx512),
                "{mode:?} {:?} batch={batch}",
                w.shape
            );
        }
    });
}

#[test]
fn avx512_orders_place_every_value_once() {
    // The AVX-512 kernels' activation orders are permutations of each 128-value chunk.
    for dest in [
        <i8 as QInt>::layout(Order::Step128).dest,
        <i16 as QInt>::layout(Order::Step128).dest,
    ] {
        let mut seen = [false; 128];
        for j in 0..128 {
            let to = dest(j);
            assert!(to < 128 && !seen[to], "j={j} -> {to}");
            seen[to] = true;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The int16 order inverts the kernel's byte permutation: weight j's code byte sits
        // where the order puts weight j (nibble r of permuted word w -> 32 r + w).
        for j in 0..128 {
            let to = avx512::int16_dest(j);
            let (r, word) = (to / 32, to % 32);
            let at = 2 * word + r / 2;
            assert_eq!(avx512::int16_byte_source(at / 4)[at % 4], j / 2, "j={j}");
            assert_eq!(
                r % 2 == 1,
                j % 2 == 0,
                "j={j}: high nibbles are the odd registers"
            );
        }
        let mut seen = [false; 128];
        for j in 0..128 {
            let to = avx512::float_dest(j);
            assert!(!seen[to]);
            seen[to] = true;
        }
    }
}

#[test]
fn float_path_gives_non_finite_outputs_for_non_finite_activations() {
    let cb = Codebook::new(&NF4).unwrap();
    // Odd lengths: the bad value in a partial last chunk of the 128-weight AVX-512 kernel too.
    for (n_in, bs, at) in [(128, 16, 70), (192, 64, 150), (576, 64, 560), (96, 32, 3)] {
        let shape = MatShape::new(3, n_in, bs);
        let codes = vec![0x9Fu8; 3 * n_in / 2];
        let scales = vec![1f32; 3 * n_in / bs];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for batch in [1, 2, 5] {
                let mut x = vec![1f32; batch * n_in];
                x[(batch - 1) * n_in + at] = bad;
                for isa in Isa::supported() {
                    let mut out = vec![0f32; batch * 3];
                    let w = PackedMatrix::new(shape, &codes, &scales, &cb);
                    matvec_with_options(isa, Activations::Float, &w, batch, &x, &mut out).unwrap();
                    let (first, last) = out.split_at((batch - 1) * 3);
                    assert!(
                        last.iter().all(|v| !v.is_finite()) && first.iter().all(|v| v.is_finite()),
                        "{isa:?} n_in={n_in} bs={bs} batch={batch} {bad}: {out:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn unsupported_variants_are_errors_not_crashes() {
    let cb = Codebook::new(&NF4).unwrap();
    let shape = MatShape::new(2, 128, 64);
    let (codes, scales, x) = (vec![0u8; 128], vec![1f32; 4], vec![1f32; 128]);
    let w = PackedMatrix::new(shape, &codes, &scales, &cb);
    for isa in Isa::ALL {
        for mode in Activations::ALL {
            let got = product(isa, mode, &w, 1, &x);
            assert_eq!(got.is_ok(), isa.is_supported(), "{isa:?} {mode:?}: {got:?}");
        }
    }
}

#[test]
fn default_variants_are_supported_and_integer_modes_skip_avx512() {
    assert_eq!(default_isa(Activations::Float), Isa::best());
    for mode in [Activations::Int16, Activations::Int8] {
        let isa = default_isa(mode);
        assert!(
            isa.is_supported() && isa != Isa::Avx512,
            "{mode:?}: {isa:?}"
        );
        assert_eq!(isa, Isa::best().min(Isa::Avx2));
    }
}
