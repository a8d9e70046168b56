//! Tests of the OPQ rule, its kernels and the pass.

use super::*;
use crate::blockwise::codebook::Normalization;
use crate::numeric::element::{f32_to_bf16, Bf16, Element, F16};
use crate::numeric::gauss::normal_cdf;
use crate::testing::uniform;

#[test]
fn upper_quantile_inverts_the_tail() {
    for &tail in &[
        1e-300, 1e-20, 1e-9, 1e-4, 0.01, 0.02425, 0.1, 0.3, 0.5, 0.7, 0.99,
    ] {
        let z = normal_upper_quantile(tail);
        let back = normal_cdf(-z);
        assert!(
            (back - tail).abs() <= 1e-12 * tail,
            "tail={tail} z={z} back={back}"
        );
    }
    // Published values.
    assert!((normal_upper_quantile(0.025) - 1.959963984540054).abs() < 1e-14);
    assert!((normal_upper_quantile(0.5)).abs() < 1e-15);
}

#[test]
fn threshold_matches_definition() {
    // t(64, 0.95): P(max |z| <= t) over 64 normals = 0.95.
    for &(n, q) in &[
        (64usize, 0.95f64),
        (16, 0.99),
        (4096, 0.5),
        (1, 0.95),
        (3, 0.1),
    ] {
        let t = threshold(n, q);
        let p_max = (2.0 * normal_cdf(t) - 1.0).powi(n as i32);
        assert!((p_max - q).abs() < 1e-12, "n={n} q={q} t={t} p={p_max}");
    }
}

#[test]
fn limit_is_sigma_times_t_squared() {
    let x: Vec<f32> = (0..37)
        .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 11.0)
        .collect();
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 37.0;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 36.0;
    let th = Threshold::new(37, 0.9);
    let want = var * threshold(37, 0.9).powi(2);
    assert!((th.limit2(block_sums(&x)) - want).abs() < 1e-12 * want);
    let th64 = Threshold::new(64, 0.95);
    assert_eq!(th64.limit2(block_sums(&[3.5f32; 64])), 0.0);
    assert_eq!(Threshold::new(1, 0.95).limit2(block_sums(&[3.5f32])), 0.0);
    assert_eq!(block_sums::<f32>(&[]), (0.0, 0.0));
}

/// f32 sums in one sequential pass (the worst order for the error bound's assumptions is
/// covered by the bound; this is one legitimate order).
fn f32_sums(x: &[f32]) -> (f32, f32) {
    let k = x[0];
    x.iter().fold((0f32, 0f32), |(s, q), &v| {
        let d = v - k;
        (s + d, d.mul_add(d, q))
    })
}

#[test]
fn the_filter_never_clears_a_block_with_outliers() {
    let th = Threshold::new(64, 0.95);
    let mut state = 7u64;
    let mut rand = move || uniform(&mut state);
    let (mut plain, mut plain_cleared) = (0, 0);
    for trial in 0..20000 {
        let offset = [0.0, 100.0, 1e6, -3.0][trial % 4] as f32;
        let scale = [1.0f32, 1e-20, 1e-40, 1e30][(trial / 4) % 4];
        let mut x: Vec<f32> = (0..64)
            .map(|_| ((rand() - 0.5) * 3.46) as f32 * scale + offset * scale)
            .collect();
        // Put one value right at the exact limit (both sides), sometimes at position 0.
        let limit2 = th.limit2(block_sums(&x));
        let at = if trial % 3 == 0 { 0 } else { trial % 64 };
        if (trial / 16) % 2 == 0 && limit2 > 0.0 {
            x[at] = (limit2.sqrt() * (1.0 + (rand() - 0.5) * 1e-6)) as f32;
        }
        let max_abs = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let exact = th.limit2(block_sums(&x));
        let (s32, ss32) = f32_sums(&x);
        let clean = th.provably_clean(max_abs, s32, ss32, &FilterBound::new(64));
        if offset == 0.0 && scale == 1.0 && (trial / 16) % 2 == 1 {
            plain += 1;
            plain_cleared += clean as usize;
        }
        if clean {
            let m = max_abs as f64;
            assert!(
                m * m <= exact,
                "trial {trial}: filter cleared a block with an outlier"
            );
        }
    }
    // Gaussian-like blocks without an outlier: nearly all cleared by the filter.
    assert!(plain_cleared * 10 > plain * 9, "{plain_cleared} of {plain}");
}

