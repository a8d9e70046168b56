//! BOF4: block-wise codebooks optimized for the error on the *weights* (Blumenberg et al. 2025).
//!
//! A normalized value `x = w / s` of a block with scale `s` costs `s^2 (x - c)^2` (MSE) or
//! `|s| |x - c|` (MAE) when it is reconstructed from level `c`: errors are weighted by the scale
//! of their block. [`optimize`] runs a Lloyd / EM iteration on that weighted objective over a
//! [`Target`], the weighted distribution of normalized values:
//! - [`GaussianTarget`]: i.i.d. N(0, 1) weights, integrated numerically over the distribution
//!   of the block maximum (the "theoretical" mode), with the point masses at the block edges;
//! - [`WeightHistogram`]: real tensors streamed into a fine weighted histogram (the
//!   "data-driven" mode), bounded memory whatever the number of weights.
//!
//! [`expected_error`] evaluates any codebook exactly on Gaussian weights.

pub mod builtin;
mod gaussian;
mod histogram;
mod lloyd;

pub use builtin::{bof4_levels, default_pins};
pub use gaussian::{check_levels, expected_error, GaussianTarget};
pub use histogram::{WeightHistogram, HISTOGRAM_BINS};
pub use lloyd::{optimize, OptimizeOptions, Optimized};

use crate::names::named_enum;

/// The error a codebook minimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Mean squared error on the weights: regions are weighted by the squared block scale.
    Mse,
    /// Mean absolute error on the weights: regions are weighted by the absolute block scale.
    Mae,
}

named_enum!(Metric, "metric", { Mse => "mse", Mae => "mae" });

impl Metric {
    /// The power of the block scale that weights a value's error: 2 for MSE, 1 for MAE.
    pub fn scale_power(self) -> i32 {
        match self {
            Self::Mse => 2,
            Self::Mae => 1,
        }
    }
}

/// A weighted distribution of normalized values in [-1, 1] that Lloyd's iteration can optimize.
///
/// Regions are given by `bounds`: `bounds[0] = -1 <= bounds[1] <= ... <= bounds[L] = 1`; region
/// `l` is `(bounds[l], bounds[l + 1]]`, except that the point mass at -1 belongs to region 0.
pub trait Target: Sync {
    /// The metric the weights were built for.
    fn metric(&self) -> Metric;

    /// For every region, the level minimizing the weighted error of its values (weighted mean
    /// for MSE, weighted median for MAE), or `None` when the region holds no weight. `current`
    /// holds the present levels (a starting point for iterative solvers).
    fn region_optima(&self, bounds: &[f64], current: &[f64]) -> Vec<Option<f64>>;

    /// Whether region optima move smoothly with the bounds (enables Newton steps).
    fn is_smooth(&self) -> bool {
        false
    }

    /// The weighted error per weight of reconstructing region `l` by `levels[l]`, summed.
    fn error(&self, levels: &[f64]) -> f64;
}

/// The region bounds of sorted levels: -1, the midpoints between neighbours, 1.
pub fn region_bounds(levels: &[f64]) -> Vec<f64> {
    let mut bounds = Vec::with_capacity(levels.len() + 1);
    bounds.push(-1.0);
    bounds.extend(levels.windows(2).map(|w| 0.5 * (w[0] + w[1])));
    bounds.push(1.0);
    bounds
}

#[cfg(test)]
mod tests;
