//! Double quantization of block scales ("dq8"): 8 bits per scale, in groups of [`GROUP`]
//! consecutive scales, with two f32 per group.
//!
//! A group's nonzero magnitudes `m = |s|` lie in `[lo, hi]` (`lo` the smallest nonzero, `hi`
//! the largest). Each scale gets a magnitude code `c`: `0` means exactly zero (so zero blocks
//! stay exactly zero), `1..=K` means `lo + (c - 1) * step` with `step = (hi - lo) / (K - 1)`
//! (f32 arithmetic, multiply then add, no fused multiply-add). The stored byte is:
//!
//! - absmax codebooks (scales >= 0): `c` itself, `K = 255`;
//! - signed absmax codebooks: bit 7 = sign of the scale, bits 0..6 = `c`, `K = 127` (one bit of
//!   resolution pays for the sign; the magnitude grid is the same construction).
//!
//! A nonzero scale gets `c = 1 + round_half_even((m - lo) / step)` clamped to `1..=K` (`c = 1`
//! when `step == 0`), never 0; if the decoded magnitude would exceed the input dtype's largest
//! finite value, `c` steps down by one. The group parameters are stored as `[lo, step]`.
//! The encoder then codes the block's values against the *decoded* scale.

use crate::error::{check_len, Error, Result};
use crate::runtime::pool::pool;
use rayon::prelude::*;

/// Scales per group.
pub const GROUP: usize = 256;

/// Largest magnitude code.
#[inline(always)]
pub fn max_code(signed: bool) -> u32 {
    if signed {
        127
    } else {
        255
    }
}

/// Round half to even of a non-negative value (values from 2^23 up are already integers): the
/// classic add-and-subtract of 2^23, so no libm call on CPUs without SSE4.1.
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const BIG: f32 = 8_388_608.0;
    if v < BIG {
        (v + BIG) - BIG
    } else {
        v
    }
}

