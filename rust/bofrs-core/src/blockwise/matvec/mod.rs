//! Fused 4-bit matrix-vector products: `y[b, o] = sum_i x[b, i] * level[code(o, i)] * scale(o, i)`
//! for a 2-D weight `[out, in]` packed row-major, without ever materializing the dense weight.
//!
//! Requirements: `in % block_size == 0` (every block lies inside one row). Activations are f32,
//! bf16 or f16 (`batch` rows of `in` values), accumulated in f32; the output is f32 `[batch, out]`.
//!
//! Kernels (`portable` beside its twin `x86`):
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
//! quantize the activations to int16 per 64 or int8 per 32 and run integer dot products instead:
//! one generic path over the integer type, see [`quant`].
//!
//! Work is split over output rows on the dedicated pool; batches are processed in tiles of up to
//! four activation rows, so each decoded weight feeds up to four FMAs.

mod portable;
pub mod quant;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::blockwise::codebook::Codebook;
use crate::error::{Error, Result};
use crate::isa::{dispatch, Isa};
use crate::numeric::element::Element;
use crate::runtime::pool::pool;
use quant::{QInt, Quantized};
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
    /// twice as fast at batch 1, relative error about 6e-5 (see [`quant`]).
    Int16,
    /// Quantized to int8 per 32 values, integer dot products with int8-rounded levels (as
    /// llama.cpp): the fastest, relative error about 7e-3 (see [`quant`]).
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

/// A packed 2-D weight as the product reads it.
#[derive(Debug, Clone, Copy)]
pub struct PackedMatrix<'a> {
    pub shape: MatShape,
    /// `out_features * in_features / 2` bytes of codes, row-major.
    pub codes: &'a [u8],
    /// One decoded scale per block.
    pub scales: &'a [f32],
    pub codebook: &'a Codebook,
}

/// One output row of the weight, as the row kernels read it.
pub struct WeightRow<'a> {
    /// `in_features / 2` bytes.
    pub codes: &'a [u8],
    /// `in_features / block_size` scales.
    pub scales: &'a [f32],
    pub block_size: usize,
}

/// `out[b * out_features + o] = sum_i x[b * in + i] * W[o, i]` for `batch` activation rows, with
/// the best kernel of this CPU. `x` holds `batch * in_features` values, `out` `batch *
/// out_features`. A non-finite scale is an error, found while the product runs (`out` is then
/// unspecified).
pub fn matvec<X: Element>(
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
    out: &mut [f32],
) -> Result<()> {
    matvec_with_isa(Isa::best(), weight, batch, x, out)
}

/// [`matvec`] with an explicit kernel variant.
pub fn matvec_with_isa<X: Element>(
    isa: Isa,
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
    out: &mut [f32],
) -> Result<()> {
    matvec_with_options(isa, Activations::Float, weight, batch, x, out)
}

/// [`matvec`] with an explicit kernel variant and activation mode.
pub fn matvec_with_options<X: Element>(
    isa: Isa,
    activations: Activations,
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
    out: &mut [f32],
) -> Result<()> {
    isa.ensure_supported()?;
    let shape = weight.shape;
    let (codes, scales) = (weight.codes, weight.scales);
    shape.check(batch, codes.len(), scales.len(), x.len(), out.len())?;
    if out.is_empty() {
        return Ok(());
    }
    if shape.in_features == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let fast = isa != Isa::Portable;
    let wide = shape.block_size >= 64;
    let levels = weight.codebook.levels();
    // Activations for the chosen path, in the order its kernel reads them.
    match activations {
        Activations::Float => {
            let rows = FloatRows {
                #[cfg(target_arch = "x86_64")]
                bytes: x86::byte_tables(levels),
                levels,
                x: if fast {
                    permuted(x, wide)
                } else {
                    x.iter().map(|v| v.to_f32()).collect()
                },
            };
            product(isa, weight, batch, &rows, out)
        }
        Activations::Int16 => product(
            isa,
            weight,
            batch,
            &IntRows::<i16>::new(fast, weight, x, batch),
            out,
        ),
        Activations::Int8 => product(
            isa,
            weight,
            batch,
            &IntRows::<i8>::new(fast, weight, x, batch),
            out,
        ),
    }
}

