//! Tests of the encoder: every ISA against the definition, OPQ and dq8 included.

use super::*;
use crate::blockwise::codebook::NF4;
use crate::blockwise::opq::{block_sums, Threshold};
use crate::testing::{lcg, uniform};

/// NF4 codes and stored scales of `x` (plain pack).
fn pack_nf4<E: Element>(
    isa: Isa,
    x: &[E],
    bs: usize,
    norm: Normalization,
    scale_dtype: ScaleDType,
) -> (Vec<u8>, Vec<f32>) {
    let cb = Codebook::new(&NF4).unwrap();
    let opts = nf4_options(&cb, bs, norm, scale_dtype);
    let layout = BlockLayout::new(x.len(), bs).unwrap();
    let mut codes = vec![0u8; layout.code_bytes()];
    let mut scales = vec![0f32; layout.num_blocks()];
    pack_with_isa(isa, x, &opts, &mut codes, &mut scales).unwrap();
    (codes, scales)
}

fn nf4_options(
    cb: &Codebook,
    block_size: usize,
    normalization: Normalization,
    scale_dtype: ScaleDType,
) -> EncodeOptions<'_> {
    EncodeOptions {
        codebook: cb,
        block_size,
        normalization,
        scale_dtype,
    }
}

fn encode(isa: Isa, x: &[f32], bs: usize, norm: Normalization) -> (Vec<u8>, Vec<f32>) {
    pack_nf4(isa, x, bs, norm, ScaleDType::BFloat16)
}

#[test]
fn every_isa_matches_scalar_reference() {
    let cb = Codebook::new(&NF4).unwrap();
    for &n in &[0usize, 1, 7, 31, 63, 64, 65, 95, 1000, 4095, 70001] {
        let x = lcg(n, n as u64 + 1);
        for &bs in &[16usize, 64, 4096] {
            for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                let (codes, scales) = encode(Isa::Portable, &x, bs, norm);
                for (i, &v) in x.iter().enumerate() {
                    let s = scales[i / bs];
                    let want = cb.encode_one(v / s);
                    let byte = codes[i / 2];
                    let got = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                    assert_eq!(got, want, "n={n} bs={bs} i={i}");
                }
                for isa in Isa::supported() {
                    assert_eq!(encode(isa, &x, bs, norm), (codes.clone(), scales.clone()));
                }
            }
        }
    }
}

type Encoded = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>, Vec<Outlier>);

/// Packs `x` with NF4, bfloat16 scales (unless dq8) and `extras`.
fn try_encode_ext<E: Element>(
    isa: Isa,
    x: &[E],
    bs: usize,
    norm: Normalization,
    extras: &PackExtras,
) -> Result<Encoded> {
    let cb = Codebook::new(&NF4).unwrap();
    let opts = nf4_options(&cb, bs, norm, ScaleDType::BFloat16);
    let layout = BlockLayout::new(x.len(), bs).unwrap();
    let mut out = PackOutput::new(&layout, extras.double_quant);
    let outliers = pack_ext_parts_with_isa(isa, x, &opts, extras, out.buffers())?.concat();
    let PackOutput {
        codes,
        scales,
        scale_codes,
        scale_params,
    } = out;
    Ok((codes, scales, scale_codes, scale_params, outliers))
}

fn encode_ext<E: Element>(
    isa: Isa,
    x: &[E],
    bs: usize,
    norm: Normalization,
    extras: &PackExtras,
) -> Encoded {
    try_encode_ext(isa, x, bs, norm, extras).unwrap()
}

