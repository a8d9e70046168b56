//! The AVX2 decoder (bit-identical to [`super::portable`]).

use super::portable::decode_block as decode_block_portable;
use crate::numeric::element::{Element, Kind};
use std::arch::x86_64::*;

/// AVX2 decoder: the 16 scaled levels live in two registers; each group of 8 codes is looked
/// up with two in-register permutes and a blend on bit 3 of the code.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_block<E: Element>(
    codes: &[u8],
    scale: f32,
    levels: &[f32; 16],
    out: &mut [E],
) {
    let vscale = _mm256_set1_ps(scale);
    let lo = _mm256_mul_ps(_mm256_loadu_ps(levels.as_ptr()), vscale);
    let hi = _mm256_mul_ps(_mm256_loadu_ps(levels.as_ptr().add(8)), vscale);
    // 16-bit outputs: byte shuffles over the rounded table; f32 outputs: the loop below.
    let table = match E::KIND {
        Kind::Float32 => None,
        Kind::BFloat16 => {
            let packed = _mm256_packus_epi32(round_bf16(lo), round_bf16(hi));
            Some(_mm256_permute4x64_epi64(packed, 0b11_01_10_00))
        }
        Kind::Float16 => {
            let l = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
            Some(_mm256_set_m128i(
                _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT),
                l,
            ))
        }
    };
    if let Some(table) = table {
        return decode_halves(codes, table, scale, levels, out);
    }
    let shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    let nibble = _mm256_set1_epi32(15);
    let full = (out.len() / 16).min(codes.len() / 8);
    for g in 0..full {
        let raw = (codes.as_ptr().add(g * 8) as *const u64).read_unaligned();
        let bytes = _mm_cvtsi64_si128(raw as i64);
        let doubled = _mm_unpacklo_epi8(bytes, bytes);
        let first = lookup(_mm256_cvtepu8_epi32(doubled), shifts, nibble, lo, hi);
        let upper = _mm_unpackhi_epi64(doubled, doubled);
        let second = lookup(_mm256_cvtepu8_epi32(upper), shifts, nibble, lo, hi);
        // `E` is f32 here (the 16-bit types returned above).
        let dst = out.as_mut_ptr().add(g * 16) as *mut f32;
        _mm256_storeu_ps(dst, first);
        _mm256_storeu_ps(dst.add(8), second);
    }
    decode_block_portable(&codes[full * 8..], scale, levels, &mut out[full * 16..]);
}

/// 16-bit outputs: the 16 rounded, scaled levels (`table`, 16 u16 in order) are split into a
/// low-byte and a high-byte table, and 32 codes at a time are looked up with byte shuffles.
/// The table entries are exactly the per-value roundings, so results match the portable path.
#[inline(always)]
unsafe fn decode_halves<E: Element>(
    codes: &[u8],
    table: __m256i,
    scale: f32,
    levels: &[f32; 16],
    out: &mut [E],
) {
    // Per lane: even bytes (low halves) first, then odd bytes (high halves).
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, //
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    let bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(table, split), 0b11_01_10_00);
    let low_table = _mm256_permute2x128_si256(bytes, bytes, 0x00);
    let high_table = _mm256_permute2x128_si256(bytes, bytes, 0x11);
    let nibble = _mm_set1_epi8(15);
    let full = (out.len() / 32).min(codes.len() / 16);
    for g in 0..full {
        let c = _mm_loadu_si128(codes.as_ptr().add(g * 16) as *const __m128i);
        let high_nibbles = _mm_and_si128(_mm_srli_epi16(c, 4), nibble);
        let low_nibbles = _mm_and_si128(c, nibble);
        let idx = _mm256_set_m128i(
            _mm_unpackhi_epi8(high_nibbles, low_nibbles),
            _mm_unpacklo_epi8(high_nibbles, low_nibbles),
        );
        let low = _mm256_shuffle_epi8(low_table, idx);
        let high = _mm256_shuffle_epi8(high_table, idx);
        let a = _mm256_unpacklo_epi8(low, high); // values 0..7 | 16..23
        let b = _mm256_unpackhi_epi8(low, high); // values 8..15 | 24..31
        let dst = out.as_mut_ptr().add(g * 32) as *mut __m256i;
        _mm256_storeu_si256(dst, _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256(dst.add(1), _mm256_permute2x128_si256(a, b, 0x31));
    }
    decode_block_portable(&codes[full * 16..], scale, levels, &mut out[full * 32..]);
}

/// 8 scaled levels for 8 doubled code bytes: shift out the nibble, look it up in the two
/// 8-entry halves, blend on bit 3.
#[inline(always)]
unsafe fn lookup(idx: __m256i, shifts: __m256i, nibble: __m256i, lo: __m256, hi: __m256) -> __m256 {
    let idx = _mm256_and_si256(_mm256_srlv_epi32(idx, shifts), nibble);
    let from_lo = _mm256_permutevar8x32_ps(lo, idx);
    let from_hi = _mm256_permutevar8x32_ps(hi, idx);
    _mm256_blendv_ps(
        from_lo,
        from_hi,
        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)),
    )
}

/// f32 -> bf16 bits (nearest even) in the low half of each 32-bit lane; inputs are finite.
#[inline(always)]
unsafe fn round_bf16(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    _mm256_srli_epi32(biased, 16)
}
