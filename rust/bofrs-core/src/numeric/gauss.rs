//! The standard normal distribution and Gauss-Legendre quadrature, for codebook construction.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// Standard normal density.
pub fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * PI).sqrt()
}

/// Standard normal CDF, accurate in both tails.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z * FRAC_1_SQRT_2)
}

/// The root of an increasing function on [a, b] by bisection (200 halvings: to the last bit).
pub fn bisect(mut a: f64, mut b: f64, f: impl Fn(f64) -> f64) -> f64 {
    for _ in 0..200 {
        let mid = 0.5 * (a + b);
        if f(mid) > 0.0 {
            b = mid;
        } else {
            a = mid;
        }
    }
    0.5 * (a + b)
}

/// The root in `[a, b]` of an increasing `f` with derivative `df`, from `start`: Newton steps,
/// a bisection whenever a step would leave the shrinking bracket; to the last bits.
pub fn newton_bracketed(
    f: impl Fn(f64) -> f64,
    df: impl Fn(f64) -> f64,
    mut a: f64,
    mut b: f64,
    start: f64,
) -> f64 {
    let mut x = start;
    for _ in 0..200 {
        let value = f(x);
        if value > 0.0 {
            b = x;
        } else {
            a = x;
        }
        let slope = df(x);
        let newton = if slope > 0.0 {
            x - value / slope
        } else {
            f64::NAN
        };
        let next = if newton > a && newton < b {
            newton
        } else {
            0.5 * (a + b)
        };
        let step = (next - x).abs();
        x = next;
        if step < 1e-15 || b - a < 1e-15 {
            break;
        }
    }
    x
}

/// Nodes and weights of the n-point Gauss-Legendre rule on [a, b].
pub fn gauss_legendre(n: usize, a: f64, b: f64) -> Vec<(f64, f64)> {
    let mut rule = Vec::with_capacity(n);
    let half = 0.5 * (b - a);
    let mid = 0.5 * (b + a);
    for i in 0..n.div_ceil(2) {
        // Newton's method on P_n from the classical initial guess.
        let mut x = (PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut dp = 1.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, x);
            for k in 2..=n {
                let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
                p0 = p1;
                p1 = p2;
            }
            let pn = if n == 0 {
                1.0
            } else if n == 1 {
                x
            } else {
                p1
            };
            let pn1 = if n == 1 { 1.0 } else { p0 };
            dp = n as f64 * (x * pn - pn1) / (x * x - 1.0);
            let step = pn / dp;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        let w = 2.0 / ((1.0 - x * x) * dp * dp);
        rule.push((mid - half * x, half * w));
        if 2 * i + 1 != n {
            rule.push((mid + half * x, half * w));
        }
    }
    rule.sort_by(|p, q| p.0.total_cmp(&q.0));
    rule
}

/// Composite Gauss-Legendre rule: `panels` equal panels of `per_panel` nodes on [a, b].
pub fn composite_rule(a: f64, b: f64, panels: usize, per_panel: usize) -> Vec<(f64, f64)> {
    let width = (b - a) / panels as f64;
    let base = gauss_legendre(per_panel, 0.0, 1.0);
    (0..panels)
        .flat_map(|p| {
            let start = a + p as f64 * width;
            base.iter()
                .map(move |&(x, w)| (start + x * width, w * width))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        let rule = gauss_legendre(8, -1.0, 2.0);
        let integral: f64 = rule.iter().map(|&(x, w)| w * x.powi(15)).sum();
        let exact = (2f64.powi(16) - 1.0) / 16.0;
        assert!((integral - exact).abs() < 1e-9 * exact);
    }

    #[test]
    fn normal_cdf_integrates_pdf() {
        let rule = composite_rule(-8.0, 1.3, 16, 16);
        let integral: f64 = rule.iter().map(|&(x, w)| w * normal_pdf(x)).sum();
        assert!((integral - normal_cdf(1.3)).abs() < 1e-13);
        assert!((normal_cdf(-10.0) - 7.619853024160527e-24).abs() < 1e-36);
    }
}
