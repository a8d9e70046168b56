//! Fused 4-bit matrix-vector products: `y[b, o] = sum_i x[b, i] * level[code(o, i)] * scale(o, i)`
//! for a 2-D weight `[out, in]` packed row-major, without ever materializing the dense weight.
//!
//! Requirements: `in % block_size == 0` (every block lies inside one row). Activations are f32,
//! bf16 or f16 (`batch` rows of `in` values), accumulated in f32; the output is f32 `[batch, out]`.
//!
//! Kernels:
//! - `portable`: per block, `sum(level[code] * x)` in f32, then one multiply by the block scale
//!   (the definition of the results),
//! - `avx2`: 64 codes at a time (block sizes >= 64; 32 for block sizes 16 and 32); their nibbles
//!   index four 16-entry byte tables (one per byte of the f32 levels) with `pshufb`, byte/word
//!   unpacks reassemble the f32 levels in a fixed permuted order, and the activations are
//!   permuted once per call to the same order; FMA into per-block accumulators, one scale
//!   multiply per block. Sums are in a different order than the portable kernel, so results
//!   agree to float tolerance, not bit for bit. This path is bound by the shuffle ports (12
//!   shuffles per 32 weights rebuild exact f32 levels).
//!
//! [`Activations::Int16`] and [`Activations::Int8`] (opt-in, not within float tolerance)
//! quantize the activations to int16 per 64 or int8 per 32 and run integer dot products instead;
//! see [`crate::blockwise::matvec::int16`] and [`crate::blockwise::matvec::int8`].
//!
//! Work is split over output rows on the dedicated pool; batches are processed in tiles of up to
//! four activation rows, so each decoded weight feeds up to four FMAs.

pub mod int16;
pub mod int8;
pub mod quant;

use crate::blockwise::codebook::Codebook;
use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::numeric::element::{Bf16, Element, F16};
use crate::runtime::pool::pool;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Weights per parallel task, about (whole rows).
const TASK_WEIGHTS: usize = 1 << 16;
/// Products up to this many weight-uses (weights times activation rows, up to a tile) run on
/// the calling thread: a round trip through a pool that has gone idle costs 40-110 us on the
/// 2-core VM we measure on (`cargo run --release --example pool_time`), about the time of one
/// core on 1M weights, so splitting smaller products loses.
const INLINE_WEIGHTS: usize = 1 << 20;
/// Activation rows decoded weights are reused for.
const TILE: usize = 4;

/// Shape of a packed 2-D weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatShape {
    /// Output features (rows of the weight).
    pub out_features: usize,
    /// Input features (columns of the weight).
    pub in_features: usize,
    /// Values per block; must divide `in_features`.
    pub block_size: usize,
}

impl MatShape {
    /// Checks the shape and the buffer lengths that go with it for `batch` activation rows.
    pub fn check(
        &self,
        batch: usize,
        codes: usize,
        scales: usize,
        x: usize,
        out: usize,
    ) -> Result<()> {
        let bs = self.block_size;
        if !(16..=4096).contains(&bs) || !bs.is_power_of_two() {
            return Err(Error::InvalidBlockSize(bs));
        }
        if self.in_features % bs != 0 {
            return Err(Error::InvalidArgument {
                name: "in_features",
                message: format!(
                    "{} is not a multiple of block_size={bs}; the fused kernel needs whole \
                     blocks per row",
                    self.in_features
                ),
            });
        }
        let overflow = || Error::InvalidArgument {
            name: "out_features",
            message: "sizes overflow".into(),
        };
        let n = self
            .out_features
            .checked_mul(self.in_features)
            .ok_or_else(overflow)?;
        let nx = batch.checked_mul(self.in_features).ok_or_else(overflow)?;
        let ny = batch.checked_mul(self.out_features).ok_or_else(overflow)?;
        expect_len("codes", n / 2, codes)?;
        expect_len("scales", n / bs, scales)?;
        expect_len("x", nx, x)?;
        expect_len("out", ny, out)
    }
}

fn expect_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// How the activations enter the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// Widened exactly to f32, FMA with the f32 levels: results within float tolerance of
    /// `x @ W.T` (the default).
    #[default]
    Float,
    /// Quantized to int16 per 64 values, integer dot products with int16-rounded levels: about
    /// twice as fast at batch 1, relative error about 6e-5 (see [`crate::blockwise::matvec::int16`]).
    Int16,
    /// Quantized to int8 per 32 values, integer dot products with int8-rounded levels (as
    /// llama.cpp): the fastest, relative error about 7e-3 (see [`crate::blockwise::matvec::int8`]).
    Int8,
}