#[test]
fn bracket_contains_the_exact_limit() {
    let mut state = 11u64;
    let mut rand = move || uniform(&mut state);
    let mut decided = 0;
    for trial in 0..20000 {
        let n = [64usize, 16, 37, 4096][trial % 4];
        let (th, bound) = (Threshold::new(n, 0.95), FilterBound::new(n));
        let offset = [0.0, 100.0, 1e6, -3.0][(trial / 4) % 4] as f32;
        let scale = [1.0f32, 1e-20, 1e-40, 1e30][(trial / 16) % 4];
        let heavy = (trial / 64) % 2 == 1;
        let x: Vec<f32> = (0..n)
            .map(|_| {
                let u = (rand() - 0.5) * 3.46;
                let v = if heavy {
                    u / rand().max(1e-3).powf(0.25)
                } else {
                    u
                };
                v as f32 * scale + offset * scale
            })
            .collect();
        let exact = th.limit2(block_sums(&x));
        let (s32, ss32) = f32_sums(&x);
        let Some((lo, hi)) = th.bracket(s32, ss32, &bound) else {
            continue;
        };
        assert!(exact <= hi, "trial {trial}: limit {exact} above {hi}");
        if lo >= 0.0 {
            assert!(lo <= exact, "trial {trial}: limit {exact} below {lo}");
        }
        if let Some((t_lo, t_hi)) = f32_bracket(lo, hi) {
            decided += 1;
            assert!(exact > 0.0 && t_lo <= t_hi);
            // Every value is decided the same way by the thresholds and the exact limit.
            for &v in &x {
                let outlier = (v as f64) * (v as f64) > exact;
                if v.abs() <= t_lo {
                    assert!(!outlier, "trial {trial}");
                }
                if v.abs() > t_hi {
                    assert!(outlier, "trial {trial}");
                }
            }
        }
    }
    assert!(decided > 10000, "{decided}");
}

#[test]
fn collect_takes_every_marked_value_in_order() {
    // bfloat16 (bit copy, four per word without branches, then the rest) against float32
    // (the general path) on the same values, 0 to 64 marked per word.
    let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.5) * 1.25).collect();
    let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
    let opq = OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap();
    for marked in [0usize, 1, 3, 4, 5, 9, 63, 64] {
        for len in [256usize, 200, 64] {
            let mut mask = [0u64; MASK_WORDS];
            for (w, word) in mask[..len.div_ceil(64)].iter_mut().enumerate() {
                for k in 0..marked {
                    let i = w * 64 + (k * 37 + w) % 64;
                    if i < len {
                        *word |= 1 << (i % 64);
                    }
                }
            }
            let (mut a, mut b) = (Vec::new(), vec![Outlier::new(7, 7)]);
            let na = collect(&xb[..len], &mask, &opq, 1000, Bf16::MAX_FINITE, &mut a).unwrap();
            let xf: Vec<f32> = xb[..len].iter().map(|v| v.to_f32()).collect();
            let nb = collect(&xf, &mask, &opq, 1000, f32::MAX, &mut b).unwrap();
            assert_eq!((na, nb), (a.len(), b.len() - 1));
            assert_eq!(a, b[1..], "marked={marked} len={len}");
            let want: Vec<u64> = (0..len)
                .filter(|&i| mask[i / 64] >> (i % 64) & 1 == 1)
                .map(|i| 1000 + i as u64)
                .collect();
            assert_eq!(a.iter().map(|o| o.index()).collect::<Vec<_>>(), want);
            assert!(a
                .iter()
                .all(|o| o.value() == f32_to_bf16(xb[(o.index() - 1000) as usize].to_f32())));
        }
    }
}

#[test]
fn store_never_overflows() {
    let bf = OutlierDType::BFloat16;
    let h = OutlierDType::Float16;
    assert_eq!(bf.store(1.0, f32::MAX), Some(0x3f80));
    assert_eq!(bf.store(f32::MAX, f32::MAX), Some(0x7f7f));
    assert_eq!(bf.store(-f32::MAX, f32::MAX), Some(0xff7f));
    // f16 input: 65504 rounds to 65536 in bf16, one step down.
    assert_eq!(bf.to_f32(bf.store(65504.0, 65504.0).unwrap()), 65280.0);
    assert_eq!(h.store(65504.0, f32::MAX), Some(0x7bff));
    assert_eq!(h.store(70000.0, f32::MAX), None);
    assert_eq!(h.store(-1.0, Bf16::MAX_FINITE), Some(0xbc00));
    let _ = F16::MAX_FINITE;
}

