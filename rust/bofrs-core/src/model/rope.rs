//! Rotary position embeddings in transformers' rotate-half convention.
//!
//! For a position `p`, angle `a_i = p * inv_freq[i]` (one f32 product, as transformers computes
//! it), `c_i = cos(a_i) * scaling`, `s_i = sin(a_i) * scaling`; each head vector `v` of
//! `head_dim = 2 h` values becomes `v[i] c_i - v[i + h] s_i` and `v[i + h] c_i + v[i] s_i` for
//! `i < h`. Rope variants with a fixed table (default, linear, Llama 3) differ only in
//! `inv_freq`, which the caller may pass as its framework computed it.

use crate::error::{Error, Result};

/// The frequencies of a rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `head_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// Factor of cos and sin (1 except for scaled variants such as YaRN).
    pub attention_scaling: f32,
}

impl Rope {
    /// The original RoPE: `inv_freq[i] = 1 / theta^(2 i / head_dim)` (computed in f64, then
    /// rounded: within one rounding of transformers' f32 table).
    pub fn from_theta(theta: f64, head_dim: usize) -> Rope {
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        Rope {
            inv_freq,
            attention_scaling: 1.0,
        }
    }

    /// Checks the table against `head_dim` (even, `head_dim / 2` finite frequencies).
    pub fn check(&self, head_dim: usize) -> Result<()> {
        if head_dim % 2 != 0 || self.inv_freq.len() != head_dim / 2 {
            return Err(Error::invalid(
                "inv_freq",
                format!(
                    "{} frequencies do not fit head_dim={head_dim} (it must be even, with \
                     head_dim / 2 frequencies)",
                    self.inv_freq.len()
                ),
            ));
        }
        if !self.inv_freq.iter().all(|f| f.is_finite()) || !self.attention_scaling.is_finite() {
            return Err(Error::invalid(
                "inv_freq",
                "frequencies and scaling must be finite",
            ));
        }
        Ok(())
    }

    /// The cos and sin of `position` into `cos` and `sin` (`head_dim / 2` values each).
    pub fn angles(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = (p * f) as f64;
            *c = a.cos() as f32 * self.attention_scaling;
            *s = a.sin() as f32 * self.attention_scaling;
        }
    }
}

/// Rotates every head vector of `v` (a whole number of `2 * cos.len()` values) by the angles
/// of one position.
pub fn rotate(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    for head in v.chunks_exact_mut(2 * h) {
        let (a, b) = head.split_at_mut(h);
        for i in 0..h {
            let (x, y) = (a[i], b[i]);
            a[i] = x * cos[i] - y * sin[i];
            b[i] = y * cos[i] + x * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_matches_rotate_half_and_keeps_norms() {
        let rope = Rope::from_theta(10000.0, 8);
        assert_eq!(rope.inv_freq[0], 1.0);
        assert!((rope.inv_freq[1] as f64 - 0.1).abs() < 1e-8);
        rope.check(8).unwrap();
        assert!(rope.check(6).is_err());
        let (mut c, mut s) = (vec![0f32; 4], vec![0f32; 4]);
        rope.angles(3, &mut c, &mut s);
        let v0: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mut v = v0.clone();
        rotate(&mut v, &c, &s);
        for head in 0..2 {
            let (x, y) = (&v0[head * 8..head * 8 + 8], &v[head * 8..head * 8 + 8]);
            let n0: f64 = x.iter().map(|&t| (t as f64).powi(2)).sum();
            let n1: f64 = y.iter().map(|&t| (t as f64).powi(2)).sum();
            assert!((n0 - n1).abs() < 1e-4 * n0);
            for i in 0..4 {
                let a = 3.0 * rope.inv_freq[i] as f64;
                let want = x[i] as f64 * a.cos() - x[i + 4] as f64 * a.sin();
                assert!((y[i] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
