//! The theoretical target: blocks of i.i.d. N(0, 1) weights.
//!
//! Take one weight `w` of a block of `I`. With `m` the largest magnitude among the *other*
//! `I - 1` weights (density `2 (I-1) phi(m) erf(m/sqrt 2)^(I-2)`), `w` is not the block maximum
//! when `|w| < m`; then its block scale is `m` (up to sign) and `x = w / m`. Otherwise `w` is the
//! maximum and maps to an edge: a point mass of `1/(2I)` at each of -1 and +1 (absmax), or `1/I`
//! at +1 (signed absmax), weighted by `E[M^k]` of the maximum `M` of all `I` magnitudes.
//! Every integral over `w` has a closed form in `Phi` and `phi`; the one over `m` uses a
//! composite Gauss-Legendre rule on the interval outside of which the density is below 1e-18.

use super::{region_bounds, Metric, Target};
use crate::blockwise::codebook::Normalization;
use crate::blockwise::layout::BlockLayout;
use crate::error::{Error, Result};
use crate::numeric::gauss::{bisect, composite_rule, newton_bracketed, normal_cdf, normal_pdf};
use std::f64::consts::FRAC_1_SQRT_2;

/// Panels and nodes per panel of the rule over the block maximum.
const PANELS: usize = 6;
const NODES_PER_PANEL: usize = 16;

/// Weighted distribution of normalized values of Gaussian weights.
#[derive(Debug, Clone)]
pub struct GaussianTarget {
    metric: Metric,
    /// `(m, omega)`: quadrature nodes over the largest of the other `I - 1` magnitudes, `omega`
    /// holding the rule's weight times that density.
    others: Vec<(f64, f64)>,
    /// `(x, weight)`: the block maximum's point masses, weighted by `E[M^k] / I` shares.
    points: Vec<(f64, f64)>,
}

/// Nodes `(m, omega)` for the maximum of `count` i.i.d. half-normal magnitudes.
fn max_of_magnitudes(count: usize) -> Vec<(f64, f64)> {
    let k = count as f64;
    let erf = |m: f64| libm::erf(m * FRAC_1_SQRT_2);
    let erfc = |m: f64| libm::erfc(m * FRAC_1_SQRT_2);
    let floor = 1e-18f64.ln();
    let lo = bisect(1e-9, 40.0, |m| k * erf(m).ln() - floor);
    let hi = bisect(1e-9, 40.0, |m| floor - (k * erfc(m)).ln());
    composite_rule(lo, hi, PANELS, NODES_PER_PANEL)
        .into_iter()
        .map(|(m, w)| {
            let density = 2.0 * k * normal_pdf(m) * ((k - 1.0) * erf(m).ln()).exp();
            (m, w * density)
        })
        .collect()
}

impl GaussianTarget {
    /// The target for a block size (a power of two in 16..4096), normalization and metric.
    pub fn new(block_size: usize, normalization: Normalization, metric: Metric) -> Result<Self> {
        BlockLayout::new(0, block_size)?;
        let power = metric.scale_power();
        let others: Vec<(f64, f64)> = max_of_magnitudes(block_size - 1);
        let moment: f64 = max_of_magnitudes(block_size)
            .iter()
            .map(|&(m, w)| w * m.powi(power))
            .sum();
        let share = moment / block_size as f64;
        let points = match normalization {
            Normalization::Absmax => vec![(-1.0, 0.5 * share), (1.0, 0.5 * share)],
            Normalization::SignedAbsmax => vec![(1.0, share)],
        };
        Ok(Self {
            metric,
            others,
            points,
        })
    }

    /// A standard normal value seen through `x = w / range` (no block normalization, no point
    /// masses): the scalar Lloyd-Max problem, solved by the same iteration. Mass beyond
    /// `range` standard deviations is ignored.
    pub fn standard_normal(range: f64) -> Self {
        Self {
            metric: Metric::Mse,
            others: vec![(range, 1.0)],
            points: Vec::new(),
        }
    }

    /// Point-mass weight that falls in region `l` of `regions`, and its weighted position sum.
    fn points_in(&self, l: usize, regions: usize) -> (f64, f64) {
        self.points
            .iter()
            .filter(|&&(x, _)| if x < 0.0 { l == 0 } else { l == regions - 1 })
            .fold((0.0, 0.0), |(w, wx), &(x, p)| (w + p, wx + p * x))
    }

