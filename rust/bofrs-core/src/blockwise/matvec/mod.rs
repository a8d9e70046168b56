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

/// Calls the row kernel `$f` monomorphized for the tile height `$y.len()` (1..=4).
#[cfg(target_arch = "x86_64")]
macro_rules! by_tile {
    ($f:ident, $y:ident, ($($arg:expr),*)) => {
        match $y.len() {
            1 => $f::<1>($($arg,)* $y),
            2 => $f::<2>($($arg,)* $y),
            3 => $f::<3>($($arg,)* $y),
            _ => $f::<4>($($arg,)* $y),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
mod prepared;
pub mod quant;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::blockwise::codebook::Codebook;
use crate::error::{check_len, Error, Result};
use crate::isa::{dispatch, Isa};
use crate::numeric::element::Element;
use crate::runtime::pool::pool;
use quant::{QInt, Quantized};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use prepared::{check_scales, matvec_prepared, PreparedInput};

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
    /// A shape of `out_features` rows of `in_features` values in blocks of `block_size` (not
    /// checked here: the products check it, see [`MatShape::check`]).
    pub const fn new(out_features: usize, in_features: usize, block_size: usize) -> Self {
        Self {
            out_features,
            in_features,
            block_size,
        }
    }

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
            return Err(Error::invalid(
                "in_features",
                format!(
                    "{} is not a multiple of block_size={bs}; the fused kernel needs whole \
                     blocks per row",
                    self.in_features
                ),
            ));
        }
        let overflow = || Error::invalid("out_features", "sizes overflow");
        let n = self
            .out_features
            .checked_mul(self.in_features)
            .ok_or_else(overflow)?;
        let nx = batch.checked_mul(self.in_features).ok_or_else(overflow)?;
        let ny = batch.checked_mul(self.out_features).ok_or_else(overflow)?;
        check_len("codes", n / 2, codes)?;
        check_len("scales", n / bs, scales)?;
        check_len("x", nx, x)?;
        check_len("out", ny, out)
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

impl<'a> PackedMatrix<'a> {
    /// The weight of `shape` with these codes, scales and codebook (checked where it is used).
    pub fn new(
        shape: MatShape,
        codes: &'a [u8],
        scales: &'a [f32],
        codebook: &'a Codebook,
    ) -> Self {
        Self {
            shape,
            codes,
            scales,
            codebook,
        }
    }
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
    matvec_with_options(Isa::best(), Activations::Float, weight, batch, x, out)
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
    let levels = weight.codebook.levels();
    let bs = shape.block_size;
    // Activations for the chosen path, in the order its kernel reads them.
    match activations {
        Activations::Float => {
            let rows = FloatRows::new(isa, levels, x, batch, shape.in_features, bs >= 64);
            product(isa, weight, batch, &rows, out)
        }
        Activations::Int16 => {
            let isa = int_kernel(isa, bs >= 64);
            let rows =
                IntRows::<i16>::new(isa, weight.codebook, bs >= 64, x, batch, shape.in_features);
            product(isa, weight, batch, &rows, out)
        }
        Activations::Int8 => {
            let isa = int_kernel(isa, bs >= 64);
            let rows =
                IntRows::<i8>::new(isa, weight.codebook, bs >= 64, x, batch, shape.in_features);
            product(isa, weight, batch, &rows, out)
        }
    }
}

/// The variant a product in `activations` mode runs when the caller names none: the best of
/// this CPU, except that the integer modes take the AVX2 kernels over the AVX-512 ones. Those
/// give the same bits and stay selectable by name, but measured slower on the Zen 4 we test on
/// (512-bit integer ops issue as two 256-bit halves there): int8 by about 10 %, int16 by about
/// 1.6x (`cargo run --release --example matvec_time`, one core, CPU time).
pub fn default_isa(activations: Activations) -> Isa {
    preferred_isa(Isa::best(), activations)
}

/// [`default_isa`] with `isa` as the most the caller allows (a decoder built for one variant
/// runs its integer products on the AVX2 kernels when that variant is AVX-512).
pub fn preferred_isa(isa: Isa, activations: Activations) -> Isa {
    match (isa, activations) {
        (Isa::Avx512, Activations::Int16 | Activations::Int8) => Isa::Avx2,
        (isa, _) => isa,
    }
}

/// The kernel variant an integer path runs for `isa`: the AVX-512 integer kernels take block
/// sizes >= 64 (`wide`); smaller blocks run the AVX2 ones (the same results).
fn int_kernel(isa: Isa, wide: bool) -> Isa {
    if isa == Isa::Avx512 && !wide {
        Isa::Avx2
    } else {
        isa
    }
}

/// The float path's activations as `isa`'s kernel reads them (widened to f32, permuted for the
/// x86 kernels; `wide`: block sizes >= 64), and their row stride.
fn float_activations<X: Element>(
    isa: Isa,
    x: &[X],
    batch: usize,
    n_in: usize,
    wide: bool,
) -> (Vec<f32>, usize) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return avx512::permute128(x, batch, n_in),
        Isa::Avx2 => return (x86::permute(x, wide), n_in),
        Isa::Portable => {}
    }
    let _ = (isa, batch, wide);
    (x.iter().map(|v| v.to_f32()).collect(), n_in)
}

