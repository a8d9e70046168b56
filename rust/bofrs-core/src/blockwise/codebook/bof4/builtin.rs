//! The named BOF4 codebooks: Gaussian-optimal, 16 levels, the paper's pinned levels.

use super::{optimize, GaussianTarget, Metric, OptimizeOptions};
use crate::blockwise::codebook::{Normalization, LEVELS};
use crate::error::{Error, Result};

/// Names of the built-in BOF4 variants: (name, metric, normalization).
pub const VARIANTS: [(&str, Metric, Normalization); 4] = [
    ("bof4", Metric::Mse, Normalization::Absmax),
    ("bof4-mae", Metric::Mae, Normalization::Absmax),
    ("bof4s", Metric::Mse, Normalization::SignedAbsmax),
    ("bof4s-mae", Metric::Mae, Normalization::SignedAbsmax),
];

/// The levels the paper pins: {-1, 0, 1} with absmax, {0, 1} with signed absmax (whose most
/// negative level is free).
pub fn default_pins(normalization: Normalization) -> Vec<f64> {
    match normalization {
        Normalization::Absmax => vec![-1.0, 0.0, 1.0],
        Normalization::SignedAbsmax => vec![0.0, 1.0],
    }
}

/// The variant's metric and normalization, if `name` is one.
pub fn variant(name: &str) -> Option<(Metric, Normalization)> {
    VARIANTS
        .iter()
        .find(|v| v.0 == name)
        .map(|&(_, metric, normalization)| (metric, normalization))
}

/// Levels of a built-in BOF4 variant for a block size (deterministic: same bits everywhere).
pub fn bof4_levels(name: &str, block_size: usize) -> Result<[f32; LEVELS]> {
    let (metric, normalization) = variant(name)
        .ok_or_else(|| Error::invalid("codebook", format!("unknown BOF4 variant {name:?}")))?;
    let target = GaussianTarget::new(block_size, normalization, metric)?;
    let options = OptimizeOptions {
        pinned: default_pins(normalization),
        tolerance: 1e-12,
        ..Default::default()
    };
    let solved = optimize(&target, &options)?;
    let mut out = [0f32; LEVELS];
    for (o, v) in out.iter_mut().zip(&solved.levels) {
        *o = *v as f32;
    }
    Ok(out)
}