    /// `sum omega m^power f(m * b)` over the nodes.
    fn integrate(&self, b: f64, power: i32, f: fn(f64) -> f64) -> f64 {
        self.others
            .iter()
            .map(|&(m, w)| w * m.powi(power) * f(m * b))
            .sum()
    }

    fn mse_optima(&self, bounds: &[f64]) -> Vec<Option<f64>> {
        let regions = bounds.len() - 1;
        let mass: Vec<f64> = bounds
            .iter()
            .map(|&b| self.integrate(b, 2, normal_cdf))
            .collect();
        let moment: Vec<f64> = bounds
            .iter()
            .map(|&b| self.integrate(b, 1, normal_pdf))
            .collect();
        (0..regions)
            .map(|l| {
                let (pw, pwx) = self.points_in(l, regions);
                let w = (mass[l + 1] - mass[l]).max(0.0) + pw;
                let wx = moment[l] - moment[l + 1] + pwx;
                (w > 0.0).then(|| (wx / w).clamp(bounds[l], bounds[l + 1]))
            })
            .collect()
    }

    fn mae_optima(&self, bounds: &[f64], current: &[f64]) -> Vec<Option<f64>> {
        let regions = bounds.len() - 1;
        let cdf: Vec<f64> = bounds
            .iter()
            .map(|&b| self.integrate(b, 1, normal_cdf))
            .collect();
        (0..regions)
            .map(|l| {
                let continuous = (cdf[l + 1] - cdf[l]).max(0.0);
                let below = if l == 0 { self.point_at(-1.0) } else { 0.0 };
                let above = if l == regions - 1 {
                    self.point_at(1.0)
                } else {
                    0.0
                };
                let total = continuous + below + above;
                if total <= 0.0 {
                    return None;
                }
                let need = 0.5 * total - below;
                if need <= 0.0 {
                    return Some(bounds[l]);
                }
                if need >= continuous {
                    return Some(bounds[l + 1]);
                }
                let (a, b) = (bounds[l], bounds[l + 1]);
                let start = current[l].clamp(a, b);
                Some(self.solve_cdf(cdf[l] + need, a, b, start))
            })
            .collect()
    }

    fn point_at(&self, x: f64) -> f64 {
        self.points.iter().filter(|p| p.0 == x).map(|p| p.1).sum()
    }

    /// The `c` in [a, b] where the continuous weighted CDF reaches `target` (safeguarded Newton).
    fn solve_cdf(&self, target: f64, a: f64, b: f64, start: f64) -> f64 {
        newton_bracketed(
            |x| self.integrate(x, 1, normal_cdf) - target,
            |x| self.integrate(x, 2, normal_pdf),
            a,
            b,
            start,
        )
    }

    /// Error of the non-maximal values of region `(lo, hi]` reconstructed by `c`, for one `m`.
    fn region_error(&self, m: f64, lo: f64, hi: f64, c: f64) -> f64 {
        let (alpha, beta, mu) = (m * lo, m * hi, m * c);
        let (pa, pb) = (normal_pdf(alpha), normal_pdf(beta));
        match self.metric {
            Metric::Mse => {
                let mass = normal_cdf(beta) - normal_cdf(alpha);
                (1.0 + mu * mu) * mass + (alpha - 2.0 * mu) * pa - (beta - 2.0 * mu) * pb
            }
            Metric::Mae => {
                let mid = mu.clamp(alpha, beta);
                let pm = normal_pdf(mid);
                let (ca, cm, cb) = (normal_cdf(alpha), normal_cdf(mid), normal_cdf(beta));
                mu * (cm - ca) - (pa - pm) + (pm - pb) - mu * (cb - cm)
            }
        }
    }
}

impl Target for GaussianTarget {
    fn metric(&self) -> Metric {
        self.metric
    }

    fn is_smooth(&self) -> bool {
        true
    }

    fn region_optima(&self, bounds: &[f64], current: &[f64]) -> Vec<Option<f64>> {
        match self.metric {
            Metric::Mse => self.mse_optima(bounds),
            Metric::Mae => self.mae_optima(bounds, current),
        }
    }