impl Activations {
    /// Name used by the Python API.
    pub fn name(self) -> &'static str {
        match self {
            Activations::Float => "float",
            Activations::Int16 => "int16",
            Activations::Int8 => "int8",
        }
    }

    /// Every mode, the default first.
    pub const ALL: [Activations; 3] = [Activations::Float, Activations::Int16, Activations::Int8];

    /// Parses a name from [`Activations::name`].
    pub fn parse(name: &str) -> Option<Activations> {
        Activations::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// An activation element: f32, bf16 or f16, widened exactly to f32.
pub trait Activation: Element {}
impl Activation for f32 {}
impl Activation for Bf16 {}
impl Activation for F16 {}

/// `out[b * out_features + o] = sum_i x[b * in + i] * W[o, i]` for `batch` activation rows, with
/// the best kernel of this CPU. `x` holds `batch * in_features` values, `out` `batch *
/// out_features`. A non-finite scale is an error, found while the product runs (`out` is then
/// unspecified).
pub fn matvec<X: Activation>(
    shape: MatShape,
    batch: usize,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    x: &[X],
    out: &mut [f32],
) -> Result<()> {
    matvec_with_isa(Isa::best(), shape, batch, codes, scales, codebook, x, out)
}

/// [`matvec`] with an explicit kernel variant.
#[allow(clippy::too_many_arguments)]
pub fn matvec_with_isa<X: Activation>(
    isa: Isa,
    shape: MatShape,
    batch: usize,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    x: &[X],
    out: &mut [f32],
) -> Result<()> {
    matvec_with_options(
        isa,
        Activations::Float,
        shape,
        batch,
        codes,
        scales,
        codebook,
        x,
        out,
    )
}

/// [`matvec`] with an explicit kernel variant and activation mode.
#[allow(clippy::too_many_arguments)]
pub fn matvec_with_options<X: Activation>(
    isa: Isa,
    activations: Activations,
    shape: MatShape,
    batch: usize,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    x: &[X],
    out: &mut [f32],
) -> Result<()> {
    isa.ensure_supported()?;
    shape.check(batch, codes.len(), scales.len(), x.len(), out.len())?;
    if out.is_empty() {
        return Ok(());
    }
    let (n_in, n_out) = (shape.in_features, shape.out_features);
    if n_in == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let fast = isa != Isa::Portable;
    let wide = shape.block_size >= 64;
    let levels = codebook.levels();
    let bytes = byte_tables(levels);
    let bytes_per_row = n_in / 2;
    let scales_per_row = n_in / shape.block_size;
    // Activations for the chosen path, in the order its kernel reads them.
    enum Prepared {
        Float(Vec<f32>),
        Int16(int16::Quantized, [i16; 16], f32),
        Int8(int8::Quantized, [i8; 16], f32),
    }
    let prepared = match activations {
        Activations::Float if fast => Prepared::Float(permute(x, wide)),
        Activations::Float => Prepared::Float(x.iter().map(|v| v.to_f32()).collect()),
        Activations::Int16 => {
            let order = match (fast, wide) {
                (false, _) => int16::Order::Natural,
                (true, true) => int16::Order::Step64,
                (true, false) => int16::Order::Step32,
            };
            let (l16, dl) = int16::quantize_levels(levels);
            Prepared::Int16(int16::quantize_activations(x, batch, n_in, order), l16, dl)
        }
        Activations::Int8 => {
            let order = match (fast, wide) {
                (false, _) => int8::Order::Natural,
                (true, true) => int8::Order::Step64,
                (true, false) => int8::Order::Step32,
            };
            let (l8, dl) = int8::quantize_levels(levels);
            Prepared::Int8(int8::quantize_activations(x, batch, n_in, order), l8, dl)
        }
    };
    let rows_per_task = (TASK_WEIGHTS / n_in).max(1);
    // The first non-finite scale, found by the tasks as they read their rows' scales (one pass
    // over data the kernel reads next, instead of a serial scan before the product).
    let bad_scale = AtomicUsize::new(usize::MAX);
    let task = |t: usize, dst: &mut [f32]| {
        let first = t * rows_per_task;
        let task_scales = &scales[first * scales_per_row..][..dst.len() / batch * scales_per_row];
        if !all_finite(task_scales) {
            if let Some(i) = task_scales.iter().position(|s| !s.is_finite()) {
                bad_scale.fetch_min(first * scales_per_row + i, Ordering::Relaxed);
            }
            return;
        }
        for (r, y) in dst.chunks_exact_mut(batch).enumerate() {
            let o = first + r;
            let c = &codes[o * bytes_per_row..(o + 1) * bytes_per_row];
            let s = &scales[o * scales_per_row..(o + 1) * scales_per_row];
            for b0 in (0..batch).step_by(TILE) {
                let nb = (batch - b0).min(TILE);
                let yt = &mut y[b0..b0 + nb];
                match &prepared {
                    Prepared::Float(xs) => {
                        let xt = &xs[b0 * n_in..(b0 + nb) * n_in];
                        // SAFETY: `isa` was checked to be supported by this CPU above.
                        unsafe { row_dot(isa, c, s, levels, &bytes, shape.block_size, xt, yt) };
                    }
                    Prepared::Int16(xq, l16, dl) => {
                        // SAFETY: as above; `xq` holds every activation row.
                        unsafe { row_dot_int16(isa, c, s, l16, *dl, shape.block_size, xq, b0, yt) };
                    }
                    Prepared::Int8(xq, l8, dl) => {
                        // SAFETY: as above; `xq` holds every activation row.
                        unsafe { row_dot_int8(isa, c, s, l8, *dl, shape.block_size, xq, b0, yt) };
                    }
                }
            }
        }
    };
    // Fills results row-major by output feature ([out, batch]).
    let run = |by_row: &mut [f32]| {
        if n_out * n_in * batch.min(TILE) <= INLINE_WEIGHTS {
            // Waking the pool would cost more than the split saves.
            task(0, by_row);
        } else {
            pool().install(|| {
                by_row
                    .par_chunks_mut(rows_per_task * batch)
                    .enumerate()
                    .for_each(|(t, dst)| task(t, dst))
            });
        }
    };
    if batch == 1 {
        run(out);
    } else {
        let mut by_row = vec![0f32; n_out * batch];
        run(&mut by_row);
        for (o, row) in by_row.chunks_exact(batch).enumerate() {
            for (b, &v) in row.iter().enumerate() {
                out[b * n_out + o] = v;
            }
        }
    }
    match bad_scale.into_inner() {
        usize::MAX => Ok(()),
        b => Err(Error::InvalidArgument {
            name: "scales",
            message: format!("scale of block {b} is not finite"),
        }),
    }
}

/// Whether every value is finite (a branch-free pass the compiler vectorizes).
fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| {
        ok & (v.to_bits() & 0x7F80_0000 != 0x7F80_0000)
    })
}

