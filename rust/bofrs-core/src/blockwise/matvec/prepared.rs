//! Products with activations prepared once: for callers that run many products of one input
//! (the projections that read the same hidden state) and split each product over rows
//! themselves (a decode engine that keeps its own pool busy).
//!
//! [`PreparedInput::prepare`] does the per-input work of [`super::matvec_with_options`] once
//! (widening and permuting, or quantizing the activations, for one kernel variant, activation
//! mode, codebook and block-size class); [`matvec_prepared`] then runs any row range of any
//! weight that matches, on the calling thread, with the same row kernels, so its results are
//! those of [`super::matvec_with_options`] bit for bit.

use super::Activations;
use super::{int_kernel, FloatRows, IntRows, PackedMatrix, Rows, WeightRow, TILE};
use crate::blockwise::codebook::Codebook;
use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::numeric::element::Element;

/// What a prepared input was prepared for: products that match it read it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    isa: Isa,
    activations: Activations,
    /// The codebook's levels (bits), which the integer paths round with the activations.
    levels: [u32; 16],
    /// Block size >= 64 (the 64-value kernels) or not.
    wide: bool,
    batch: usize,
    in_features: usize,
}

impl Key {
    fn new(
        isa: Isa,
        activations: Activations,
        codebook: &Codebook,
        block_size: usize,
        batch: usize,
        in_features: usize,
    ) -> Key {
        Key {
            isa,
            activations,
            levels: codebook.levels().map(f32::to_bits),
            wide: block_size >= 64,
            batch,
            in_features,
        }
    }

    /// The key of products of `weight` with `batch` activation rows.
    fn for_weight(
        isa: Isa,
        activations: Activations,
        weight: &PackedMatrix<'_>,
        batch: usize,
    ) -> Key {
        let shape = weight.shape;
        let (block_size, n_in) = (shape.block_size, shape.in_features);
        Key::new(isa, activations, weight.codebook, block_size, batch, n_in)
    }
}

/// The activations in the form one path's row kernels read.
enum Prepared {
    Float(FloatRows),
    Int16(IntRows<i16>),
    Int8(IntRows<i8>),
}

/// Activations prepared for [`matvec_prepared`]: `batch` rows of `in_features` values, for one
/// kernel variant, activation mode, codebook and block-size class (below 64, or 64 and up).
/// Reusable: [`PreparedInput::prepare`] replaces the contents.
#[derive(Default)]
pub struct PreparedInput {
    prepared: Option<(Key, Prepared)>,
}

impl PreparedInput {
    /// An empty input (prepare it before use).
    pub fn new() -> PreparedInput {
        PreparedInput::default()
    }

    /// Prepares `batch` rows of `x` (`batch * in_features` values) for products with weights of
    /// `codebook` and `block_size` (16..=4096, a power of two) in the mode `activations`, with
    /// the kernel variant `isa`.
    pub fn prepare<X: Element>(
        &mut self,
        isa: Isa,
        activations: Activations,
        codebook: &Codebook,
        block_size: usize,
        batch: usize,
        x: &[X],
    ) -> Result<()> {
        isa.ensure_supported()?;
        if !(16..=4096).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(Error::InvalidBlockSize(block_size));
        }
        if batch == 0 || x.len() % batch != 0 {
            return Err(Error::invalid(
                "batch",
                format!("{} values do not make {batch} whole rows", x.len()),
            ));
        }
        let n_in = x.len() / batch;
        let key = Key::new(isa, activations, codebook, block_size, batch, n_in);
        let levels = codebook.levels();
        let prepared = match activations {
            Activations::Float => {
                Prepared::Float(FloatRows::new(isa, levels, x, batch, n_in, key.wide))
            }
            Activations::Int16 => {
                let isa = int_kernel(isa, key.wide);
                Prepared::Int16(IntRows::new(isa, codebook, key.wide, x, batch, n_in))
            }
            Activations::Int8 => {
                let isa = int_kernel(isa, key.wide);
                Prepared::Int8(IntRows::new(isa, codebook, key.wide, x, batch, n_in))
            }
        };
        self.prepared = Some((key, prepared));
        Ok(())
    }

    /// Whether products of `weight` with `batch` activation rows in this kernel variant and
    /// mode read this input as it is (so that [`PreparedInput::prepare`] can be skipped).
    pub fn is_prepared_for(
        &self,
        isa: Isa,
        activations: Activations,
        weight: &PackedMatrix<'_>,
        batch: usize,
    ) -> bool {
        let key = Key::for_weight(isa, activations, weight, batch);
        matches!(&self.prepared, Some((k, _)) if *k == key)
    }
}

/// `out[o * batch + b] = sum_i x[b, i] * W[o, i]` (note the layout: by output feature, then
/// activation row) for every row `o` of `weight`, which may be any run of rows of a larger
/// weight, with the activations of `input`. Runs on the calling thread.
///
/// Scales are not checked here (a non-finite scale gives non-finite outputs): check a weight
/// once with [`check_scales`] before using it in many products.
pub fn matvec_prepared(
    weight: &PackedMatrix<'_>,
    input: &PreparedInput,
    out: &mut [f32],
) -> Result<()> {
    let Some((key, prepared)) = &input.prepared else {
        return Err(Error::invalid("input", "the input is not prepared"));
    };
    let shape = weight.shape;
    let batch = key.batch;
    shape.check(
        batch,
        weight.codes.len(),
        weight.scales.len(),
        batch * key.in_features,
        out.len(),
    )?;
    let expected = Key::for_weight(key.isa, key.activations, weight, batch);
    if expected != *key {
        return Err(Error::invalid(
            "input",
            "the input was prepared for another codebook, block-size class or activation mode",
        ));
    }
    if shape.in_features == 0 {
        out.fill(0.0);
        return Ok(());
    }
    match prepared {
        Prepared::Float(rows) => all_rows(key.isa, weight, batch, rows, out),
        Prepared::Int16(rows) => all_rows(int_kernel(key.isa, key.wide), weight, batch, rows, out),
        Prepared::Int8(rows) => all_rows(int_kernel(key.isa, key.wide), weight, batch, rows, out),
    }
    Ok(())
}

