//! Lloyd's iteration with pinned levels: assign by nearest level, move every free level to
//! the optimum of its region, until no level moves by more than the tolerance.

use super::gaussian::check_levels;
use super::{region_bounds, Target};
use crate::error::{Error, Result};

/// Options of [`optimize`].
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizeOptions {
    /// Bits per code (2..=8): the codebook has `2^bits` levels.
    pub bits: u32,
    /// Levels that never move (each in [-1, 1], distinct); at most `2^bits`.
    pub pinned: Vec<f64>,
    /// Starting levels (`2^bits` sorted values in [-1, 1]); default: evenly spaced. Each pinned
    /// level replaces the nearest starting level.
    pub init: Option<Vec<f64>>,
    /// Stop once no level moves by more than this.
    pub tolerance: f64,
    /// Stop after this many iterations even if not converged.
    pub max_iterations: usize,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        Self {
            bits: 4,
            pinned: Vec::new(),
            init: None,
            tolerance: 1e-10,
            max_iterations: 20_000,
        }
    }
}

/// The result of [`optimize`].
#[derive(Debug, Clone, PartialEq)]
pub struct Optimized {
    /// The levels, ascending.
    pub levels: Vec<f64>,
    /// Iterations run.
    pub iterations: usize,
    /// Whether the last iteration moved every level by less than the tolerance.
    pub converged: bool,
    /// The target's error per weight at the returned levels.
    pub error: f64,
}

impl OptimizeOptions {
    /// Checks every option; returns the number of levels.
    pub fn validate(&self) -> Result<usize> {
        if !(2..=8).contains(&self.bits) {
            return Err(Error::invalid(
                "bits",
                format!("must be in 2..8, got {}", self.bits),
            ));
        }
        let count = 1usize << self.bits;
        if self.pinned.len() > count {
            return Err(Error::invalid(
                "pinned",
                format!("{} pinned levels for {count} levels", self.pinned.len()),
            ));
        }
        if let Some(bad) = self.pinned.iter().find(|v| !v.is_finite() || v.abs() > 1.0) {
            return Err(Error::invalid(
                "pinned",
                format!("pinned levels must be within [-1, 1], got {bad}"),
            ));
        }
        let mut sorted = self.pinned.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::invalid("pinned", "pinned levels must be distinct"));
        }
        if let Some(init) = &self.init {
            if init.len() != count {
                return Err(Error::invalid(
                    "init",
                    format!(
                        "needs {count} levels for bits={}, got {}",
                        self.bits,
                        init.len()
                    ),
                ));
            }
            check_levels(init, "init")?;
        }
        if !(self.tolerance > 0.0 && self.tolerance.is_finite()) {
            return Err(Error::invalid(
                "tolerance",
                format!("must be positive and finite, got {}", self.tolerance),
            ));
        }
        if self.max_iterations == 0 {
            return Err(Error::invalid("max_iterations", "must be at least 1"));
        }
        Ok(count)
    }

    /// Starting levels with the pinned ones in place, sorted, and which of them are pinned.
    fn start(&self, count: usize) -> (Vec<f64>, Vec<bool>) {
        let mut levels = self.init.clone().unwrap_or_else(|| {
            (0..count)
                .map(|k| -1.0 + 2.0 * k as f64 / (count - 1) as f64)
                .collect()
        });
        let mut pinned = vec![false; count];
        let mut wanted = self.pinned.clone();
        wanted.sort_by(f64::total_cmp);
        for p in wanted {
            let nearest = (0..count)
                .filter(|&i| !pinned[i])
                .min_by(|&i, &j| (levels[i] - p).abs().total_cmp(&(levels[j] - p).abs()));
            if let Some(i) = nearest {
                levels[i] = p;
                pinned[i] = true;
            }
        }
        let mut pairs: Vec<(f64, bool)> = levels.into_iter().zip(pinned).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        pairs.into_iter().unzip()
    }
}

/// The Lloyd map: every free level moved to the optimum of its region (others unchanged).
fn lloyd_step(target: &dyn Target, levels: &[f64], pinned: &[bool]) -> Vec<f64> {
    let optima = target.region_optima(&region_bounds(levels), levels);
    levels
        .iter()
        .zip(pinned)
        .zip(optima)
        .map(|((&c, &fixed), optimum)| match (fixed, optimum) {
            (false, Some(o)) => o,
            _ => c,
        })
        .collect()
}