#[test]
fn opq_and_double_quant_agree_across_isas_and_zero_the_outliers() {
    use crate::blockwise::opq::OutlierDType;
    use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
    let cb = Codebook::new(&NF4).unwrap();
    for &n in &[1usize, 2, 17, 64, 100, 1000, 70001, 140_000] {
        let mut x = lcg(n, n as u64 + 7);
        for i in (0..n).step_by(97) {
            x[i] *= 40.0;
        }
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
        let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
        for &bs in &[16usize, 64, 4096] {
            for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                for dq in [false, true] {
                    let extras = PackExtras {
                        opq: Some(OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap()),
                        double_quant: dq,
                    };
                    let want = encode_ext(Isa::Portable, &x, bs, norm, &extras);
                    if n >= 1000 {
                        assert!(!want.4.is_empty(), "n={n} bs={bs}: outliers expected");
                    }
                    // Outlier positions encode as 0 against the block's scale.
                    for outlier in &want.4 {
                        let i = outlier.index() as usize;
                        let byte = want.0[i / 2];
                        let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                        assert_eq!(code, cb.encode_one(0.0), "n={n} i={i}");
                    }
                    for isa in Isa::supported() {
                        assert_eq!(encode_ext(isa, &x, bs, norm, &extras), want);
                        encode_ext(isa, &xb, bs, norm, &extras);
                        let a = encode_ext(isa, &xh, bs, norm, &extras);
                        assert_eq!(a, encode_ext(Isa::Portable, &xh, bs, norm, &extras));
                    }
                }
            }
        }
    }
}

