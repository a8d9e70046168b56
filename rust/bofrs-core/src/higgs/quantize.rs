//! HIGGS packing: per row, groups of `group_size` values (the last one zero-padded) are
//! Hadamard-rotated, scaled by their RMS, and cut into `dim`-tuples that take the code of the
//! nearest grid point. Codes are `log2(n)` bits each, LSB-first, and every group's codes fill a
//! whole number of bytes, so groups encode and decode independently, in parallel.

use super::search::GridSearch;
use crate::blockwise::scale::ScaleDType;
use crate::error::{check_finite_scales, check_len, check_lengths, Error, Result};
use crate::isa::Isa;
use crate::numeric::element::Element;
use crate::numeric::hadamard::{check_size, transform_one};
use crate::runtime::pool::pool;
use rayon::prelude::*;

/// Shape of a HIGGS-packed 2-D weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiggsLayout {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub dim: usize,
    pub bits: usize,
}

impl HiggsLayout {
    /// Validates the sizes against a grid.
    pub fn new(rows: usize, cols: usize, group_size: usize, grid: &GridSearch) -> Result<Self> {
        check_size(group_size).map_err(|_| {
            Error::invalid(
                "group_size",
                format!("must be a power of two in 16..32768, got {group_size}"),
            )
        })?;
        Ok(Self {
            rows,
            cols,
            group_size,
            dim: grid.dim(),
            bits: grid.len().trailing_zeros() as usize,
        })
    }

    /// Groups per row (the last one padded with zeros).
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }

    /// Row length in the rotated basis (a whole number of groups).
    pub fn padded_cols(&self) -> usize {
        self.groups_per_row() * self.group_size
    }

    /// Number of groups (= scales).
    pub fn num_groups(&self) -> usize {
        self.rows * self.groups_per_row()
    }

    /// Bytes of codes per group.
    pub fn group_bytes(&self) -> usize {
        self.group_size / self.dim * self.bits / 8
    }

    /// Bytes of codes in all.
    pub fn code_bytes(&self) -> usize {
        self.num_groups() * self.group_bytes()
    }

    fn check(&self, values: usize, codes: usize, scales: usize) -> Result<()> {
        check_lengths(&[
            ("data", self.rows * self.cols, values),
            ("codes", self.code_bytes(), codes),
            ("scales", self.num_groups(), scales),
        ])
    }
}

/// Writes `code` (`bits` wide) at position `index` of an LSB-first bit stream.
#[cfg(test)]
fn put(out: &mut [u8], index: usize, bits: usize, code: u8) {
    let pos = index * bits;
    let (byte, shift) = (pos / 8, pos % 8);
    let wide = (code as u16) << shift;
    out[byte] |= wide as u8;
    if shift + bits > 8 {
        out[byte + 1] |= (wide >> 8) as u8;
    }
}

/// Reads the code at position `index` of an LSB-first bit stream.
#[inline(always)]
pub(crate) fn get(data: &[u8], index: usize, bits: usize) -> usize {
    let pos = index * bits;
    let (byte, shift) = (pos / 8, pos % 8);
    let mut wide = data[byte] as u16;
    if shift + bits > 8 {
        wide |= (data[byte + 1] as u16) << 8;
    }
    ((wide >> shift) & ((1u16 << bits) - 1)) as usize
}

