//! Dense f32 kernels of the engine: products with unquantized weights (`[out, in]` row-major),
//! the dot products and vector updates of attention.
//!
//! Each has a portable body (eight independent partial sums, so results do not depend on how the
//! compiler vectorizes) and an AVX2+FMA twin (fused multiply-adds, other partial sums): the two
//! agree to float tolerance, not bit for bit.

use crate::isa::{dispatch, Isa};

/// `out[o * batch + b] = sum_i w[o * n_in + i] * x[b * n_in + i]` for every row `o` of `w`
/// (`w.len() / n_in` rows): the layout of
/// [`matvec_prepared`](crate::blockwise::matvec::matvec_prepared), by output row.
///
/// `isa` must be supported by this CPU (the caller checked); lengths must agree (checked by
/// assertions: the engine validates shapes once, when it is built).
pub fn rows(isa: Isa, w: &[f32], n_in: usize, x: &[f32], batch: usize, out: &mut [f32]) {
    assert!(n_in > 0 && w.len() % n_in == 0 && x.len() == batch * n_in);
    assert_eq!(out.len(), w.len() / n_in * batch);
    for (row, y) in w.chunks_exact(n_in).zip(out.chunks_exact_mut(batch)) {
        for (b, yb) in y.iter_mut().enumerate() {
            *yb = dot(isa, row, &x[b * n_in..(b + 1) * n_in]);
        }
    }
}

/// `sum_i a[i] * b[i]` (equal lengths).
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    dispatch!(isa,
        // SAFETY: the caller checked `isa`; the lengths are equal.
        avx2 => unsafe { x86::dot(a, b) },
        portable => portable_dot(a, b),
    )
}

/// `y[i] += alpha * x[i]` (equal lengths).
#[inline]
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    dispatch!(isa,
        // SAFETY: the caller checked `isa`; the lengths are equal.
        avx2 => unsafe { x86::axpy(alpha, x, y) },
        portable => {
            for (yi, xi) in y.iter_mut().zip(x) {
                *yi += alpha * xi;
            }
        },
    )
}

fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Horizontal sum of the eight lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot product with four independent FMA chains of eight lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                let at = i + 8 * k;
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(at)), _mm256_loadu_ps(pb.add(at)), *s);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(sum);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// `y += alpha * x`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::lcg;

    fn exact_dot(a: &[f32], b: &[f32]) -> (f64, f64) {
        let dot = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let mag = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 * *y as f64).abs())
            .sum();
        (dot, mag)
    }

    #[test]
    fn kernels_match_a_float64_reference() {
        for isa in Isa::supported() {
            for n in [1, 7, 8, 31, 33, 64, 100, 577] {
                let (a, b) = (lcg(n, n as u64), lcg(n, 99 + n as u64));
                let (want, mag) = exact_dot(&a, &b);
                let got = dot(isa, &a, &b) as f64;
                assert!((got - want).abs() <= 1e-6 * mag + 1e-30, "{isa:?} n={n}");
                let mut y = lcg(n, 5);
                let y0 = y.clone();
                axpy(isa, 0.75, &a, &mut y);
                for i in 0..n {
                    let want = y0[i] as f64 + 0.75 * a[i] as f64;
                    assert!((y[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
                }
            }
            let (n_out, n_in, batch) = (5, 19, 3);
            let w = lcg(n_out * n_in, 1);
            let x = lcg(batch * n_in, 2);
            let mut out = vec![0f32; n_out * batch];
            rows(isa, &w, n_in, &x, batch, &mut out);
            for o in 0..n_out {
                for b in 0..batch {
                    let (want, mag) =
                        exact_dot(&w[o * n_in..(o + 1) * n_in], &x[b * n_in..(b + 1) * n_in]);
                    assert!((out[o * batch + b] as f64 - want).abs() <= 1e-6 * mag);
                }
            }
        }
    }
}
