//! Exact nearest-point search in a 1-D or 2-D grid.
//!
//! 1-D: a binary search over the midpoints (`#{k : y > t_k}`, ties to the lower point, as the
//! block-wise encoder). 2-D: a uniform lookup over the square where the Gaussian mass is; each
//! cell keeps only the points that can be nearest to something inside it (those within
//! `d0 + 2r` of its centre, `d0` the distance from the centre to its nearest point and `r` the
//! cell's half-diagonal), so a query checks a handful of points instead of all of them. Queries
//! outside the square scan every point. Ties go to the lower index either way.

use crate::error::{Error, Result};

/// Half-width of the 2-D lookup square and cells per side.
const LOOKUP_RANGE: f64 = 4.5;
const LOOKUP_CELLS: usize = 64;
/// Cells of the 1-D lookup over [-LOOKUP_RANGE, LOOKUP_RANGE].
const LINE_CELLS: usize = 4096;

/// A grid ready for encoding: `n` points of dimension 1 or 2.
#[derive(Debug, Clone)]
pub struct GridSearch {
    dim: usize,
    points: Vec<f32>,
    thresholds: Vec<f32>,
    /// 1-D: per cell of a uniform partition of the line, the number of thresholds below the
    /// cell's start (a starting point that a step or two of local search corrects).
    line_start: Vec<u8>,
    /// Per cell: start offset into `candidates` (CELLS^2 + 1 offsets).
    cell_start: Vec<u32>,
    candidates: Vec<u16>,
}