/// Every row of `weight` against `batch` prepared activation rows (`isa` supported and the
/// rows laid out for it: [`PreparedInput::prepare`] checked both; shapes checked).
fn all_rows<R: Rows>(isa: Isa, weight: &PackedMatrix<'_>, batch: usize, rows: &R, out: &mut [f32]) {
    let shape = weight.shape;
    let bytes_per_row = shape.in_features / 2;
    let scales_per_row = shape.in_features / shape.block_size;
    for (o, y) in out.chunks_exact_mut(batch).enumerate() {
        let w = WeightRow {
            codes: &weight.codes[o * bytes_per_row..(o + 1) * bytes_per_row],
            scales: &weight.scales[o * scales_per_row..(o + 1) * scales_per_row],
            block_size: shape.block_size,
        };
        for b0 in (0..batch).step_by(TILE) {
            let nb = (batch - b0).min(TILE);
            // SAFETY: `prepare` checked that `isa` runs on this CPU and laid the activations out
            // for the weight's block-size class (the key matched).
            unsafe { rows.rows(isa, &w, b0, &mut y[b0..b0 + nb]) };
        }
    }
}

/// An error naming the first non-finite block scale, if any.
pub fn check_scales(scales: &[f32]) -> Result<()> {
    crate::error::check_finite_scales(scales, "block")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::codebook::NF4;
    use crate::blockwise::matvec::{matvec_with_options, MatShape};
    use crate::testing::{lcg, step};

    fn nf4() -> Codebook {
        Codebook::new(&NF4).unwrap()
    }

    /// Prepared products (whole weights and row runs) equal the one-call product bit for bit,
    /// for every supported variant, mode, block-size class and tile height.
    #[test]
    fn prepared_rows_equal_the_one_call_product() {
        let book = nf4();
        let mut state = 7u64;
        for isa in Isa::supported() {
            for mode in Activations::ALL {
                for (n_out, n_in, bs, batch) in [(37, 128, 64, 1), (19, 96, 32, 3), (8, 80, 16, 6)]
                {
                    let codes: Vec<u8> = (0..n_out * n_in / 2)
                        .map(|_| (step(&mut state) >> 56) as u8)
                        .collect();
                    let scales = lcg(n_out * n_in / bs, step(&mut state));
                    let x = lcg(batch * n_in, step(&mut state));
                    let shape = MatShape::new(n_out, n_in, bs);
                    let w = PackedMatrix::new(shape, &codes, &scales, &book);
                    let mut want = vec![0f32; batch * n_out];
                    matvec_with_options(isa, mode, &w, batch, &x, &mut want).unwrap();
                    let mut input = PreparedInput::new();
                    input.prepare(isa, mode, &book, bs, batch, &x).unwrap();
                    assert!(input.is_prepared_for(isa, mode, &w, batch));
                    // Rows 5..n_out as their own weight.
                    let first = 5;
                    let part = PackedMatrix {
                        shape: MatShape {
                            out_features: n_out - first,
                            ..shape
                        },
                        codes: &codes[first * n_in / 2..],
                        scales: &scales[first * n_in / bs..],
                        codebook: &book,
                    };
                    let mut got = vec![0f32; (n_out - first) * batch];
                    matvec_prepared(&part, &input, &mut got).unwrap();
                    for o in first..n_out {
                        for b in 0..batch {
                            assert_eq!(
                                got[(o - first) * batch + b].to_bits(),
                                want[b * n_out + o].to_bits(),
                                "{isa:?} {mode:?} {n_out}x{n_in} bs {bs} row {o} batch {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let book = nf4();
        let x = vec![1f32; 128];
        let codes = vec![0x11u8; 2 * 64];
        let scales = vec![1f32; 8];
        let shape = MatShape::new(2, 128, 32);
        let w = PackedMatrix::new(shape, &codes, &scales, &book);
        let mut out = vec![0f32; 2];
        let empty = PreparedInput::new();
        assert!(matvec_prepared(&w, &empty, &mut out).is_err());
        let mut input = PreparedInput::new();
        // Prepared for the 64-value kernels, used with block size 32.
        input
            .prepare(Isa::best(), Activations::Int8, &book, 64, 1, &x)
            .unwrap();
        assert!(matvec_prepared(&w, &input, &mut out).is_err());
        input
            .prepare(Isa::best(), Activations::Int8, &book, 32, 1, &x)
            .unwrap();
        matvec_prepared(&w, &input, &mut out).unwrap();
        assert!(matvec_prepared(&w, &input, &mut [0f32; 3]).is_err());
        assert!(input
            .prepare(Isa::best(), Activations::Float, &book, 48, 1, &x)
            .is_err());
        assert!(input
            .prepare(Isa::best(), Activations::Float, &book, 32, 3, &x)
            .is_err());
        assert!(check_scales(&[1.0, f32::NAN]).is_err());
        assert!(check_scales(&[1.0, -2.0]).is_ok());
    }
}