/// [`x86::permute`] where it exists (only AVX2 kernels read permuted activations).
fn permuted<X: Element>(x: &[X], wide: bool) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    let v = x86::permute(x, wide);
    #[cfg(not(target_arch = "x86_64"))]
    let v = {
        let _ = wide;
        x.iter().map(|v| v.to_f32()).collect()
    };
    v
}

/// Activations prepared for one path's row kernels.
trait Rows: Sync {
    /// Products of one weight row with activation rows `first..first + y.len()` (at most
    /// [`TILE`]).
    ///
    /// # Safety
    /// `isa` must be supported by the running CPU.
    unsafe fn rows(&self, isa: Isa, w: &WeightRow<'_>, first: usize, y: &mut [f32]);
}

/// The float path: activations widened to f32 (permuted for the AVX2 kernel).
struct FloatRows<'a> {
    levels: &'a [f32; 16],
    #[cfg(target_arch = "x86_64")]
    bytes: [[u8; 16]; 4],
    x: Vec<f32>,
}

impl Rows for FloatRows<'_> {
    #[inline(always)]
    unsafe fn rows(&self, isa: Isa, w: &WeightRow<'_>, first: usize, y: &mut [f32]) {
        let n_in = w.codes.len() * 2;
        let x = &self.x[first * n_in..(first + y.len()) * n_in];
        dispatch!(isa,
            // SAFETY: the caller checked `isa`.
            avx2 => unsafe { x86::float_rows(w, &self.bytes, x, y) },
            portable => portable::float_rows(w, self.levels, x, y),
        )
    }
}

/// An integer path: activations quantized to `Q` per group, the levels rounded to `Q`.
struct IntRows<Q> {
    xq: Quantized<Q>,
    levels: [Q; 16],
    dl: f32,
}

impl<Q: QInt> IntRows<Q> {
    /// Quantizes `batch` rows of `x` in the order the kernels of `fast` (AVX2) or portable read.
    fn new<X: Element>(fast: bool, weight: &PackedMatrix<'_>, x: &[X], batch: usize) -> Self {
        let order = match (fast, weight.shape.block_size >= 64) {
            (false, _) => quant::Order::Natural,
            (true, true) => quant::Order::Step64,
            (true, false) => quant::Order::Step32,
        };
        let (levels, dl) = quant::quantize_levels(weight.codebook.levels());
        let xq = quant::quantize_activations(x, batch, weight.shape.in_features, order);
        Self { xq, levels, dl }
    }
}

impl<Q: QInt> Rows for IntRows<Q> {
    #[inline(always)]
    unsafe fn rows(&self, isa: Isa, w: &WeightRow<'_>, first: usize, y: &mut [f32]) {
        let levels = (&self.levels, self.dl);
        dispatch!(isa,
            // SAFETY: the caller checked `isa`; `new` laid `xq` out for the AVX2 kernels.
            avx2 => unsafe { Q::avx2_rows(w, levels, &self.xq, first, y) },
            portable => portable::int_rows(w, levels, &self.xq, first, y),
        )
    }
}

/// The product with prepared activations (`isa` supported, shapes checked, `out` not empty,
/// `in_features > 0`).
fn product<R: Rows>(
    isa: Isa,
    weight: &PackedMatrix<'_>,
    batch: usize,
    rows: &R,
    out: &mut [f32],
) -> Result<()> {
    let shape = weight.shape;
    let (codes, scales) = (weight.codes, weight.scales);
    let (n_in, n_out) = (shape.in_features, shape.out_features);
    let bytes_per_row = n_in / 2;
    let scales_per_row = n_in / shape.block_size;
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
            let w = WeightRow {
                codes: &codes[o * bytes_per_row..(o + 1) * bytes_per_row],
                scales: &scales[o * scales_per_row..(o + 1) * scales_per_row],
                block_size: shape.block_size,
            };
            for b0 in (0..batch).step_by(TILE) {
                let nb = (batch - b0).min(TILE);
                // SAFETY: the caller checked `isa`.
                unsafe { rows.rows(isa, &w, b0, &mut y[b0..b0 + nb]) };
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