#[test]
fn outliers_of_a_block() {
    let mut x = vec![0f32; 64];
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 37 % 64) as f32 - 31.5) / 32.0;
    }
    x[10] = 40.0;
    x[50] = -35.0;
    let opq = OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap();
    let mut out = Vec::new();
    let th = Threshold::new(64, 0.95);
    let limit2 = th.limit2(block_sums(&x));
    let mut mask = [0u64; MASK_WORDS];
    scan(&x, limit2, &mut mask);
    assert_eq!(mask[0], (1 << 10) | (1 << 50));
    let n = collect(&x, &mask, &opq, 128, f32::MAX, &mut out).unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        out,
        vec![Outlier::new(138, 0x4220), Outlier::new(178, 0xc20c)]
    );
    let largest_kept = x.iter().enumerate().filter(|(i, _)| *i != 10 && *i != 50);
    let want = largest_kept.fold(0f32, |m, (_, v)| m.max(v.abs()));
    assert_eq!(raw_scale_within(&x, limit2, Normalization::Absmax), want);
    let signed = raw_scale_within(&x, limit2, Normalization::SignedAbsmax);
    let first = x.iter().find(|v| v.abs() == want).copied();
    assert_eq!(Some(signed), first);
    // The f32 form of the limit.
    for l2 in [limit2, 1e-80, 2.0, 1e300, 1.1754943508222875e-38] {
        let t = f32_limit(l2);
        assert!((t as f64).powi(2) <= l2, "{l2}");
        let up = f32::from_bits(t.to_bits() + 1);
        assert!(t == f32::MAX || (up as f64) * (up as f64) > l2, "{l2}");
    }
    // Every value an outlier: scale +0.
    let all = raw_scale_within(&x, -1.0, Normalization::SignedAbsmax);
    assert!(all == 0.0 && all.is_sign_positive());
    let z = raw_scale_within(&[-0.0f32, 9.0], 1.0, Normalization::SignedAbsmax);
    assert!(z == 0.0 && z.is_sign_negative());
    // Constant block: no spread, no outliers.
    assert_eq!(th.limit2(block_sums(&[5f32; 64])), 0.0);
    let h = [F16(0x3c00); 3];
    let mut m3 = [0u64; MASK_WORDS];
    m3[0] = 0b10;
    let half = OpqOptions::new(0.9, OutlierDType::Float16).unwrap();
    assert_eq!(collect(&h, &m3, &half, 7, 65504.0, &mut out).unwrap(), 1);
    assert_eq!(out.last(), Some(&Outlier::new(8, 0x3c00)));
    let top = Outlier::new(Outlier::INDEX_LIMIT - 1, 0xffff);
    assert_eq!(
        (top.index(), top.value()),
        (Outlier::INDEX_LIMIT - 1, 0xffff)
    );
    assert!(OpqOptions::new(1.0, OutlierDType::BFloat16).is_err());
    assert!(OpqOptions::new(f64::NAN, OutlierDType::BFloat16).is_err());
}