impl GridSearch {
    /// Validates `points` (`n` x `dim`, row-major; n a power of two in 2..=256; 1-D points
    /// ascending) and builds the search structure.
    pub fn new(dim: usize, points: &[f32]) -> Result<Self> {
        let bad = |message: String| Error::InvalidArgument {
            name: "grid",
            message,
        };
        if dim != 1 && dim != 2 {
            return Err(bad(format!("dimension must be 1 or 2, got {dim}")));
        }
        if points.len() % dim != 0 {
            return Err(bad(format!(
                "{} values do not make {dim}-D points",
                points.len()
            )));
        }
        let n = points.len() / dim;
        if !(2..=256).contains(&n) || !n.is_power_of_two() {
            return Err(bad(format!(
                "needs 2..256 points (a power of two), got {n}"
            )));
        }
        if points.iter().any(|v| !v.is_finite()) {
            return Err(bad("points must be finite".into()));
        }
        let mut search = Self {
            dim,
            points: points.to_vec(),
            thresholds: Vec::new(),
            line_start: Vec::new(),
            cell_start: Vec::new(),
            candidates: Vec::new(),
        };
        if dim == 1 {
            if points.windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad("1-D points must be strictly ascending".into()));
            }
            search.thresholds = points.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
            search.line_start = (0..LINE_CELLS)
                .map(|i| {
                    let start = -LOOKUP_RANGE + i as f64 * 2.0 * LOOKUP_RANGE / LINE_CELLS as f64;
                    search
                        .thresholds
                        .iter()
                        .filter(|&&t| (t as f64) < start)
                        .count() as u8
                })
                .collect();
        } else {
            search.build_lookup();
        }
        Ok(search)
    }

    /// Dimension of the points.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len() / self.dim
    }

    /// Always false: a grid has at least two points.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Point `k` (its `dim` coordinates).
    #[inline(always)]
    pub fn point(&self, k: usize) -> &[f32] {
        &self.points[k * self.dim..(k + 1) * self.dim]
    }

    #[inline(always)]
    fn dist2(&self, k: usize, x: f64, y: f64) -> f64 {
        let (px, py) = (self.points[2 * k] as f64, self.points[2 * k + 1] as f64);
        (px - x) * (px - x) + (py - y) * (py - y)
    }

    fn build_lookup(&mut self) {
        let n = self.len();
        let width = 2.0 * LOOKUP_RANGE / LOOKUP_CELLS as f64;
        let half_diagonal = width * std::f64::consts::FRAC_1_SQRT_2;
        self.cell_start.push(0);
        for i in 0..LOOKUP_CELLS {
            for j in 0..LOOKUP_CELLS {
                let cx = -LOOKUP_RANGE + (i as f64 + 0.5) * width;
                let cy = -LOOKUP_RANGE + (j as f64 + 0.5) * width;
                let d0 = (0..n)
                    .map(|k| self.dist2(k, cx, cy))
                    .fold(f64::INFINITY, f64::min)
                    .sqrt();
                let reach = d0 + 2.0 * half_diagonal + 1e-6;
                let reach2 = reach * reach;
                for k in 0..n {
                    if self.dist2(k, cx, cy) <= reach2 {
                        self.candidates.push(k as u16);
                    }
                }
                self.cell_start.push(self.candidates.len() as u32);
            }
        }
    }

    /// The nearest point to a scalar (1-D grids): `#{k : y > t_k}`, exactly. The lookup gives
    /// the count at the start of `y`'s cell; the local search fixes it whatever the cell
    /// (rounding of the cell index, several thresholds in a cell, values beyond the range).
    #[inline(always)]
    pub fn nearest_1d(&self, y: f32) -> u8 {
        let t = &self.thresholds;
        let scaled = (y + LOOKUP_RANGE as f32) * (LINE_CELLS as f32 / (2.0 * LOOKUP_RANGE as f32));
        let cell = if scaled >= 0.0 {
            (scaled as usize).min(LINE_CELLS - 1)
        } else {
            0
        };
        let mut code = self.line_start[cell] as usize;
        while code < t.len() && y > t[code] {
            code += 1;
        }
        while code > 0 && y <= t[code - 1] {
            code -= 1;
        }
        code as u8
    }

    /// The nearest point to `(x, y)` (2-D grids).
    #[inline(always)]
    pub fn nearest_2d(&self, x: f32, y: f32) -> u8 {
        let (x, y) = (x as f64, y as f64);
        let scaled = |v: f64| (v + LOOKUP_RANGE) / (2.0 * LOOKUP_RANGE) * LOOKUP_CELLS as f64;
        let (fi, fj) = (scaled(x), scaled(y));
        let mut best = (0usize, f64::INFINITY);
        if fi >= 0.0 && fj >= 0.0 && fi < LOOKUP_CELLS as f64 && fj < LOOKUP_CELLS as f64 {
            let cell = fi as usize * LOOKUP_CELLS + fj as usize;
            let range = self.cell_start[cell] as usize..self.cell_start[cell + 1] as usize;
            for &k in &self.candidates[range] {
                let d = self.dist2(k as usize, x, y);
                if d < best.1 {
                    best = (k as usize, d);
                }
            }
        } else {
            for k in 0..self.len() {
                let d = self.dist2(k, x, y);
                if d < best.1 {
                    best = (k, d);
                }
            }
        }
        best.0 as u8
    }

    /// The nearest point by scanning all of them (the reference of the fast paths).
    pub fn nearest_scan(&self, v: &[f32]) -> u8 {
        let mut best = (0usize, f64::INFINITY);
        for k in 0..self.len() {
            let d: f64 = self
                .point(k)
                .iter()
                .zip(v)
                .map(|(&p, &q)| (p as f64 - q as f64) * (p as f64 - q as f64))
                .sum();
            if d < best.1 {
                best = (k, d);
            }
        }
        best.0 as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::higgs::grid::{plane_grid, scalar_grid};

    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn fast_paths_equal_the_scan() {
        let scalars: Vec<GridSearch> = [16, 32, 64, 256]
            .map(|n| GridSearch::new(1, &f32s(&scalar_grid(n).unwrap().points)).unwrap())
            .into();
        let plane = GridSearch::new(2, &f32s(&plane_grid(64, 3).unwrap().points)).unwrap();
        let mut state = 12345u64;
        for i in 0..200_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 12.0;
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 12.0;
            // Points exactly between neighbours and on cell edges too.
            let scalar = &scalars[i % scalars.len()];
            let t = &scalar.thresholds;
            let a1 = if i % 7 == 0 { t[(i / 7) % t.len()] } else { a };
            // 1-D codes are defined by the f32 midpoints (exactly as the block-wise encoder).
            let count = t.iter().filter(|&&t| a1 > t).count() as u8;
            assert_eq!(scalar.nearest_1d(a1), count, "{a1} n={}", scalar.len());
            assert_eq!(
                plane.nearest_2d(a, b),
                plane.nearest_scan(&[a, b]),
                "{a} {b}"
            );
        }
    }

    #[test]
    fn bad_grids_are_refused() {
        assert!(GridSearch::new(3, &[0.0; 12]).is_err());
        assert!(GridSearch::new(1, &[0.0; 3]).is_err());
        assert!(GridSearch::new(1, &[1.0, 0.0]).is_err());
        assert!(GridSearch::new(2, &[f32::NAN; 8]).is_err());
    }
}
