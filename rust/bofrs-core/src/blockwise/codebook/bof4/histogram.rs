//! The data-driven target: real tensors streamed into a fine weighted histogram.
//!
//! Every block of a tensor (flattened row-major, as [`crate::blockwise::encode::pack`] cuts it) is
//! normalized by its exact f32 scale (absmax or signed absmax); each normalized value `x` adds
//! weight `s^k` (`k` = 2 for MSE, 1 for MAE) to one of [`HISTOGRAM_BINS`] equal bins of
//! (-1, 1), together with `s^k x` and `s^k x^2`; values exactly at -1 or +1 (block maxima) are
//! point masses kept apart. Memory is fixed whatever the number of weights, and the iteration
//! then runs on prefix sums of the bins. A region takes the bins whose centre it contains, so
//! its optimum is exact up to a fraction of a bin (3e-5).

use super::{region_bounds, Metric, Target};
use crate::blockwise::codebook::Normalization;
use crate::blockwise::layout::BlockLayout;
use crate::blockwise::scale::raw_block_scale;
use crate::error::{Error, Result};
use crate::numeric::element::Element;
use crate::runtime::pool::{num_threads, pool};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Bins of the histogram over (-1, 1).
pub const HISTOGRAM_BINS: usize = 1 << 16;

/// Weighted sums per bin, plus the two edge point masses.
#[derive(Debug, Clone)]
struct Bins {
    w: Vec<f64>,
    wx: Vec<f64>,
    wxx: Vec<f64>,
    /// Weight of values exactly -1 and exactly +1.
    edges: [f64; 2],
    /// Values seen (sampled blocks only).
    values: u64,
}

impl Bins {
    fn new() -> Self {
        Self {
            w: vec![0.0; HISTOGRAM_BINS],
            wx: vec![0.0; HISTOGRAM_BINS],
            wxx: vec![0.0; HISTOGRAM_BINS],
            edges: [0.0; 2],
            values: 0,
        }
    }

    fn merge(&mut self, other: &Bins) {
        for (a, b) in self.w.iter_mut().zip(&other.w) {
            *a += b;
        }
        for (a, b) in self.wx.iter_mut().zip(&other.wx) {
            *a += b;
        }
        for (a, b) in self.wxx.iter_mut().zip(&other.wxx) {
            *a += b;
        }
        self.edges[0] += other.edges[0];
        self.edges[1] += other.edges[1];
        self.values += other.values;
    }

    #[inline(always)]
    fn add_block<E: Element>(&mut self, block: &[E], scale: f32, power: i32) {
        self.values += block.len() as u64;
        if scale == 0.0 {
            return; // an all-zero block: every reconstruction is exact, no weight
        }
        let s = scale as f64;
        let weight = s.abs().powi(power);
        let inv = 1.0 / s;
        let half = HISTOGRAM_BINS as f64 * 0.5;
        for v in block {
            let x = v.to_f32() as f64 * inv;
            if x >= 1.0 {
                self.edges[1] += weight;
            } else if x <= -1.0 {
                self.edges[0] += weight;
            } else {
                let j = (((x + 1.0) * half) as usize).min(HISTOGRAM_BINS - 1);
                self.w[j] += weight;
                self.wx[j] += weight * x;
                self.wxx[j] += weight * x * x;
            }
        }
    }
}

/// Prefix sums of the bins (index `j`: bins `0..j`).
#[derive(Debug)]
struct Prefix {
    w: Vec<f64>,
    wx: Vec<f64>,
    wxx: Vec<f64>,
}

fn prefix(values: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len() + 1);
    let mut acc = 0.0;
    out.push(0.0);
    for v in values {
        acc += v;
        out.push(acc);
    }
    out
}

/// A streaming weighted histogram of normalized values of real tensors: the data-driven
/// target of [`super::optimize`].
#[derive(Debug)]
pub struct WeightHistogram {
    block_size: usize,
    normalization: Normalization,
    metric: Metric,
    sample: f64,
    seed: u64,
    blocks_seen: u64,
    bins: Bins,
    prefix: OnceLock<Prefix>,
}