/// Packs a `rows x cols` row-major weight. `codes` must be zeroed; `scales` receives each
/// group's RMS, rounded to `scale_dtype` (the codes are chosen against the rounded scale).
pub fn higgs_pack<E: Element>(
    data: &[E],
    layout: &HiggsLayout,
    grid: &GridSearch,
    scale_dtype: ScaleDType,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    layout.check(data.len(), codes.len(), scales.len())?;
    let isa = Isa::best();
    let (g, cols, per_row) = (layout.group_size, layout.cols, layout.groups_per_row());
    let group_bytes = layout.group_bytes().max(1);
    let first_error = pool().install(|| {
        codes
            .par_chunks_mut(group_bytes)
            .zip(scales.par_iter_mut())
            .enumerate()
            .map_init(
                || (vec![0f32; g], vec![0u8; g / layout.dim]),
                |(buf, codes), (index, (out, scale))| -> Result<()> {
                    let (row, group) = (index / per_row, index % per_row);
                    let start = group * g;
                    let take = g.min(cols - start);
                    let source = &data[row * cols + start..row * cols + start + take];
                    for (b, v) in buf.iter_mut().zip(source) {
                        if v.abs_bits() >= E::NON_FINITE_ABS_BITS {
                            let at = source
                                .iter()
                                .position(|v| v.abs_bits() >= E::NON_FINITE_ABS_BITS);
                            return Err(Error::NonFinite {
                                index: row * cols + start + at.unwrap_or(0),
                            });
                        }
                        *b = v.to_f32();
                    }
                    buf[take..].fill(0.0);
                    transform_one(isa, buf);
                    let power = sum_of_squares(buf);
                    let rms = (power / g as f64).sqrt() as f32;
                    let stored = scale_dtype
                        .store(rms, f32::MAX)
                        .ok_or(Error::ScaleOverflow {
                            block: index,
                            value: rms,
                            dtype: scale_dtype.name(),
                        })?;
                    *scale = stored;
                    let inv = if stored > 0.0 { 1.0 / stored } else { 0.0 };
                    encode_group(buf, inv, grid, layout, codes, out);
                    Ok(())
                },
            )
            .filter_map(|r| r.err())
            .min_by_key(|e| match e {
                Error::NonFinite { index } => *index,
                _ => usize::MAX,
            })
    });
    first_error.map_or(Ok(()), Err)
}

#[inline(always)]
fn encode_group(
    buf: &[f32],
    inv: f32,
    grid: &GridSearch,
    layout: &HiggsLayout,
    codes: &mut [u8],
    out: &mut [u8],
) {
    if layout.dim == 1 {
        for (c, &u) in codes.iter_mut().zip(buf) {
            *c = grid.nearest_1d(u * inv);
        }
    } else {
        for (c, pair) in codes.iter_mut().zip(buf.chunks_exact(2)) {
            *c = grid.nearest_2d(pair[0] * inv, pair[1] * inv);
        }
    }
    write_stream(codes, layout.bits, out);
}

/// Writes codes as an LSB-first stream of `bits`-wide fields (the layout [`get`] reads).
#[inline(always)]
fn write_stream(codes: &[u8], bits: usize, out: &mut [u8]) {
    let (mut acc, mut filled, mut pos) = (0u64, 0usize, 0usize);
    for &c in codes {
        acc |= (c as u64) << filled;
        filled += bits;
        while filled >= 8 {
            out[pos] = acc as u8;
            acc >>= 8;
            filled -= 8;
            pos += 1;
        }
    }
    if filled > 0 {
        out[pos] = acc as u8;
    }
}

/// Decodes one group's code stream into `buf` (`group_size` values), scaled by `s`.
#[inline(always)]
pub(crate) fn decode_group(
    stream: &[u8],
    s: f32,
    layout: &HiggsLayout,
    grid: &GridSearch,
    buf: &mut [f32],
) {
    for (i, slot) in buf.chunks_exact_mut(layout.dim).enumerate() {
        let point = grid.point(get(stream, i, layout.bits));
        for (o, &p) in slot.iter_mut().zip(point) {
            *o = p * s;
        }
    }
}

/// Decodes the groups of output row `row` in order into `buf` (`group_size` values in the
/// rotated basis, scale applied) and hands each to `f` with its group index.
#[inline(always)]
pub(crate) fn decode_row(
    codes: &[u8],
    scales: &[f32],
    (layout, grid): (&HiggsLayout, &GridSearch),
    row: usize,
    buf: &mut [f32],
    mut f: impl FnMut(usize, &mut [f32]),
) {
    let (per_row, group_bytes) = (layout.groups_per_row(), layout.group_bytes());
    for group in 0..per_row {
        let index = row * per_row + group;
        let stream = &codes[index * group_bytes..(index + 1) * group_bytes];
        decode_group(stream, scales[index], layout, grid, buf);
        f(group, buf);
    }
}