/// Activations prepared for one path's row kernels.
trait Rows: Sync {
    /// Products of one weight row with activation rows `first..first + y.len()` (at most
    /// [`TILE`]).
    ///
    /// # Safety
    /// `isa` must be supported by the running CPU, and be the one the rows were prepared for.
    unsafe fn rows(&self, isa: Isa, w: &WeightRow<'_>, first: usize, y: &mut [f32]);
}

/// The float path: activations widened to f32 (permuted for the x86 kernels).
struct FloatRows {
    levels: [f32; 16],
    #[cfg(target_arch = "x86_64")]
    bytes: [[u8; 16]; 4],
    x: Vec<f32>,
    /// Values per activation row of `x` (`in_features`, padded for the AVX-512 kernel).
    stride: usize,
}

impl FloatRows {
    /// `batch` rows of `x` (`n_in` values each) for `isa`'s float kernel and a codebook's
    /// `levels` (`wide`: block sizes >= 64).
    fn new<X: Element>(
        isa: Isa,
        levels: &[f32; 16],
        x: &[X],
        batch: usize,
        n_in: usize,
        wide: bool,
    ) -> Self {
        let (x, stride) = float_activations(isa, x, batch, n_in, wide);
        FloatRows {
            #[cfg(target_arch = "x86_64")]
            bytes: x86::byte_tables(levels),
            levels: *levels,
            x,
            stride,
        }
    }
}

impl Rows for FloatRows {
    #[inline(always)]
    unsafe fn rows(&self, isa: Isa, w: &WeightRow<'_>, first: usize, y: &mut [f32]) {
        let stride = self.stride;
        let x = &self.x[first * stride..(first + y.len()) * stride];
        dispatch!(isa,
            // SAFETY: the caller checked `isa`; `x` was laid out for it.
            avx512 => unsafe { avx512::float_rows(w, &self.levels, x, stride, y) },
            avx2 => unsafe { x86::float_rows(w, &self.bytes, x, y) },
            portable => portable::float_rows(w, &self.levels, x, y),
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
    /// Quantizes `batch` rows of `x` (`n_in` values each) in the order the kernels of `isa`
    /// read for weights of `codebook` (`wide`: block sizes >= 64; the AVX-512 kernels only for
    /// those, see [`int_kernel`]).
    fn new<X: Element>(
        isa: Isa,
        codebook: &Codebook,
        wide: bool,
        x: &[X],
        batch: usize,
        n_in: usize,
    ) -> Self {
        let order = match (isa, wide) {
            (Isa::Portable, _) => quant::Order::Natural,
            (Isa::Avx512, true) => quant::Order::Step128,
            (_, true) => quant::Order::Step64,
            (_, false) => quant::Order::Step32,
        };
        let (levels, dl) = quant::quantize_levels(codebook.levels());
        let xq = quant::quantize_activations(x, batch, n_in, order);
        Self { xq, levels, dl }
    }
}

impl<Q: QInt> Rows for IntRows<Q> {
    #[inline(always)]
    unsafe fn rows(&self, isa: Isa, w: &WeightRow<'_>, first: usize, y: &mut [f32]) {
        let levels = (&self.levels, self.dl);
        dispatch!(isa,
            // SAFETY: the caller checked `isa`; `new` laid `xq` out for its kernels.
            avx512 => unsafe { Q::avx512_rows(w, levels, &self.xq, first, y) },
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
        b => Err(Error::invalid(
            "scales",
            format!("scale of block {b} is not finite"),
        )),
    }
}

/// Whether every value is finite (a branch-free pass the compiler vectorizes).
fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| {
        ok & (v.to_bits() & 0x7F80_0000 != 0x7F80_0000)
    })
}