    fn error(&self, levels: &[f64]) -> f64 {
        let bounds = region_bounds(levels);
        let regions = levels.len();
        let continuous: f64 = self
            .others
            .iter()
            .map(|&(m, w)| {
                let sum: f64 = (0..regions)
                    .map(|l| self.region_error(m, bounds[l], bounds[l + 1], levels[l]))
                    .sum();
                w * sum
            })
            .sum();
        let edges: f64 = self
            .points
            .iter()
            .map(|&(x, p)| {
                let c = if x < 0.0 {
                    levels[0]
                } else {
                    levels[regions - 1]
                };
                let d = (x - c).abs();
                p * if self.metric == Metric::Mse { d * d } else { d }
            })
            .sum();
        continuous + edges
    }
}

/// Validates a sorted codebook of at least two finite levels in [-1, 1].
pub fn check_levels(levels: &[f64], name: &'static str) -> Result<()> {
    let bad = |message: String| Err(Error::InvalidArgument { name, message });
    if levels.len() < 2 {
        return bad(format!("needs at least 2 levels, got {}", levels.len()));
    }
    if levels.iter().any(|v| !v.is_finite() || v.abs() > 1.0) {
        return bad("levels must be finite and within [-1, 1]".into());
    }
    if levels.windows(2).any(|w| w[0] > w[1]) {
        return bad("levels must be sorted ascending".into());
    }
    Ok(())
}

/// Expected error per weight (MSE or MAE) of a codebook on blocks of i.i.d. N(0, 1) weights,
/// with exact (unrounded) block scales and nearest-level (midpoint) encoding.
pub fn expected_error(
    levels: &[f64],
    block_size: usize,
    metric: Metric,
    normalization: Normalization,
) -> Result<f64> {
    check_levels(levels, "levels")?;
    Ok(GaussianTarget::new(block_size, normalization, metric)?.error(levels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_add_up() {
        // Every weight is either non-maximal (continuous part) or the maximum (point masses):
        // probability 1 in total, and E[M^2] of the scale weight in total.
        for bs in [16, 64, 4096] {
            let t = GaussianTarget::new(bs, Normalization::Absmax, Metric::Mse).unwrap();
            let prob: f64 = t
                .others
                .iter()
                .map(|&(m, w)| w * (2.0 * normal_cdf(m) - 1.0))
                .sum::<f64>()
                + 1.0 / bs as f64;
            assert!((prob - 1.0).abs() < 1e-9, "bs={bs}: {prob}");
            let weight: f64 = t
                .others
                .iter()
                .map(|&(m, w)| w * m * m * (2.0 * normal_cdf(m) - 1.0))
                .sum::<f64>()
                + t.points.iter().map(|p| p.1).sum::<f64>();
            let moment: f64 = max_of_magnitudes(bs).iter().map(|&(m, w)| w * m * m).sum();
            assert!((weight - moment).abs() < 1e-9 * moment, "bs={bs}");
        }
    }

    #[test]
    fn error_of_nf4_matches_published_figure() {
        let nf4: Vec<f64> = crate::blockwise::codebook::NF4
            .iter()
            .map(|&v| v as f64)
            .collect();
        let e = expected_error(&nf4, 64, Metric::Mse, Normalization::Absmax).unwrap();
        assert!((e - 8.46e-3).abs() < 0.01 * 8.46e-3, "{e}");
    }

    #[test]
    fn quadrature_is_converged() {
        let levels: Vec<f64> = crate::blockwise::codebook::NF4
            .iter()
            .map(|&v| v as f64)
            .collect();
        for metric in [Metric::Mse, Metric::Mae] {
            let t = GaussianTarget::new(256, Normalization::SignedAbsmax, metric).unwrap();
            let fine_nodes: Vec<(f64, f64)> = {
                let k = 255.0;
                composite_rule(0.0, 12.0, 64, 16)
                    .into_iter()
                    .map(|(m, w)| {
                        let erf = libm::erf(m * FRAC_1_SQRT_2);
                        (m, w * 2.0 * k * normal_pdf(m) * erf.powf(k - 1.0))
                    })
                    .collect()
            };
            let fine = GaussianTarget {
                others: fine_nodes,
                ..t.clone()
            };
            let (a, b) = (t.error(&levels), fine.error(&levels));
            assert!((a - b).abs() < 1e-10 * b, "{metric:?}: {a} vs {b}");
        }
    }
}
