//! OPQ, outlier-preserving quantization: which values of a block are outliers, and how they
//! are stored.
//!
//! Rule, for a block of `n` values `w` (`n` = block size, or the length of the partial last
//! block: the threshold always uses the block's *actual* length):
//!
//! - `sigma` = sample standard deviation of the block (mean subtracted, divisor `n - 1`);
//! - `t(n, q) = Phi^-1((q^(1/n) + 1) / 2)`: the q-quantile of the largest magnitude of `n`
//!   standard normal values;
//! - `w_i` is an outlier iff `|w_i| > sigma * t(n, q)`, strictly. A block with fewer than two
//!   values, or with zero spread (constant, all zero), has none.
//!
//! Outliers are replaced by 0 before the block scale is taken, encoded as part of the block as
//! the value 0, and stored separately: their flat indices (ascending) and their values rounded
//! to 16 bits ([`OutlierDType`]). Decoding writes the stored value back.
//!
//! Exact evaluation (f64, every kernel variant alike): shifted sums with the block's first value
//! as shift `K`, `d = w - K`, sixteen accumulator lanes (value `i` into lane `i % 16`, multiply
//! then add, no FMA) combined as `m_j = l_j + l_(j+8)`, `((m0+m4)+(m2+m6)) + ((m1+m5)+(m3+m7))`
//! into `S = sum(d)` and `SS = sum(d*d)`; then
//! `limit2 = max(0, SS - (S*S) * (1/n)) * (t^2 / (n-1))` and `w_i` is an outlier iff
//! `w_i * w_i > limit2` (the squared form of the rule; a constant block gives exactly
//! `limit2 = 0`).
//!
//! Speed (results unchanged): vector kernels first try [`Threshold::provably_clean`], a float32
//! estimate of the sums with a rigorous error bound that clears most blocks without the f64
//! sums, and test values in f32 against [`f32_limit`], which is exactly equivalent.
//!
//! Files: [`rule`] (the threshold and the float32 bounds the filter uses), [`portable`] (the
//! rule's portable kernels: the definition), `x86` (their AVX2 twins and the filter), `pass`
//! (the pass over a task's blocks, driven by the encoder).

pub(crate) mod pass;
pub mod portable;
pub mod rule;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use portable::{
    block_sums, collect, collect_word, raw_scale_within, scan, signed_scale_masked,
    signed_scale_within, sums_from_lanes, LANES, MASK_WORDS,
};
pub use rule::{f32_bracket, f32_limit, normal_upper_quantile, threshold, FilterBound, Threshold};

use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::numeric::element::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// The 16-bit type outlier values are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutlierDType {
    BFloat16,
    Float16,
}

named_enum!(OutlierDType, "outlier_dtype", { BFloat16 => "bfloat16", Float16 => "float16" });

impl OutlierDType {
    /// The value of stored bits.
    #[inline(always)]
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Self::BFloat16 => bf16_to_f32(bits),
            Self::Float16 => f16_to_f32(bits),
        }
    }

    /// Stored bits of an outlier value: nearest (ties to even); a result beyond `input_max`
    /// (the input dtype's largest finite value) or a bfloat16 overflow steps one value toward
    /// zero, so decoding never overflows. `None` when a float16 rounding overflows (the value is
    /// beyond the float16 range: refused rather than clamped).
    #[inline(always)]
    pub fn store(self, value: f32, input_max: f32) -> Option<u16> {
        let bits = match self {
            Self::BFloat16 => f32_to_bf16(value),
            Self::Float16 => f32_to_f16(value),
        };
        let back = self.to_f32(bits);
        if back.is_finite() && back.abs() <= input_max {
            Some(bits)
        } else if back.is_finite() || self == Self::BFloat16 {
            // Sign-magnitude bits: minus one is one step toward zero (inf -> largest finite).
            Some(bits - 1)
        } else {
            None
        }
    }
}

/// OPQ settings: the quantile `q` in (0, 1) and the outlier storage type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpqOptions {
    pub q: f64,
    pub dtype: OutlierDType,
}

impl OpqOptions {
    /// Validates `q` (finite, strictly between 0 and 1).
    pub fn new(q: f64, dtype: OutlierDType) -> Result<Self> {
        if !(q > 0.0 && q < 1.0) {
            return Err(Error::invalid(
                "opq",
                format!("the quantile must be strictly between 0 and 1, got {q}"),
            ));
        }
        Ok(Self { q, dtype })
    }
}

/// One outlier: flat index (below [`Outlier::INDEX_LIMIT`]) and stored 16-bit value, packed in
/// one word (`index << 16 | value`) so that collecting one is a single store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Outlier(u64);

impl Outlier {
    /// Flat indices are below this (2^48 values: far beyond any addressable tensor).
    pub const INDEX_LIMIT: u64 = 1 << 48;

    /// Packs an index (below [`Outlier::INDEX_LIMIT`]) and a stored value.
    #[inline(always)]
    pub fn new(index: u64, value: u16) -> Self {
        debug_assert!(index < Self::INDEX_LIMIT);
        Self(index << 16 | value as u64)
    }

    /// The flat index.
    #[inline(always)]
    pub fn index(self) -> u64 {
        self.0 >> 16
    }

    /// The stored 16-bit value.
    #[inline(always)]
    pub fn value(self) -> u16 {
        self.0 as u16
    }
}