/// The AVX2 kernels against the portable ones (bit for bit), where the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::pass::ExactKernels;
    use super::super::x86;
    use super::super::*;
    use crate::blockwise::codebook::{Codebook, Normalization, NF4};
    use crate::blockwise::encode::x86::Avx2;
    use crate::isa::Isa;
    use crate::numeric::element::Element;
    use crate::testing::lcg;

    #[test]
    fn sum_kernels_are_bit_identical() {
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        let cb = Codebook::new(&NF4).unwrap();
        if !Isa::Avx2.is_supported() {
            return;
        }
        for n in [
            0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 100, 4096,
        ] {
            let x: Vec<f32> = lcg(n, 99 + n as u64)
                .iter()
                .map(|v| v * 3.0 + 7.0)
                .collect();
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
            let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
            // SAFETY: AVX2 checked above.
            unsafe {
                let bits = |p: (f64, f64)| (p.0.to_bits(), p.1.to_bits());
                assert_eq!(bits(x86::sums_avx2(&x)), bits(block_sums(&x)));
                assert_eq!(bits(x86::sums_avx2(&xb)), bits(block_sums(&xb)));
                assert_eq!(bits(x86::sums_avx2(&xh)), bits(block_sums(&xh)));
                // The scan at a limit that splits the block, and at the exact square of a value.
                let first = x.first().copied().unwrap_or(1.0) as f64;
                for limit2 in [50.0, first * first, 1e-30] {
                    let t32 = super::f32_limit(limit2);
                    let (mut a, mut b) = ([0u64; MASK_WORDS], [0u64; MASK_WORDS]);
                    x86::scan_avx2(&x, limit2, t32, &mut a);
                    super::scan(&x, limit2, &mut b);
                    assert_eq!(a, b, "n={n}");
                    x86::scan_avx2(&xh, limit2, t32, &mut a);
                    super::scan(&xh, limit2, &mut b);
                    assert_eq!(a, b, "n={n}");
                    for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                        let want = super::raw_scale_within(&xb, limit2, norm);
                        let kernel = Avx2::new(&cb);
                        let got = kernel.raw_scale(&xb, limit2, t32, norm);
                        assert_eq!(got.to_bits(), want.to_bits(), "n={n}");
                    }
                }
            }
        }
    }

    #[test]
    fn split_kernels_match_the_scan() {
        use crate::blockwise::opq::{f32_limit, raw_scale_within, scan, signed_scale_within};
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        if !Isa::Avx2.is_supported() {
            return;
        }
        fn check<E: Element>(x: &[E]) {
            for pick in [0usize, 5, x.len() - 1] {
                let v = x[pick].to_f32() as f64;
                for limit2 in [v * v, v * v * (1.0 + 1e-7), v * v * (1.0 - 1e-7), 1e-3] {
                    let t32 = f32_limit(limit2);
                    let mut want = [0u64; MASK_WORDS];
                    scan(x, limit2, &mut want);
                    let mut got = [0u64; MASK_WORDS];
                    // SAFETY: AVX2 checked by the caller.
                    let kept = unsafe { x86::split_avx2::<E, true>(x, t32, t32, &mut got) };
                    let kept = kept.expect("nothing lies strictly between equal thresholds");
                    assert_eq!(got, want, "limit2={limit2}");
                    let mut plain = [0u64; MASK_WORDS];
                    // SAFETY: as above.
                    let magnitude = unsafe { x86::split_avx2::<E, false>(x, t32, t32, &mut plain) };
                    assert_eq!(plain, want);
                    assert_eq!(magnitude.map(|k| k.max.to_bits()), Some(kept.max.to_bits()));
                    let absmax = raw_scale_within(x, limit2, Normalization::Absmax);
                    assert_eq!(kept.max.to_bits(), absmax.to_bits());
                    let signed = raw_scale_within(x, limit2, Normalization::SignedAbsmax);
                    if let Some(fast) = kept.signed {
                        assert_eq!(fast.to_bits(), signed.to_bits(), "limit2={limit2}");
                    }
                    // SAFETY: as above.
                    let got_signed = unsafe { x86::signed_masked_avx2(x, &got, kept.max) };
                    assert_eq!(got_signed.to_bits(), signed.to_bits());
                    assert_eq!(
                        signed_scale_within(x, limit2, kept.max).to_bits(),
                        signed.to_bits()
                    );
                    // A value strictly between the thresholds: undecided.
                    let m = x[pick].to_f32().abs();
                    if m > 0.0 {
                        let below = f32::from_bits(m.to_bits() - 1);
                        // SAFETY: as above.
                        let undecided =
                            unsafe { x86::split_avx2::<E, true>(x, below, m, &mut got) };
                        assert!(undecided.is_none());
                    }
                }
            }
        }
        for n in [64usize, 128, 4096] {
            let mut x = lcg(n, 5 + n as u64);
            for i in (3..n).step_by(29) {
                x[i] *= 30.0;
            }
            x[n / 2] = -x[3]; // a tie of magnitudes with opposite signs
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
            let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
            check(&x);
            check(&xb);
            check(&xh);
        }
    }
}
