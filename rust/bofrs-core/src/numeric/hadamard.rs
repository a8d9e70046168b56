//! The orthonormal fast Walsh-Hadamard transform, in place, over consecutive rows.
//!
//! `H_n / sqrt(n)` (Sylvester order) is symmetric and orthogonal, so the transform is its own
//! inverse. Butterflies run stage by stage; the first three stages work on 8-value chunks in
//! registers, the others over contiguous halves, which the compiler vectorizes (the AVX2 variant
//! compiles the same body with AVX2 enabled: bit-identical results). Rows are spread over the
//! pool.

use crate::error::{check_len, Error, Result};
use crate::isa::{dispatch, Isa};
use crate::runtime::pool::{pool, TASK_VALUES};
use rayon::prelude::*;

/// Smallest and largest transform sizes.
pub const MIN_SIZE: usize = 16;
pub const MAX_SIZE: usize = 1 << 15;

/// Checks that `size` is a power of two in [`MIN_SIZE`]..=[`MAX_SIZE`].
pub fn check_size(size: usize) -> Result<()> {
    if (MIN_SIZE..=MAX_SIZE).contains(&size) && size.is_power_of_two() {
        Ok(())
    } else {
        Err(Error::invalid(
            "size",
            format!("must be a power of two in {MIN_SIZE}..{MAX_SIZE}, got {size}"),
        ))
    }
}

#[inline(always)]
fn first_stages(v: &mut [f32]) {
    for c in v.chunks_exact_mut(8) {
        let (a0, a1, a2, a3) = (c[0] + c[1], c[0] - c[1], c[2] + c[3], c[2] - c[3]);
        let (a4, a5, a6, a7) = (c[4] + c[5], c[4] - c[5], c[6] + c[7], c[6] - c[7]);
        let (b0, b1, b2, b3) = (a0 + a2, a1 + a3, a0 - a2, a1 - a3);
        let (b4, b5, b6, b7) = (a4 + a6, a5 + a7, a4 - a6, a5 - a7);
        c[0] = b0 + b4;
        c[1] = b1 + b5;
        c[2] = b2 + b6;
        c[3] = b3 + b7;
        c[4] = b0 - b4;
        c[5] = b1 - b5;
        c[6] = b2 - b6;
        c[7] = b3 - b7;
    }
}

/// One butterfly stage of half-width `h` (`h >= 8`: contiguous halves, vectorized).
#[inline(always)]
fn stage(v: &mut [f32], h: usize) {
    for block in v.chunks_exact_mut(2 * h) {
        let (a, b) = block.split_at_mut(h);
        for (x, y) in a.iter_mut().zip(b.iter_mut()) {
            let (p, q) = (*x, *y);
            *x = p + q;
            *y = p - q;
        }
    }
}

#[inline(always)]
fn transform_row(v: &mut [f32]) {
    let n = v.len();
    first_stages(v);
    let mut h = 8;
    while h < n {
        stage(v, h);
        h *= 2;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for x in v.iter_mut() {
        *x *= scale;
    }
}

fn rows_portable(data: &mut [f32], size: usize) {
    data.chunks_exact_mut(size).for_each(transform_row);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(data: &mut [f32], size: usize) {
    data.chunks_exact_mut(size).for_each(transform_row);
}

/// Transforms one row (a power-of-two length from [`MIN_SIZE`] to [`MAX_SIZE`]) in place on the
/// calling thread; for use inside kernels that already run on the pool. `isa` must be supported.
pub fn transform_one(isa: Isa, row: &mut [f32]) {
    debug_assert!(check_size(row.len()).is_ok());
    let size = row.len();
    rows(isa, row, size)
}

/// Transforms every run of `size` values of `data` with the kernel of `isa` (supported).
#[inline(always)]
fn rows(isa: Isa, data: &mut [f32], size: usize) {
    dispatch!(isa,
        // SAFETY: callers pass a variant `ensure_supported` accepted: AVX2 and FMA are there.
        avx2 => unsafe { rows_avx2(data, size) },
        portable => rows_portable(data, size),
    )
}

/// Transforms every consecutive run of `size` values of `data` in place with the best kernel.
pub fn hadamard_rows(data: &mut [f32], size: usize) -> Result<()> {
    hadamard_rows_with_isa(Isa::best(), data, size)
}

/// [`hadamard_rows`] with a chosen kernel variant.
pub fn hadamard_rows_with_isa(isa: Isa, data: &mut [f32], size: usize) -> Result<()> {
    check_size(size)?;
    isa.ensure_supported()?;
    check_len(
        "data (a whole number of rows)",
        data.len().div_ceil(size) * size,
        data.len(),
    )?;
    let per_task = (TASK_VALUES / size).max(1) * size;
    pool().install(|| {
        data.par_chunks_mut(per_task)
            .for_each(|chunk| rows(isa, chunk, size))
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `H_n / sqrt(n)` times `x`, from the definition `H[i][j] = (-1)^popcount(i & j)`.
    fn reference(x: &[f32]) -> Vec<f64> {
        let n = x.len();
        (0..n)
            .map(|i| {
                let s: f64 = (0..n)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * x[j] as f64
                    })
                    .sum();
                s / (n as f64).sqrt()
            })
            .collect()
    }

    #[test]
    fn matches_the_matrix_definition_and_is_an_involution() {
        for size in [16, 32, 256, 1024] {
            let x: Vec<f32> = (0..3 * size)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            for isa in Isa::supported() {
                let mut y = x.clone();
                hadamard_rows_with_isa(isa, &mut y, size).unwrap();
                for (row_in, row_out) in x.chunks(size).zip(y.chunks(size)) {
                    for (a, b) in reference(row_in).iter().zip(row_out) {
                        assert!(
                            (a - *b as f64).abs() < 1e-4 * (1.0 + a.abs()),
                            "{size} {isa:?}"
                        );
                    }
                }
                hadamard_rows_with_isa(isa, &mut y, size).unwrap();
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()));
                }
            }
        }
    }

    #[test]
    fn variants_are_bit_identical_and_bad_sizes_are_refused() {
        let x: Vec<f32> = (0..8192).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut a = x.clone();
        hadamard_rows_with_isa(Isa::Portable, &mut a, 4096).unwrap();
        let mut b = x.clone();
        hadamard_rows(&mut b, 4096).unwrap();
        assert_eq!(a, b);
        assert!(hadamard_rows(&mut b, 48).is_err());
        assert!(hadamard_rows(&mut b, 8).is_err());
        assert!(hadamard_rows(&mut b[..100], 64).is_err());
    }
}