/// Sum of squares in f64 with four interleaved accumulators (one long chain of dependent
/// f64 adds would cost 4 cycles a value).
#[inline(always)]
fn sum_of_squares(values: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    for chunk in values.chunks_exact(4) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v as f64 * v as f64;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Decodes to `rows x cols` weights in the original basis (`rotated = false`) or to
/// `rows x padded_cols` weights in the rotated basis (`rotated = true`, no inverse transform).
pub fn higgs_unpack(
    codes: &[u8],
    scales: &[f32],
    layout: &HiggsLayout,
    grid: &GridSearch,
    rotated: bool,
    out: &mut [f32],
) -> Result<()> {
    let width = if rotated {
        layout.padded_cols()
    } else {
        layout.cols
    };
    layout.check(layout.rows * layout.cols, codes.len(), scales.len())?;
    check_len("out", layout.rows * width, out.len())?;
    check_finite_scales(scales, "group")?;
    let isa = Isa::best();
    let g = layout.group_size;
    if layout.rows == 0 || width == 0 {
        return Ok(());
    }
    pool().install(|| {
        out.par_chunks_mut(width).enumerate().for_each_init(
            || vec![0f32; g],
            |buf, (row, out_row)| {
                decode_row(codes, scales, (layout, grid), row, buf, |group, buf| {
                    if !rotated {
                        transform_one(isa, buf);
                    }
                    let start = group * g;
                    let take = g.min(width - start);
                    out_row[start..start + take].copy_from_slice(&buf[..take]);
                })
            },
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::higgs::grid::{plane_grid, scalar_grid};
    use crate::testing::{higgs_packed, step, uniform, HiggsPacked};

    #[test]
    fn bit_stream_round_trips_every_width() {
        for bits in [1usize, 2, 3, 4, 5, 6, 7, 8] {
            let n = 64;
            let mut buf = vec![0u8; n * bits / 8];
            let codes: Vec<u8> = (0..n).map(|i| ((i * 37 + 5) % (1 << bits)) as u8).collect();
            for (i, &c) in codes.iter().enumerate() {
                put(&mut buf, i, bits, c);
            }
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(get(&buf, i, bits), c as usize, "bits={bits}");
            }
            let mut streamed = vec![0u8; buf.len()];
            write_stream(&codes, bits, &mut streamed);
            assert_eq!(streamed, buf, "bits={bits}");
        }
    }

    #[test]
    fn relative_error_equals_the_grid_mse_on_gaussian_weights() {
        let (rows, cols) = (64, 1000);
        let mut state = 7u64;
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let u = ((step(&mut state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let v = uniform(&mut state);
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        for grid in [
            scalar_grid(16).unwrap(),
            scalar_grid(32).unwrap(),
            scalar_grid(64).unwrap(),
            plane_grid(16, 0).unwrap(),
        ] {
            let HiggsPacked {
                search,
                layout,
                codes,
                scales,
            } = higgs_packed(&data, (rows, cols), 256, &grid);
            let mut out = vec![0f32; rows * cols];
            higgs_unpack(&codes, &scales, &layout, &search, false, &mut out).unwrap();
            let err: f64 = data
                .iter()
                .zip(&out)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = data.iter().map(|&a| (a as f64).powi(2)).sum();
            let relative = err / norm;
            // Padding (1000 -> 1024 per row) adds a little spread; within 5 % of the grid MSE.
            assert!(
                (relative - grid.mse).abs() < 0.05 * grid.mse,
                "{relative} vs {}",
                grid.mse
            );
        }
    }
}