/// Activations in f32, permuted to the order the AVX2 decoder yields: within every 64 values
/// for block sizes >= 64 (`wide`), within every 8 otherwise.
fn permute<X: Activation>(x: &[X], wide: bool) -> Vec<f32> {
    let mut v = vec![0f32; x.len()];
    if wide {
        // Source 32 lane + 8 r + 2 k + h -> 32 h + 8 r + 4 lane + k (see `x86::decode64`).
        for (dst, src) in v.chunks_exact_mut(64).zip(x.chunks_exact(64)) {
            for (j, value) in src.iter().enumerate() {
                let (lane, r, k, h) = (j / 32, (j % 32) / 8, (j % 8) / 2, j % 2);
                dst[32 * h + 8 * r + 4 * lane + k] = value.to_f32();
            }
        }
    } else {
        for (dst, src) in v.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
            for j in 0..4 {
                dst[j] = src[2 * j].to_f32();
                dst[4 + j] = src[2 * j + 1].to_f32();
            }
        }
    }
    v
}

/// Calls the AVX2 row kernel `$f` monomorphized for the tile height `$y.len()` (1..=TILE).
macro_rules! by_tile {
    ($($f:ident)::+, $y:ident, ($($arg:expr),*)) => {
        match $y.len() {
            1 => $($f)::+::<1>($($arg,)* $y),
            2 => $($f)::+::<2>($($arg,)* $y),
            3 => $($f)::+::<3>($($arg,)* $y),
            _ => $($f)::+::<4>($($arg,)* $y),
        }
    };
}

