//! Per-layer format allocation: an exact multiple-choice knapsack by dynamic programming.
//!
//! Layer `l` takes exactly one of its options `q`, each with an integer cost `cost[l][q]` (bits,
//! in whatever unit the caller discretized them) and a loss `loss[l][q]` (alpha_l * t_lq^2 for the
//! linearity theorem). The total cost may not exceed `capacity`; the total loss is minimized.
//! Time O(layers * capacity * options), memory one choice byte per (layer, capacity) cell.

use crate::error::{Error, Result};

/// The optimal choice per layer and its total loss and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub choices: Vec<usize>,
    pub loss: f64,
    pub cost: u64,
}

/// Solves the knapsack. `costs` and `losses` are `layers x options` (row-major, the same option
/// count for every layer; give an option an infinite loss to forbid it).
pub fn allocate(
    costs: &[u64],
    losses: &[f64],
    options: usize,
    capacity: u64,
) -> Result<Allocation> {
    if options == 0 || options > 255 {
        return Err(Error::invalid(
            "menu",
            format!("needs 1..255 formats, got {options}"),
        ));
    }
    if costs.len() != losses.len() || costs.len() % options != 0 {
        return Err(Error::invalid(
            "menu",
            format!(
                "{} costs and {} losses for {options} formats",
                costs.len(),
                losses.len()
            ),
        ));
    }
    if losses.iter().any(|l| l.is_nan() || *l < 0.0) {
        return Err(Error::invalid(
            "menu",
            "losses must be non-negative (inf forbids)",
        ));
    }
    let cap = usize::try_from(capacity)
        .ok()
        .filter(|&c| c <= 50_000_000)
        .ok_or_else(|| Error::invalid("budget", format!("capacity {capacity} is too fine")))?;
    let layers = costs.len() / options;
    if layers.saturating_mul(cap + 1) > 2_000_000_000 {
        return Err(Error::invalid("budget", "layers x capacity too large"));
    }
    // best[c]: least loss of the layers so far with total cost at most c.
    let mut best = vec![0.0f64; cap + 1];
    let mut next = vec![f64::INFINITY; cap + 1];
    let mut choice = vec![u8::MAX; layers * (cap + 1)];
    for l in 0..layers {
        next.fill(f64::INFINITY);
        let row = &mut choice[l * (cap + 1)..(l + 1) * (cap + 1)];
        for q in 0..options {
            let (cost, loss) = (costs[l * options + q], losses[l * options + q]);
            if loss.is_infinite() || cost > capacity {
                continue;
            }
            let cost = cost as usize;
            for c in cost..=cap {
                let candidate = best[c - cost] + loss;
                if candidate < next[c] {
                    next[c] = candidate;
                    row[c] = q as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
    }
    if !best[cap].is_finite() {
        return Err(Error::invalid(
            "budget",
            "no allocation fits: even the cheapest formats exceed it",
        ));
    }
    let mut choices = vec![0usize; layers];
    let mut c = cap;
    let mut cost = 0u64;
    for l in (0..layers).rev() {
        let q = choice[l * (cap + 1) + c] as usize;
        choices[l] = q;
        let spent = costs[l * options + q];
        cost += spent;
        c -= spent as usize;
    }
    Ok(Allocation {
        choices,
        loss: best[cap],
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(costs: &[u64], losses: &[f64], options: usize, capacity: u64) -> f64 {
        let layers = costs.len() / options;
        let mut best = f64::INFINITY;
        for code in 0..options.pow(layers as u32) {
            let (mut c, mut l, mut k) = (0, 0.0, code);
            for layer in 0..layers {
                let q = k % options;
                k /= options;
                c += costs[layer * options + q];
                l += losses[layer * options + q];
            }
            if c <= capacity && l < best {
                best = l;
            }
        }
        best
    }

    #[test]
    fn equals_brute_force_on_random_instances() {
        let mut state = 99u64;
        let mut rand = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        for _ in 0..200 {
            let (layers, options) = (1 + (rand() * 6.0) as usize, 1 + (rand() * 4.0) as usize);
            let costs: Vec<u64> = (0..layers * options)
                .map(|_| (rand() * 20.0) as u64)
                .collect();
            let losses: Vec<f64> = (0..layers * options).map(|_| rand()).collect();
            let capacity = (rand() * 20.0 * layers as f64) as u64;
            let expect = brute_force(&costs, &losses, options, capacity);
            match allocate(&costs, &losses, options, capacity) {
                Ok(a) => {
                    assert!((a.loss - expect).abs() < 1e-12, "{} vs {expect}", a.loss);
                    assert!(a.cost <= capacity);
                    let l: f64 = a
                        .choices
                        .iter()
                        .enumerate()
                        .map(|(i, &q)| losses[i * options + q])
                        .sum();
                    assert!((l - a.loss).abs() < 1e-12);
                }
                Err(_) => assert!(expect.is_infinite()),
            }
        }
    }
}
