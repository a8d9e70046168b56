//! 16-level codebooks for 4-bit codes, their midpoint thresholds, and the built-in tables.

pub mod af4;
pub mod bof4;

use crate::error::{Error, Result};
use crate::names::named_enum;

/// Number of levels of a 4-bit codebook.
pub const LEVELS: usize = 16;

/// How a block is normalized before its values are matched to the levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Normalization {
    /// Divide by the block's largest magnitude: values land in [-1, 1].
    Absmax,
    /// Divide by the *signed* value of the block's largest-magnitude element: that element maps
    /// to +1, the others to [-1, 1].
    SignedAbsmax,
}

named_enum!(Normalization, "normalization", { Absmax => "absmax", SignedAbsmax => "signed_absmax" });

/// A sorted table of 16 levels in [-1, 1] and the 15 midpoints between neighbours.
///
/// Encoding a normalized value `y` gives the code `#{k : y > thresholds[k]}`: the nearest level,
/// with a value exactly on a midpoint going to the *lower* level. Thresholds are computed in f32
/// as `(levels[k] + levels[k+1]) * 0.5`.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    levels: [f32; LEVELS],
    thresholds: [f32; LEVELS - 1],
}

impl Codebook {
    /// Validates the levels (16 finite values in [-1, 1], non-decreasing) and builds the table.
    pub fn new(levels: &[f32]) -> Result<Self> {
        if levels.len() != LEVELS {
            return Err(Error::InvalidCodebook(format!(
                "a 4-bit codebook needs {LEVELS} levels, got {}",
                levels.len()
            )));
        }
        if let Some(bad) = levels.iter().find(|v| !v.is_finite() || v.abs() > 1.0) {
            return Err(Error::InvalidCodebook(format!(
                "levels must be finite and within [-1, 1], got {bad}"
            )));
        }
        if levels.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::InvalidCodebook(
                "levels must be sorted ascending".into(),
            ));
        }
        let mut table = [0f32; LEVELS];
        table.copy_from_slice(levels);
        let mut thresholds = [0f32; LEVELS - 1];
        for (k, t) in thresholds.iter_mut().enumerate() {
            *t = (table[k] + table[k + 1]) * 0.5;
        }
        Ok(Self {
            levels: table,
            thresholds,
        })
    }

    /// The 16 levels, ascending.
    pub fn levels(&self) -> &[f32; LEVELS] {
        &self.levels
    }

    /// The 15 midpoints between neighbouring levels.
    pub fn thresholds(&self) -> &[f32; LEVELS - 1] {
        &self.thresholds
    }

    /// The code of a normalized value (scalar reference of the vector kernels).
    #[inline(always)]
    pub fn encode_one(&self, y: f32) -> u8 {
        self.thresholds.iter().map(|&t| (y > t) as u8).sum()
    }
}

/// NF4 of QLoRA / bitsandbytes (block-size independent).
pub const NF4: [f32; LEVELS] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (e2m1 with its special subnormal), divided by its maximum, sorted.
/// It holds both -0 and +0, as bitsandbytes' table does.
pub const FP4: [f32; LEVELS] = [
    -1.0,
    -8.0 / 12.0,
    -6.0 / 12.0,
    -4.0 / 12.0,
    -3.0 / 12.0,
    -2.0 / 12.0,
    -0.0625 / 12.0,
    -0.0,
    0.0,
    0.0625 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    4.0 / 12.0,
    6.0 / 12.0,
    8.0 / 12.0,
    1.0,
];

/// Symmetric uniform 4-bit grid: 16 evenly spaced levels from -1 to 1 (step 2/15).
pub fn int4_levels() -> [f32; LEVELS] {
    let mut levels = [0f32; LEVELS];
    for (k, v) in levels.iter_mut().enumerate() {
        *v = (2 * k as i32 - 15) as f32 / 15.0;
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid() {
        for levels in [NF4, FP4, int4_levels()] {
            let cb = Codebook::new(&levels).unwrap();
            assert_eq!(cb.levels()[0], -1.0);
            assert_eq!(cb.levels()[15], 1.0);
        }
    }

    #[test]
    fn rejects_bad_levels() {
        assert!(Codebook::new(&NF4[..15]).is_err());
        let mut unsorted = NF4;
        unsorted.swap(3, 4);
        assert!(Codebook::new(&unsorted).is_err());
        let mut wide = NF4;
        wide[15] = 1.5;
        assert!(Codebook::new(&wide).is_err());
        let mut nan = NF4;
        nan[2] = f32::NAN;
        assert!(Codebook::new(&nan).is_err());
    }

    #[test]
    fn encode_one_is_nearest_with_ties_down() {
        let cb = Codebook::new(&NF4).unwrap();
        for (k, &t) in cb.thresholds().iter().enumerate() {
            assert_eq!(cb.encode_one(t) as usize, k, "tie goes to the lower level");
            assert_eq!(
                cb.encode_one(f32::from_bits(t.to_bits()) + 1e-6) as usize,
                k + 1
            );
        }
        for (k, &l) in cb.levels().iter().enumerate() {
            assert_eq!(cb.encode_one(l) as usize, k);
        }
        assert_eq!(cb.encode_one(-5.0), 0);
        assert_eq!(cb.encode_one(5.0), 15);
    }
}
