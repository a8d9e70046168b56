//! The engine's element-wise steps, as transformers' Llama computes them in float32: RMSNorm,
//! the SiLU-gated product of the MLP, the softmax of attention scores, and the residual add.

/// `out = weight * (x / sqrt(mean(x^2) + eps))` for every row of `x` (rows of `weight.len()`
/// values): transformers' `LlamaRMSNorm` (the mean of squares accumulated in f64, so the
/// result is within one rounding of the exact norm).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let squares: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let variance = (squares / n as f64) as f32;
        let r = 1.0 / (variance + eps).sqrt();
        for ((y, &v), &w) in yr.iter_mut().zip(xr).zip(weight) {
            *y = w * (v * r);
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + exp(-g))`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `scores` replaced by their softmax (`exp(s - max) / sum`), in place.
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::lcg;

    #[test]
    fn match_float64_references() {
        let (n, rows) = (37, 3);
        let x = lcg(n * rows, 1);
        let w = lcg(n, 2);
        let mut out = vec![0f32; n * rows];
        rms_norm(&x, &w, 1e-5, &mut out);
        for r in 0..rows {
            let xr = &x[r * n..(r + 1) * n];
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            for i in 0..n {
                let want = w[i] as f64 * xr[i] as f64 / (ms + 1e-5).sqrt();
                assert!((out[r * n + i] as f64 - want).abs() <= 4e-7 * (1.0 + want.abs()));
            }
        }
        let mut g = lcg(50, 3);
        let g0 = g.clone();
        let u = lcg(50, 4);
        silu_mul(&mut g, &u);
        for i in 0..50 {
            let v = g0[i] as f64;
            let want = v / (1.0 + (-v).exp()) * u[i] as f64;
            assert!((g[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
        }
        let mut s = vec![1.0, -3.0, 80.0, 79.5, f32::NEG_INFINITY];
        let s0 = s.clone();
        softmax(&mut s);
        let total: f64 = s0.iter().map(|&v| (v as f64 - 80.0).exp()).sum();
        for i in 0..s.len() {
            let want = (s0[i] as f64 - 80.0).exp() / total;
            assert!((s[i] as f64 - want).abs() <= 1e-6 * want.max(1e-30));
        }
    }
}