/// A well-mixed 64-bit hash (splitmix64's finalizer).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl WeightHistogram {
    /// An empty histogram. `sample` in (0, 1] is the fraction of blocks kept, chosen by a hash of
    /// `seed` and the block's running number (so the same data and seed give the same sample).
    pub fn new(
        block_size: usize,
        normalization: Normalization,
        metric: Metric,
        sample: f64,
        seed: u64,
    ) -> Result<Self> {
        BlockLayout::new(0, block_size)?;
        if !(sample > 0.0 && sample <= 1.0) {
            return Err(Error::invalid(
                "sample",
                format!("must be in (0, 1], got {sample}"),
            ));
        }
        Ok(Self {
            block_size,
            normalization,
            metric,
            sample,
            seed,
            blocks_seen: 0,
            bins: Bins::new(),
            prefix: OnceLock::new(),
        })
    }

    /// Block size the values are normalized with.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Normalization of the blocks.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// Values added so far (sampled blocks only).
    pub fn values(&self) -> u64 {
        self.bins.values
    }

    /// Total weight of the histogram (zero when every block was all zeros).
    pub fn total_weight(&self) -> f64 {
        self.bins.w.iter().sum::<f64>() + self.bins.edges.iter().sum::<f64>()
    }

    fn keeps(&self, block: u64) -> bool {
        self.sample >= 1.0 || (mix(self.seed ^ mix(block)) as f64) < self.sample * 2f64.powi(64)
    }

    /// Adds every (sampled) block of one flattened tensor; the last block may be partial.
    /// A NaN or infinity is an error naming its flat index, and leaves the histogram unchanged.
    pub fn add<E: Element>(&mut self, data: &[E]) -> Result<()> {
        let layout = BlockLayout::new(data.len(), self.block_size)?;
        let blocks = layout.num_blocks();
        let threads = num_threads().max(1);
        let per_chunk = blocks.div_ceil(threads).max(1);
        let (bs, normalization, power, first) = (
            self.block_size,
            self.normalization,
            self.metric.scale_power(),
            self.blocks_seen,
        );
        let this = &*self;
        let partials: Vec<std::result::Result<Bins, usize>> = pool().install(|| {
            (0..blocks.div_ceil(per_chunk))
                .into_par_iter()
                .map(|c| {
                    let mut bins = Bins::new();
                    let start = c * per_chunk;
                    for b in start..(start + per_chunk).min(blocks) {
                        let block = &data[b * bs..((b + 1) * bs).min(data.len())];
                        let scale =
                            raw_block_scale(block, normalization).map_err(|i| b * bs + i)?;
                        if this.keeps(first + b as u64) {
                            bins.add_block(block, scale, power);
                        }
                    }
                    Ok(bins)
                })
                .collect()
        });
        let mut merged = Bins::new();
        for part in partials {
            match part {
                Ok(bins) => merged.merge(&bins),
                Err(index) => return Err(Error::NonFinite { index }),
            }
        }
        self.bins.merge(&merged);
        self.blocks_seen += blocks as u64;
        self.prefix = OnceLock::new();
        Ok(())
    }

    fn prefix(&self) -> &Prefix {
        self.prefix.get_or_init(|| Prefix {
            w: prefix(&self.bins.w),
            wx: prefix(&self.bins.wx),
            wxx: prefix(&self.bins.wxx),
        })
    }

    /// Index of the first bin whose centre is above `b` (0..=bins).
    fn first_bin_above(b: f64) -> usize {
        let pos = (b + 1.0) * HISTOGRAM_BINS as f64 * 0.5 - 0.5;
        if pos < 0.0 {
            0
        } else {
            ((pos.floor() as usize) + 1).min(HISTOGRAM_BINS)
        }
    }

    fn edge_weights(&self, l: usize, regions: usize) -> (f64, f64) {
        let below = if l == 0 { self.bins.edges[0] } else { 0.0 };
        let above = if l == regions - 1 {
            self.bins.edges[1]
        } else {
            0.0
        };
        (below, above)
    }

    fn weighted_median(&self, lo_bin: usize, hi_bin: usize, need: f64) -> f64 {
        let p = &self.prefix().w;
        let base = p[lo_bin];
        // First bin j in [lo_bin, hi_bin) whose cumulative weight reaches `need`.
        let (mut a, mut b) = (lo_bin, hi_bin - 1);
        while a < b {
            let mid = (a + b) / 2;
            if p[mid + 1] - base >= need {
                b = mid;
            } else {
                a = mid + 1;
            }
        }
        let width = 2.0 / HISTOGRAM_BINS as f64;
        let inside = self.bins.w[a];
        let frac = if inside > 0.0 {
            ((need - (p[a] - base)) / inside).clamp(0.0, 1.0)
        } else {
            0.5
        };
        -1.0 + (a as f64 + frac) * width
    }
}