/// The decoded scale of one stored byte.
#[inline(always)]
pub fn decode_one(byte: u8, lo: f32, step: f32, signed: bool) -> f32 {
    let c = if signed { byte & 0x7f } else { byte } as u32;
    let magnitude = if c == 0 {
        0.0
    } else {
        lo + (c - 1) as f32 * step
    };
    if signed && byte & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Quantizes the raw scales of one group (at most [`GROUP`]) in place: writes the stored bytes
/// to `codes`, replaces each scale by its decoded value, and returns `[lo, step]`.
pub fn quantize_group(
    scales: &mut [f32],
    signed: bool,
    input_max: f32,
    codes: &mut [u8],
) -> [f32; 2] {
    let k = max_code(signed);
    let mut lo = f32::INFINITY;
    let mut hi = 0f32;
    for &s in scales.iter() {
        let m = s.abs();
        if m > 0.0 {
            lo = lo.min(m);
            hi = hi.max(m);
        }
    }
    if hi == 0.0 {
        for (c, s) in codes.iter_mut().zip(scales.iter_mut()) {
            *c = if signed && s.is_sign_negative() {
                0x80
            } else {
                0
            };
            *s = decode_one(*c, 0.0, 0.0, signed);
        }
        return [0.0, 0.0];
    }
    let step = (hi - lo) / (k - 1) as f32;
    for (c, s) in codes.iter_mut().zip(scales.iter_mut()) {
        let m = s.abs();
        let mut code = if m == 0.0 {
            0
        } else if step == 0.0 {
            1
        } else {
            (1.0 + round_half_even((m - lo) / step)).clamp(1.0, k as f32) as u32
        };
        while code > 1 {
            let v = lo + (code - 1) as f32 * step;
            if v.is_finite() && v <= input_max {
                break;
            }
            code -= 1;
        }
        let sign = if signed && s.is_sign_negative() {
            0x80
        } else {
            0
        };
        *c = code as u8 | sign;
        *s = decode_one(*c, lo, step, signed);
    }
    [lo, step]
}

/// Checks the group parameters of `blocks` stored bytes: `[lo, step]` per group, finite and
/// non-negative.
pub fn check_params(blocks: usize, params: &[f32]) -> Result<()> {
    let groups = blocks.div_ceil(GROUP);
    check_len("scale_scales", 2 * groups, params.len())?;
    match params
        .chunks(2)
        .position(|p| !(p[0].is_finite() && p[1].is_finite() && p[0] >= 0.0 && p[1] >= 0.0))
    {
        Some(g) => Err(Error::invalid(
            "scale_scales",
            format!("parameters of scale group {g} are not finite and non-negative"),
        )),
        None => Ok(()),
    }
}

/// Decodes stored bytes with their group parameters (`params[2g..2g+2] = [lo, step]` of group
/// `g`) into f32 scales, on the pool.
pub fn decode_scales(codes: &[u8], params: &[f32], signed: bool, out: &mut [f32]) -> Result<()> {
    check_params(codes.len(), params)?;
    check_len("scales", codes.len(), out.len())?;
    pool().install(|| {
        out.par_chunks_mut(GROUP * 64)
            .zip(codes.par_chunks(GROUP * 64))
            .enumerate()
            .for_each(|(t, (o, c))| {
                for (g, (og, cg)) in o.chunks_mut(GROUP).zip(c.chunks(GROUP)).enumerate() {
                    let p = &params[2 * (t * 64 + g)..];
                    for (v, &b) in og.iter_mut().zip(cg) {
                        *v = decode_one(b, p[0], p[1], signed);
                    }
                }
            })
    });
    if let Some(b) = out.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "scales",
            format!("double-quantized scale of block {b} is not finite"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_zero_and_extremes() {
        let mut s: Vec<f32> = (0..300).map(|i| 0.5 + (i % 17) as f32 * 0.031).collect();
        s[3] = 0.0;
        s[5] = 1.2;
        let raw = s.clone();
        let mut codes = vec![0u8; 300];
        let p0 = quantize_group(&mut s[..256], false, f32::MAX, &mut codes[..256]);
        let p1 = quantize_group(&mut s[256..], false, f32::MAX, &mut codes[256..]);
        assert_eq!(s[3], 0.0);
        assert_eq!(codes[3], 0);
        assert_eq!(p0[0], 0.5);
        for (a, b) in s.iter().zip(&raw) {
            assert!((a - b).abs() <= 0.5 * p0[1].max(p1[1]) * 1.0001, "{a} {b}");
        }
        let mut back = vec![0f32; 300];
        decode_scales(&codes, &[p0[0], p0[1], p1[0], p1[1]], false, &mut back).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn signed_scales_keep_their_sign() {
        let mut s = vec![-2.0f32, 1.0, -0.0, 0.0, 1.5, -1.25];
        let mut codes = vec![0u8; 6];
        let p = quantize_group(&mut s, true, f32::MAX, &mut codes);
        assert_eq!(p, [1.0, 1.0 / 126.0]);
        assert!(s[0] < 0.0 && (s[0] + 2.0).abs() < 1e-6);
        assert_eq!(s[1], 1.0); // lo + 0 * step is exact
        assert!(s[2] == 0.0 && s[2].is_sign_negative());
        assert!(s[3] == 0.0 && s[3].is_sign_positive());
        assert!(s[5] < 0.0 && (s[5] + 1.25).abs() < 0.004);
        assert_eq!(codes[0], 0x80 | 127);
    }

    #[test]
    fn all_zero_and_constant_groups() {
        let mut z = vec![0f32; 10];
        let mut codes = vec![9u8; 10];
        assert_eq!(
            quantize_group(&mut z, false, f32::MAX, &mut codes),
            [0.0, 0.0]
        );
        assert!(codes.iter().all(|&c| c == 0) && z.iter().all(|&v| v == 0.0));
        let mut c = vec![3.0f32; 10];
        quantize_group(&mut c, false, f32::MAX, &mut codes);
        assert!(c.iter().all(|&v| v == 3.0));
    }

    #[test]
    fn decoded_scales_stay_in_the_input_range() {
        let mut s = vec![65504.0f32, 1.0, 3.0e4];
        let mut codes = vec![0u8; 3];
        quantize_group(&mut s, false, 65504.0, &mut codes);
        assert!(s.iter().all(|&v| v <= 65504.0));
        let mut m = vec![f32::MAX, 1.0];
        quantize_group(&mut m, false, f32::MAX, &mut codes[..2]);
        assert!(m.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rounding_is_half_even() {
        for (v, want) in [
            (0.0, 0.0),
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (2.4999, 2.0),
            (253.5, 254.0),
            (1e9, 1e9),
        ] {
            assert_eq!(round_half_even(v), want, "{v}");
        }
    }

    #[test]
    fn decode_rejects_bad_params() {
        let mut out = vec![0f32; 3];
        assert!(decode_scales(&[1, 2, 3], &[0.0], false, &mut out).is_err());
        assert!(decode_scales(&[1, 2, 3], &[f32::NAN, 1.0], false, &mut out).is_err());
        assert!(decode_scales(&[1, 2, 3], &[1.0, -1.0], false, &mut out).is_err());
        assert!(decode_scales(&[255], &[f32::MAX, f32::MAX], false, &mut out[..1]).is_err());
    }
}