fn max_move(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A Newton step on `F(c) = T(c) - c` for the Lloyd map `T`. Level `l`'s optimum depends only
/// on its two region bounds, i.e. on levels `l-1, l, l+1`: the Jacobian is tridiagonal and
/// three evaluations (perturbing every third level at once) give all of it.
fn newton_step(
    target: &dyn Target,
    levels: &[f64],
    pinned: &[bool],
    mapped: &[f64],
) -> Option<Vec<f64>> {
    const H: f64 = 1e-7;
    let n = levels.len();
    let residual: Vec<f64> = mapped.iter().zip(levels).map(|(t, c)| t - c).collect();
    // jac[k] = (d F_k / d c_{k-1}, d F_k / d c_k, d F_k / d c_{k+1})
    let mut jac = vec![[0.0f64; 3]; n];
    for phase in 0..3 {
        let mut shifted = levels.to_vec();
        for (l, c) in shifted.iter_mut().enumerate() {
            if l % 3 == phase && !pinned[l] {
                *c += if *c + H <= 1.0 { H } else { -H };
            }
        }
        let moved = lloyd_step(target, &shifted, pinned);
        for k in 0..n {
            for (slot, l) in [(0usize, k.wrapping_sub(1)), (1, k), (2, k + 1)] {
                if l < n && l % 3 == phase && !pinned[l] {
                    let d = shifted[l] - levels[l];
                    let mut dfk = (moved[k] - mapped[k]) / d;
                    if l == k {
                        dfk -= 1.0;
                    }
                    jac[k][slot] = dfk;
                }
            }
        }
    }
    for (k, row) in jac.iter_mut().enumerate() {
        if pinned[k] {
            *row = [0.0, 1.0, 0.0];
        }
    }
    // Thomas algorithm for J d = -F.
    let mut diag: Vec<f64> = jac.iter().map(|r| r[1]).collect();
    let mut rhs: Vec<f64> = residual.iter().map(|f| -f).collect();
    for k in 1..n {
        if diag[k - 1].abs() < 1e-300 {
            return None;
        }
        let factor = jac[k][0] / diag[k - 1];
        diag[k] -= factor * jac[k - 1][2];
        rhs[k] -= factor * rhs[k - 1];
    }
    let mut step = vec![0.0; n];
    for k in (0..n).rev() {
        let upper = if k + 1 < n {
            jac[k][2] * step[k + 1]
        } else {
            0.0
        };
        if diag[k].abs() < 1e-300 {
            return None;
        }
        step[k] = (rhs[k] - upper) / diag[k];
    }
    let next: Vec<f64> = levels.iter().zip(&step).map(|(c, d)| c + d).collect();
    let valid = next.iter().all(|v| v.is_finite() && v.abs() <= 1.0)
        && next.windows(2).all(|w| w[0] <= w[1]);
    valid.then_some(next)
}

/// Runs Lloyd's iteration for `target` from the options' starting point.
///
/// Each step keeps the levels sorted (every optimum lies inside its own region), so the
/// thresholds stay the midpoints of neighbours, as the encoder uses them. On smooth targets
/// (the Gaussian one) a safeguarded Newton step on the fixed-point equation is tried first and
/// kept only when it shrinks the Lloyd move; convergence then takes a handful of steps instead
/// of hundreds. The stopping rule is the same either way: a Lloyd step moves no level by more
/// than the tolerance.
pub fn optimize(target: &dyn Target, options: &OptimizeOptions) -> Result<Optimized> {
    let count = options.validate()?;
    let (mut levels, pinned) = options.start(count);
    let mut iterations = 0;
    let mut converged = false;
    let mut mapped = lloyd_step(target, &levels, &pinned);
    while iterations < options.max_iterations {
        iterations += 1;
        let moved = max_move(&mapped, &levels);
        if moved < options.tolerance {
            converged = true;
            break;
        }
        let newton = if target.is_smooth() {
            newton_step(target, &levels, &pinned, &mapped)
        } else {
            None
        };
        let accepted = newton.and_then(|candidate| {
            let image = lloyd_step(target, &candidate, &pinned);
            (max_move(&image, &candidate) < moved).then_some((candidate, image))
        });
        match accepted {
            Some((candidate, image)) => {
                levels = candidate;
                mapped = image;
            }
            None => {
                levels = mapped;
                mapped = lloyd_step(target, &levels, &pinned);
            }
        }
    }
    let error = target.error(&levels);
    Ok(Optimized {
        levels,
        iterations,
        converged,
        error,
    })
}