impl Target for WeightHistogram {
    fn metric(&self) -> Metric {
        self.metric
    }

    fn region_optima(&self, bounds: &[f64], _current: &[f64]) -> Vec<Option<f64>> {
        let regions = bounds.len() - 1;
        let p = self.prefix();
        let cuts: Vec<usize> = bounds.iter().map(|&b| Self::first_bin_above(b)).collect();
        (0..regions)
            .map(|l| {
                let (lo, hi) = (cuts[l], cuts[l + 1].max(cuts[l]));
                let (below, above) = self.edge_weights(l, regions);
                let continuous = p.w[hi] - p.w[lo];
                let total = continuous + below + above;
                if total <= 0.0 {
                    return None;
                }
                let level = match self.metric {
                    Metric::Mse => (p.wx[hi] - p.wx[lo] - below + above) / total,
                    Metric::Mae => {
                        let need = 0.5 * total - below;
                        if need <= 0.0 {
                            -1.0
                        } else if need >= continuous {
                            1.0
                        } else {
                            self.weighted_median(lo, hi, need)
                        }
                    }
                };
                Some(level.clamp(bounds[l], bounds[l + 1]))
            })
            .collect()
    }

    fn error(&self, levels: &[f64]) -> f64 {
        if self.bins.values == 0 {
            return 0.0;
        }
        let bounds = region_bounds(levels);
        let regions = levels.len();
        let p = self.prefix();
        let mut total = 0.0;
        for (l, &c) in levels.iter().enumerate() {
            let lo = Self::first_bin_above(bounds[l]);
            let hi = Self::first_bin_above(bounds[l + 1]).max(lo);
            let (below, above) = self.edge_weights(l, regions);
            total += match self.metric {
                Metric::Mse => {
                    (p.wxx[hi] - p.wxx[lo]) - 2.0 * c * (p.wx[hi] - p.wx[lo])
                        + c * c * (p.w[hi] - p.w[lo])
                        + below * (1.0 + c) * (1.0 + c)
                        + above * (1.0 - c) * (1.0 - c)
                }
                Metric::Mae => {
                    let bins: f64 = (lo..hi)
                        .filter(|&j| self.bins.w[j] > 0.0)
                        .map(|j| (self.bins.wx[j] - c * self.bins.w[j]).abs())
                        .sum();
                    bins + below * (1.0 + c).abs() + above * (1.0 - c).abs()
                }
            };
        }
        total.max(0.0) / self.bins.values as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_is_reported_at_its_first_index() {
        let mut h = WeightHistogram::new(16, Normalization::Absmax, Metric::Mse, 1.0, 0).unwrap();
        let mut data = vec![0.5f32; 1000];
        data[700] = f32::INFINITY;
        data[333] = f32::NAN;
        assert_eq!(h.add(&data), Err(Error::NonFinite { index: 333 }));
        assert_eq!(h.values(), 0);
    }

    #[test]
    fn edges_and_weights() {
        let mut h =
            WeightHistogram::new(16, Normalization::SignedAbsmax, Metric::Mse, 1.0, 0).unwrap();
        let mut data = vec![1.0f32; 16];
        data[3] = -2.0; // signed scale -2: that element maps to +1, the others to -0.5
        h.add(&data).unwrap();
        assert_eq!(h.values(), 16);
        assert_eq!(h.bins.edges, [0.0, 4.0]);
        assert!((h.total_weight() - 64.0).abs() < 1e-12);
    }
}