/// The fused OPQ pass (groups of 8 blocks through the vector filter, suspects in place)
/// against the portable kernels, which apply the exact rule to every block: adversarial
/// blocks (a value one step either side of the exact limit, large offsets, tiny and huge
/// magnitudes whose f32 sums overflow, constant blocks, groups with a NaN or an outlier
/// float16 cannot hold), every element type, block sizes with and without groups, tails.
#[test]
fn fused_opq_pass_matches_the_exact_rule_on_adversarial_blocks() {
    use crate::blockwise::opq::OutlierDType;
    use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
    fn run<E: Element>(
        isa: Isa,
        x: &[E],
        bs: usize,
        norm: Normalization,
        dtype: OutlierDType,
    ) -> String {
        let extras = PackExtras {
            opq: Some(OpqOptions::new(0.95, dtype).unwrap()),
            double_quant: false,
        };
        match try_encode_ext(isa, x, bs, norm, &extras) {
            Ok(encoded) => format!("{encoded:?}"),
            Err(err) => format!("error {err:?}"),
        }
    }
    let mut state = 5u64;
    let mut rand = move || uniform(&mut state);
    let mut checked = 0;
    for trial in 0..96 {
        let bs = [64usize, 16, 128, 32][trial % 4];
        let n = bs * (8 * (1 + trial % 3)) + [0, 5, bs][(trial / 4) % 3].min(bs - 1);
        let offset = [0.0, 100.0, -3.0][(trial / 12) % 3];
        let scale = [1.0, 1e-30, 1e37][(trial / 36) % 3];
        let mut x: Vec<f32> = (0..n)
            .map(|_| {
                let u = (rand() - 0.5) * 3.46;
                let heavy = u / rand().max(1e-3).powf(0.25);
                ((if trial % 2 == 0 { u } else { heavy } + offset) * scale) as f32
            })
            .collect();
        for b in 0..n / bs {
            let block = &mut x[b * bs..(b + 1) * bs];
            let argmax = |v: &[f32]| {
                (0..v.len()).fold(0, |m, i| if v[i].abs() > v[m].abs() { i } else { m })
            };
            match (b + trial) % 7 {
                0 => block.fill(block[0]),
                5 => {
                    // Both signs at the largest magnitude, or at the largest below an
                    // outlier (the first of them gives the signed scale).
                    if b % 2 == 0 {
                        block[(b * 5) % bs] = block[argmax(block)] * 40.0;
                    }
                    let mut rest = block.to_vec();
                    let top = argmax(&rest);
                    if b % 2 == 0 {
                        rest[top] = 0.0;
                    }
                    let j = argmax(&rest);
                    let i = (j + 1 + b % (bs - 1)) % bs;
                    if i != top || b % 2 == 1 {
                        block[i] = -block[j];
                    }
                }
                6 => {
                    // Signed zeros, with one large value (an outlier) or two.
                    for (i, v) in block.iter_mut().enumerate() {
                        *v = if (i + b) % 3 == 0 { -0.0 } else { 0.0 };
                    }
                    block[(b * 3) % bs] = 7.0;
                    if b % 2 == 1 {
                        block[(b * 3 + 1) % bs] = -7.0;
                    }
                }
                1 | 2 => {
                    // One value just at, above or below the exact limit.
                    let th = Threshold::new(bs, 0.95);
                    let limit = th.limit2(block_sums(block)).sqrt() as f32;
                    let step = [0i32, 1, -1][b % 3];
                    let at = (b * 7) % bs;
                    block[at] = f32::from_bits((limit.to_bits() as i32 + step) as u32);
                }
                _ => {}
            }
        }
        if trial % 8 == 3 {
            x[n / 2] = f32::NAN;
        }
        if trial % 8 == 5 {
            x[n / 3] = 1e6; // beyond float16: refused as a float16 outlier
        }
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
        let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
        for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
            for dtype in [OutlierDType::BFloat16, OutlierDType::Float16] {
                let want = (
                    run(Isa::Portable, &x, bs, norm, dtype),
                    run(Isa::Portable, &xb, bs, norm, dtype),
                    run(Isa::Portable, &xh, bs, norm, dtype),
                );
                for isa in Isa::supported() {
                    let got = (
                        run(isa, &x, bs, norm, dtype),
                        run(isa, &xb, bs, norm, dtype),
                        run(isa, &xh, bs, norm, dtype),
                    );
                    assert!(
                        got == want,
                        "trial {trial} bs={bs} n={n} {isa:?} {norm:?} {dtype:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 96 * 4);
}

#[test]
fn zero_block_and_odd_tail() {
    let x = vec![0f32; 33];
    let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::Absmax);
    assert_eq!(scales, vec![0.0; 3]);
    assert_eq!(codes.len(), 17);
    assert_eq!(codes[16] & 15, 0, "pad nibble is zero");
    assert_eq!(codes[16] >> 4, 7, "zero encodes to NF4's zero level");
}

#[test]
fn reports_first_non_finite_index() {
    let mut x = lcg(100_000, 3);
    x[77_777] = f32::NAN;
    x[90_000] = f32::INFINITY;
    let cb = Codebook::new(&NF4).unwrap();
    let opts = nf4_options(&cb, 64, Normalization::Absmax, ScaleDType::Float32);
    let mut codes = vec![0u8; 50_000];
    let mut scales = vec![0f32; 1563];
    let err = pack(&x, &opts, &mut codes, &mut scales).unwrap_err();
    assert_eq!(err, Error::NonFinite { index: 77_777 });
}

#[test]
fn signed_absmax_maps_extreme_to_top_level() {
    let x = [
        0.1f32, -3.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    ];
    let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::SignedAbsmax);
    assert_eq!(scales[0], -3.0);
    assert_eq!(codes[0] & 15, 15);
}

#[test]
fn signed_scale_is_the_first_value_of_largest_magnitude_on_every_isa() {
    use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
    // Small integers: the largest magnitude repeats with both signs at random places; some
    // blocks are all zeros with a -0.0 or +0.0 first.
    fn check<E: Element + std::fmt::Debug>(x: &[E], bs: usize) {
        let run = |isa| {
            let norm = Normalization::SignedAbsmax;
            let (codes, scales) = pack_nf4(isa, x, bs, norm, ScaleDType::Float32);
            (
                codes,
                scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
            )
        };
        let want = run(Isa::Portable);
        for (b, block) in x.chunks(bs).enumerate() {
            let max = block.iter().map(|v| v.abs_bits()).max().unwrap();
            let first = block.iter().find(|v| v.abs_bits() == max).unwrap();
            assert_eq!(want.1[b], first.to_f32().to_bits(), "block {b}");
        }
        for isa in Isa::supported() {
            assert_eq!(run(isa), want, "{isa:?} bs={bs} n={}", x.len());
        }
    }
    let mut state = 11u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for trial in 0..40 {
        let bs = [64usize, 128, 16, 256][trial % 4];
        let n = bs * (1 + trial % 5) + [0, 17, 64][trial % 3].min(bs - 1);
        let x: Vec<f32> = (0..n)
            .map(|i| match (i / bs + trial) % 4 {
                0 => 0.0,
                1 if i % bs == 0 => -0.0,
                _ => ((next() % 7) as f32 - 3.0) * 0.5,
            })
            .collect();
        check(&x, bs);
        check(
            &x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect::<Vec<_>>(),
            bs,
        );
        check(
            &x.iter().map(|&v| F16(f32_to_f16(v))).collect::<Vec<_>>(),
            bs,
        );
    }
}