/// Int16 dot products of one weight row with `y.len()` (1..=TILE) activation rows starting at
/// row `first` of `xq`.
///
/// # Safety
/// `isa` must be supported by the running CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_dot_int16(
    isa: Isa,
    codes: &[u8],
    scales: &[f32],
    l16: &[i16; 16],
    dl: f32,
    block_size: usize,
    xq: &int16::Quantized,
    first: usize,
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if block_size >= 64 => by_tile!(
            int16::x86::row_dot64,
            y,
            (codes, scales, l16, dl, block_size, xq, first)
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => by_tile!(
            int16::x86::row_dot32,
            y,
            (codes, scales, l16, dl, block_size, xq, first)
        ),
        _ => int16::row_dot_portable(codes, scales, l16, dl, block_size, xq, first, y),
    }
}

/// Int8 dot products of one weight row with `y.len()` (1..=TILE) activation rows starting at
/// row `first` of `xq`.
///
/// # Safety
/// `isa` must be supported by the running CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_dot_int8(
    isa: Isa,
    codes: &[u8],
    scales: &[f32],
    l8: &[i8; 16],
    dl: f32,
    block_size: usize,
    xq: &int8::Quantized,
    first: usize,
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if block_size >= 64 => by_tile!(
            int8::x86::row_dot64,
            y,
            (codes, scales, l8, dl, block_size, xq, first)
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => by_tile!(
            int8::x86::row_dot32,
            y,
            (codes, scales, l8, dl, block_size, xq, first)
        ),
        _ => int8::row_dot_portable(codes, scales, l8, dl, block_size, xq, first, y),
    }
}

/// Byte `k` of every level's f32 bits, per `k` (the AVX2 decoder's lookup tables).
fn byte_tables(levels: &[f32; 16]) -> [[u8; 16]; 4] {
    let mut bytes = [[0u8; 16]; 4];
    for (i, l) in levels.iter().enumerate() {
        for (k, b) in l.to_bits().to_le_bytes().into_iter().enumerate() {
            bytes[k][i] = b;
        }
    }
    bytes
}

/// Dot products of one weight row with `y.len()` (1..=TILE) activation rows.
///
/// # Safety
/// `isa` must be supported by the running CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_dot(
    isa: Isa,
    codes: &[u8],
    scales: &[f32],
    levels: &[f32; 16],
    bytes: &[[u8; 16]; 4],
    block_size: usize,
    x: &[f32],
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => match y.len() {
            1 => x86::row_dot::<1>(codes, scales, bytes, block_size, x, y),
            2 => x86::row_dot::<2>(codes, scales, bytes, block_size, x, y),
            3 => x86::row_dot::<3>(codes, scales, bytes, block_size, x, y),
            _ => x86::row_dot::<4>(codes, scales, bytes, block_size, x, y),
        },
        _ => row_dot_portable(codes, scales, levels, block_size, x, y),
    }
}

/// Portable row kernel: the definition of the results (x in natural order).
fn row_dot_portable(
    codes: &[u8],
    scales: &[f32],
    levels: &[f32; 16],
    block_size: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let n_in = codes.len() * 2;
    for (b, yb) in y.iter_mut().enumerate() {
        let xb = &x[b * n_in..(b + 1) * n_in];
        let mut total = 0f32;
        for ((c, xv), &s) in codes
            .chunks_exact(block_size / 2)
            .zip(xb.chunks_exact(block_size))
            .zip(scales)
        {
            let mut acc = 0f32;
            for (&byte, pair) in c.iter().zip(xv.chunks_exact(2)) {
                acc += levels[(byte >> 4) as usize] * pair[0];
                acc += levels[(byte & 15) as usize] * pair[1];
            }
            total += acc * s;
        }
        *yb = total;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The four byte tables, each broadcast to both 128-bit lanes.
    #[inline(always)]
    unsafe fn tables(bytes: &[[u8; 16]; 4]) -> [__m256i; 4] {
        bytes.map(|t| _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i)))
    }

    /// Decodes 32 codes (16 bytes at `p`) to 32 f32 levels in four registers. Register `r` holds
    /// values `8r + [0, 2, 4, 6, 1, 3, 5, 7]` (the order the activations are permuted to).
    #[inline(always)]
    unsafe fn decode32(
        p: *const u8,
        t: &[__m256i; 4],
        shifts: __m256i,
        nib: __m256i,
    ) -> [__m256; 4] {
        // Lane 0: high nibbles (even values), lane 1: low nibbles (odd values).
        let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
        levels32(_mm256_and_si256(_mm256_srlv_epi32(raw, shifts), nib), t)
    }

    /// The f32 levels of 32 codes whose nibble indices are in `idx` (one per byte).
    #[inline(always)]
    unsafe fn levels32(idx: __m256i, t: &[__m256i; 4]) -> [__m256; 4] {
        let b0 = _mm256_shuffle_epi8(t[0], idx);
        let b1 = _mm256_shuffle_epi8(t[1], idx);
        let b2 = _mm256_shuffle_epi8(t[2], idx);
        let b3 = _mm256_shuffle_epi8(t[3], idx);
        let lo01 = _mm256_unpacklo_epi8(b0, b1);
        let hi01 = _mm256_unpackhi_epi8(b0, b1);
        let lo23 = _mm256_unpacklo_epi8(b2, b3);
        let hi23 = _mm256_unpackhi_epi8(b2, b3);
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
        ]
    }

    /// Decodes 64 codes (32 bytes at `p`) to 64 f32 levels: `[h][r]` holds values
    /// `8r + [0, 2, 4, 6] + h` (low lane) and `32 + 8r + [0, 2, 4, 6] + h` (high lane), the order
    /// `permute` gives the activations (one shift per 64 codes instead of one per 32).
    #[inline(always)]
    unsafe fn decode64(p: *const u8, t: &[__m256i; 4], nib: __m256i) -> [[__m256; 4]; 2] {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        [
            levels32(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), t),
            levels32(_mm256_and_si256(raw, nib), t),
        ]
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// AVX2 row kernel for `NB` activation rows (x permuted per 8 values).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn row_dot<const NB: usize>(
        codes: &[u8],
        scales: &[f32],
        bytes: &[[u8; 16]; 4],
        block_size: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        let n_in = codes.len() * 2;
        debug_assert!(x.len() >= NB * n_in && y.len() >= NB);
        let t = tables(bytes);
        let shifts = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
        let nib = _mm256_set1_epi8(15);
        let cp = codes.as_ptr();
        let xp = x.as_ptr();
        // Independent FMA chains per activation row (hide the FMA latency; fewer rows, more).
        let ch = if NB == 1 {
            4
        } else if NB == 2 {
            2
        } else {
            1
        };
        let mut tot = [_mm256_setzero_ps(); NB];
        if block_size >= 64 {
            let groups = block_size / 64;
            for (blk, &s) in scales.iter().enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 4]; NB];
                for g in 0..groups {
                    let base = blk * block_size + g * 64;
                    let w = decode64(cp.add(base / 2), &t, nib);
                    for b in 0..NB {
                        let xb = xp.add(b * n_in + base);
                        for (h, wh) in w.iter().enumerate() {
                            for (r, wr) in wh.iter().enumerate() {
                                let a = &mut acc[b][r % ch];
                                let xv = _mm256_loadu_ps(xb.add(32 * h + 8 * r));
                                *a = _mm256_fmadd_ps(*wr, xv, *a);
                            }
                        }
                    }
                }
                let vs = _mm256_set1_ps(s);
                for b in 0..NB {
                    let mut sum = acc[b][0];
                    for a in &acc[b][1..ch] {
                        sum = _mm256_add_ps(sum, *a);
                    }
                    tot[b] = _mm256_fmadd_ps(sum, vs, tot[b]);
                }
            }
        } else if block_size == 32 {
            let groups = block_size / 32;
            for (blk, &s) in scales.iter().enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 4]; NB];
                for g in 0..groups {
                    let base = blk * block_size + g * 32;
                    let w = decode32(cp.add(base / 2), &t, shifts, nib);
                    for b in 0..NB {
                        let xb = xp.add(b * n_in + base);
                        for (r, wr) in w.iter().enumerate() {
                            let a = &mut acc[b][r % ch];
                            *a = _mm256_fmadd_ps(*wr, _mm256_loadu_ps(xb.add(8 * r)), *a);
                        }
                    }
                }
                let vs = _mm256_set1_ps(s);
                for b in 0..NB {
                    let mut sum = acc[b][0];
                    for a in &acc[b][1..ch] {
                        sum = _mm256_add_ps(sum, *a);
                    }
                    tot[b] = _mm256_fmadd_ps(sum, vs, tot[b]);
                }
            }
        } else {
            // Block size 16: the first two registers of a group belong to one block, the last
            // two to the next; a trailing half group (in % 32 == 16) is decoded the same way.
            for g in 0..n_in.div_ceil(32) {
                let base = g * 32;
                let whole = base + 32 <= n_in;
                let w = if whole {
                    decode32(cp.add(base / 2), &t, shifts, nib)
                } else {
                    let mut tail = [0u8; 16];
                    tail[..8].copy_from_slice(&codes[base / 2..base / 2 + 8]);
                    decode32(tail.as_ptr(), &t, shifts, nib)
                };
                let s0 = _mm256_set1_ps(scales[2 * g]);
                for b in 0..NB {
                    let xb = xp.add(b * n_in + base);
                    let mut a = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                    a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), a);
                    tot[b] = _mm256_fmadd_ps(a, s0, tot[b]);
                    if whole {
                        let s1 = _mm256_set1_ps(scales[2 * g + 1]);
                        let mut c = _mm256_mul_ps(w[2], _mm256_loadu_ps(xb.add(16)));
                        c = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), c);
                        tot[b] = _mm256_fmadd_ps(c, s1, tot[b]);
                    }
                }
            }
        }
        for b in 0..NB {
            y[b] = hsum(tot[b]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::codebook::{FP4, NF4};

    fn lcg(state: &mut u64) -> f64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
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
                    let c = if k % 2 == 0 {
                        codes[k / 2] >> 4
                    } else {
                        codes[k / 2] & 15
                    };
                    let w = levels[c as usize] as f64 * scales[k / shape.block_size] as f64;
                    y[b * n_out + o] += w * x[b * n_in + i] as f64;
                    mag[b * n_out + o] += (w * x[b * n_in + i] as f64).abs();
                }
            }
        }
        (y, mag)
    }

    #[test]
    fn every_isa_matches_the_float64_reference() {
        let mut st = 7u64;
        for levels in [NF4, FP4] {
            let cb = Codebook::new(&levels).unwrap();
            for &(n_out, n_in, bs) in &[
                (1, 16, 16),
                (3, 48, 16),
                (5, 64, 64),
                (6, 192, 64),
                (7, 96, 32),
                (33, 256, 128),
                (17, 4096, 4096),
                (2, 0, 64),
            ] {
                let shape = MatShape {
                    out_features: n_out,
                    in_features: n_in,
                    block_size: bs,
                };
                let (codes, scales) = random_weight(&mut st, shape);
                for batch in 1..=9 {
                    let x: Vec<f32> = (0..batch * n_in)
                        .map(|_| lcg(&mut st) as f32 * 10.0)
                        .collect();
                    let (want, mag) = reference(shape, &codes, &scales, &levels, &x, batch);
                    for isa in Isa::supported() {
                        let mut out = vec![f32::NAN; batch * n_out];
                        let got =
                            matvec_with_isa(isa, shape, batch, &codes, &scales, &cb, &x, &mut out);
                        assert_eq!(got, Ok(()));
                        for (k, (&g, (&w, &m))) in out.iter().zip(want.iter().zip(&mag)).enumerate()
                        {
                            let tol = m * (n_in as f64 + 4.0) * f32::EPSILON as f64 + 1e-30;
                            assert!(
                                (g as f64 - w).abs() <= tol,
                                "{isa:?} {shape:?} batch={batch} k={k}: {g} vs {w} (tol {tol})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Group size and largest integer of an integer activation mode.
    fn group_and_qmax(mode: Activations) -> (usize, f32) {
        match mode {
            Activations::Int16 => (int16::GROUP, int16::QMAX),
            Activations::Int8 => (int8::GROUP, int8::QMAX),
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
    /// ([`crate::blockwise::matvec::quant::error_bound_terms`]) plus f32 rounding of the sums.
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
                    let c = if k % 2 == 0 {
                        codes[k / 2] >> 4
                    } else {
                        codes[k / 2] & 15
                    };
                    let l = levels[c as usize];
                    let s = scales[k / shape.block_size].abs() as f64;
                    let dg = d[i / group];
                    q += s * crate::blockwise::matvec::quant::error_bound_terms(l, xb[i], dg, dl);
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
        let mut st = 11u64;
        for levels in [NF4, FP4] {
            let cb = Codebook::new(&levels).unwrap();
            for &(n_out, n_in, bs) in &[
                (1, 16, 16),
                (3, 48, 16),
                (4, 80, 16),
                (7, 96, 32),
                (5, 64, 64),
                (6, 192, 64),
                (33, 256, 128),
                (17, 4096, 4096),
                (2, 0, 64),
            ] {
                let shape = MatShape {
                    out_features: n_out,
                    in_features: n_in,
                    block_size: bs,
                };
                let (codes, scales) = random_weight(&mut st, shape);
                for batch in 1..=9 {
                    // Mixed magnitudes per group (the quantization step follows the largest).
                    let x: Vec<f32> = (0..batch * n_in)
                        .map(|i| {
                            let v = lcg(&mut st) as f32 * 10.0;
                            if i % 7 == 0 {
                                v * 100.0
                            } else if i % 64 == 5 {
                                0.0
                            } else {
                                v
                            }
                        })
                        .collect();
                    let (want, _) = reference(shape, &codes, &scales, &levels, &x, batch);
                    for (mode, isa) in integer_cases() {
                        let bound =
                            quantized_bound(mode, shape, &codes, &scales, &levels, &x, batch);
                        let mut out = vec![f32::NAN; batch * n_out];
                        let got = matvec_with_options(
                            isa, mode, shape, batch, &codes, &scales, &cb, &x, &mut out,
                        );
                        assert_eq!(got, Ok(()));
                        for (k, (&g, (&w, &t))) in
                            out.iter().zip(want.iter().zip(&bound)).enumerate()
                        {
                            assert!(
                                (g as f64 - w).abs() <= t,
                                "{mode:?} {isa:?} {shape:?} batch={batch} k={k}: {g} vs {w} \
                                 (bound {t})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn integer_orders_are_permutations_and_zero_rows_stay_zero() {
        for n in [16, 32, 48, 64, 128] {
            // Distinct magnitudes within each group, so a misplaced value shows.
            let x: Vec<f32> = (0..n).map(|i| ((i % 32) + 1) as f32).collect();
            let orders: &[int16::Order] = if n % 64 == 0 {
                &[int16::Order::Step32, int16::Order::Step64]
            } else {
                &[int16::Order::Step32]
            };
            for &order in orders {
                let q = int16::quantize_activations(&x, 1, n, order);
                let mut seen: Vec<i16> = q.q.clone();
                seen.sort_unstable();
                let mut natural = int16::quantize_activations(&x, 1, n, int16::Order::Natural).q;
                natural.sort_unstable();
                assert_eq!(seen, natural, "{order:?} n={n}");
            }
            let natural = int8::quantize_activations(&x, 1, n, int8::Order::Natural);
            let step32 = int8::quantize_activations(&x, 1, n, int8::Order::Step32);
            for j in 0..n {
                // Step32: per 32, the even values then the odd ones.
                let to = 32 * (j / 32) + 16 * (j % 2) + (j % 32) / 2;
                assert_eq!(
                    step32.values.q[to], natural.values.q[j],
                    "step32 n={n} j={j}"
                );
            }
            if n % 64 == 0 {
                let step64 = int8::quantize_activations(&x, 1, n, int8::Order::Step64);
                for j in 0..n {
                    let (c, r) = ((j % 64) / 32, j % 32);
                    let to = 64 * (j / 64) + 32 * (r % 2) + 16 * c + r / 2;
                    assert_eq!(
                        step64.values.q[to], natural.values.q[j],
                        "step64 n={n} j={j}"
                    );
                }
                for (g, &d) in natural.values.d.iter().enumerate() {
                    let lane = (g / 2) * 8 + (g % 2) * 4;
                    assert_eq!(step64.lane_steps[lane..lane + 4], [d; 4], "n={n} g={g}");
                }
            }
        }
        // All-zero activations: zero step, zero outputs (no 0/0).
        let cb = Codebook::new(&NF4).unwrap();
        let shape = MatShape {
            out_features: 3,
            in_features: 128,
            block_size: 64,
        };
        let codes = vec![0x5Au8; 3 * 64];
        for (mode, isa) in integer_cases() {
            let mut out = vec![f32::NAN; 3];
            matvec_with_options(
                isa,
                mode,
                shape,
                1,
                &codes,
                &[1.0; 6],
                &cb,
                &[0f32; 128],
                &mut out,
            )
            .unwrap();
            assert_eq!(out, vec![0.0; 3], "{mode:?} {isa:?}");
        }
    }

    #[test]
    fn integer_paths_give_non_finite_outputs_for_non_finite_activations() {
        let cb = Codebook::new(&NF4).unwrap();
        for bs in [16, 64] {
            let shape = MatShape {
                out_features: 2,
                in_features: 128,
                block_size: bs,
            };
            let codes = vec![0x9Fu8; 128];
            let scales = vec![1f32; 256 / bs];
            for bad in [f32::NAN, f32::INFINITY] {
                let mut x = vec![1f32; 128];
                x[70] = bad;
                for (mode, isa) in integer_cases() {
                    let mut out = vec![0f32; 2];
                    matvec_with_options(isa, mode, shape, 1, &codes, &scales, &cb, &x, &mut out)
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
        let shape = MatShape {
            out_features: 4,
            in_features: 64,
            block_size: 32,
        };
        let codes: Vec<u8> = (0..128).map(|i| (i * 29 + 3) as u8).collect();
        let scales = vec![0.5f32, -2.0, 1.25, 3.0, 0.0, 1.0, 7.0, 0.125];
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
            let mut a = vec![0f32; 8];
            let mut b = vec![0f32; 8];
            let mut h = vec![0f32; 8];
            matvec_with_isa(isa, shape, 2, &codes, &scales, &cb, &xf, &mut a).unwrap();
            matvec_with_isa(isa, shape, 2, &codes, &scales, &cb, &xb, &mut b).unwrap();
            matvec_with_isa(isa, shape, 2, &codes, &scales, &cb, &xh, &mut h).unwrap();
            assert_eq!(a, b, "{isa:?}");
            assert_eq!(a, h, "{isa:?}");
        }
    }

    #[test]
    fn reports_the_first_non_finite_scale_across_tasks() {
        let cb = Codebook::new(&NF4).unwrap();
        // Above the inline limit, 16 rows per task: the bad scales sit in tasks 12 and 17.
        let shape = MatShape {
            out_features: 320,
            in_features: 4096,
            block_size: 64,
        };
        let codes = vec![0x37u8; 320 * 2048];
        let x = vec![1f32; 2 * 4096];
        for mode in Activations::ALL {
            for isa in Isa::supported() {
                let mut scales = vec![1f32; 320 * 64];
                scales[280 * 64 + 3] = f32::INFINITY;
                scales[200 * 64 + 9] = f32::NAN;
                for batch in [1, 2] {
                    let mut out = vec![0f32; batch * 320];
                    let got = matvec_with_options(
                        isa,
                        mode,
                        shape,
                        batch,
                        &codes,
                        &scales,
                        &cb,
                        &x[..batch * 4096],
                        &mut out,
                    );
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
        let shape = MatShape {
            out_features: 2,
            in_features: 64,
            block_size: 64,
        };
        let (codes, scales, x) = (vec![0u8; 64], vec![1f32; 2], vec![1f32; 64]);
        let mut out = vec![0f32; 2];
        assert!(matvec(shape, 1, &codes, &scales, &cb, &x, &mut out).is_ok());
        assert!(matvec(shape, 1, &codes[..63], &scales, &cb, &x, &mut out).is_err());
        assert!(matvec(shape, 1, &codes, &scales[..1], &cb, &x, &mut out).is_err());
        assert!(matvec(shape, 1, &codes, &scales, &cb, &x[..63], &mut out).is_err());
        assert!(matvec(shape, 1, &codes, &scales, &cb, &x, &mut out[..1]).is_err());
        assert!(matvec(shape, 1, &codes, &[1.0, f32::INFINITY], &cb, &x, &mut out).is_err());
        let odd = MatShape {
            in_features: 48,
            block_size: 32,
            ..shape
        };
        assert!(matvec(odd, 1, &codes[..48], &scales, &cb, &x[..48], &mut out).is_err());
        let bad_bs = MatShape {
            block_size: 48,
            ..shape
        };
        assert!(matvec(bad_bs, 1, &codes, &scales, &cb, &x, &mut out).is_err());
    }
}
