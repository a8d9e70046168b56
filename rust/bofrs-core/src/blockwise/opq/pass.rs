//! The OPQ pass of an encoder task: which blocks have outliers, their masks, the raw scales
//! without them, and the outliers collected in flat order.
//!
//! Every kernel set implements [`ExactKernels`] (the rule evaluated exactly; the portable one in
//! [`super::portable`] defines the results) and runs [`exact_pass`]: the rule on every block.
//! Kernel sets with a cheap filter ([`FilterKernels`], AVX2) run [`filtered_pass`] instead: the
//! filter clears most blocks without the exact sums and splits most others at f32 thresholds;
//! it only decides which blocks the exact rule is applied to, so the results are the same.

use super::portable::{collect_word, MASK_WORDS};
use super::rule::{f32_bracket, f32_limit, FilterBound, Threshold};
use super::{OpqOptions, Outlier, OutlierDType};
use crate::blockwise::codebook::Normalization;
use crate::blockwise::encode::BlockKernels;
use crate::error::Error;
use crate::numeric::element::{Element, Kind};
use crate::runtime::recycle;

/// The exact OPQ rule's kernels of one ISA (beside the encoder's [`BlockKernels`]).
pub(crate) trait ExactKernels: BlockKernels {
    /// The block's shifted sums, exactly as [`super::block_sums`] computes them.
    fn sums<T: Element>(&self, block: &[T]) -> (f64, f64);
    /// The outlier mask of a block, exactly as [`scan`](super::scan) computes it (`t32` = [`f32_limit`]).
    fn scan<T: Element>(&self, block: &[T], limit2: f64, t32: f32, mask: &mut [u64; MASK_WORDS]);
    /// The raw scale without outliers, exactly as [`super::raw_scale_within`] computes it.
    fn raw_scale<T: Element>(&self, block: &[T], limit2: f64, t32: f32, norm: Normalization)
        -> f32;
    /// [`super::signed_scale_masked`].
    fn signed_masked<T: Element>(&self, block: &[T], mask: &[u64; MASK_WORDS], max: f32) -> f32;
    /// The first pass of a task with OPQ, in flat block order: every block's raw scale (without
    /// its outliers) into `scales` and the outliers recorded in `found` ([`mark_block`]). Stops
    /// at the first block with a non-finite value; returns the number of blocks before it (all
    /// when none). The default: [`exact_pass`].
    #[inline(always)]
    fn first_pass<E: Element>(
        &self,
        task: Blocks<'_, E>,
        scales: &mut [f32],
        found: &mut Found,
    ) -> usize {
        exact_pass(self, task, scales, found)
    }
}

/// The cheap filter in front of the exact rule, for kernel sets that have one (AVX2).
pub(crate) trait FilterKernels: ExactKernels {
    /// Cheap f32 shifted sums for [`Threshold::provably_clean`] (any order); `None` for a
    /// length it does not sum (then the exact rule decides).
    fn f32_sums<T: Element>(&self, block: &[T]) -> Option<(f32, f32)>;
    /// Into `plan`: the largest `abs_bits` of each of [`GROUP_BLOCKS`] full blocks of `bs`
    /// values (`group`), their signed-absmax raw scales where one sign has that magnitude (for
    /// a signed `norm`) and, when all are finite, the filter's verdict on them, in one pass
    /// over the values; `false` for a block size it does not filter (then one block at a time).
    fn group_filter<T: Element>(
        &self,
        group: &[T],
        block: (usize, Normalization),
        opq: (&Threshold, &FilterBound),
        plan: &mut GroupPlan,
    ) -> bool;
    /// For f32 thresholds from [`f32_bracket`]: when no value has `t_lo < |x| <= t_hi`, the
    /// mask of `|x| > t_hi` (then exactly [`scan`](super::scan)'s) and the kept values' raw scales
    /// ([`Kept`]: the signed one only where cheap and `norm` is signed absmax); `None` when a
    /// value lies between the thresholds, or for a length it does not split.
    fn split<T: Element>(
        &self,
        block: &[T],
        thresholds: (f32, f32),
        norm: Normalization,
        mask: &mut [u64; MASK_WORDS],
    ) -> Option<Kept>;
    /// The suspects `bits` of a group of [`GROUP_BLOCKS`] bfloat16 blocks of 64 values
    /// (`plan`: their verdicts) whose outliers are taken as their own bits, in order: each
    /// decided one split at its f32 thresholds ([`FilterKernels::split`]), its outliers appended
    /// to `outliers` (flat indices from `first_index`) and its raw scale set in `scales` (one
    /// per block of the group), up to the first that needs more (undecided, a value between the
    /// thresholds, or a tie of signs). Returns the suspects left, that one first; `None` for
    /// other types or block sizes.
    #[allow(clippy::too_many_arguments)]
    fn take_decided<T: Element>(
        &self,
        group: &[T],
        block: (usize, Normalization),
        plan: &GroupPlan,
        bits: u32,
        first_index: u64,
        scales: &mut [f32],
        outliers: &mut Vec<Outlier>,
    ) -> Option<u32>;
}

/// The blocks of one task as the OPQ pass reads them: the values, the OPQ constants, the block
/// size and the normalization.
#[derive(Clone, Copy)]
pub(crate) struct Blocks<'a, E> {
    pub(crate) input: &'a [E],
    pub(crate) opq: &'a OpqContext,
    pub(crate) bs: usize,
    pub(crate) norm: Normalization,
}

/// What the OPQ part of a task found ([`task_outliers`]).
pub(crate) struct TaskOutliers {
    /// The outliers stored so far, in flat order (those before `error`'s block).
    pub(crate) outliers: Vec<Outlier>,
    /// Blocks before the first one with a non-finite value (all when none).
    pub(crate) finite_blocks: usize,
    /// The first block whose outliers cannot be stored, with the error.
    pub(crate) error: Option<(usize, Error)>,
}

/// The OPQ part of a task whose first block is `first_block`: the first pass
/// ([`ExactKernels::first_pass`]), then the marked values' storage in flat order, up to the
/// first that cannot be stored (bfloat16 outliers of a bfloat16 tensor, which cannot fail, are
/// taken during the pass).
#[inline(always)]
pub(crate) fn task_outliers<E: Element, K: ExactKernels>(
    kernel: &K,
    input: &[E],
    opq: &OpqContext,
    block: (usize, Normalization),
    scales: &mut [f32],
    first_block: usize,
) -> TaskOutliers {
    let bs = block.0;
    let mut marks = MARKS.take();
    marks.clear();
    // bfloat16 outliers of a bfloat16 tensor: their bits, taken where found.
    let direct = matches!(E::KIND, Kind::BFloat16) && opq.options.dtype == OutlierDType::BFloat16;
    if !direct {
        marks.reserve(scales.len() * bs.div_ceil(64));
    }
    let mut found = Found {
        marks,
        outliers: recycle::take(),
        direct,
        task_start: first_block * bs,
    };
    let (bs, norm) = block;
    let task = Blocks {
        input,
        opq,
        bs,
        norm,
    };
    let finite_blocks = kernel.first_pass(task, scales, &mut found);
    let Found {
        marks,
        mut outliers,
        ..
    } = found;
    // The marked values in flat order, up to the first that cannot be stored.
    let mut error = None;
    for &(start, word) in &marks {
        let start = start as usize;
        let values = &input[start..input.len().min(start + 64)];
        let first_index = first_block * bs + start;
        if let Err(err) = collect_word(
            values,
            word,
            &opq.options,
            first_index,
            E::MAX_FINITE,
            &mut outliers,
        ) {
            error = Some((start / bs, err));
            break;
        }
    }
    MARKS.set(marks);
    TaskOutliers {
        outliers,
        finite_blocks,
        error,
    }
}

/// [`ExactKernels::first_pass`] by the exact rule on every block (the definition of the
/// results).
#[inline(always)]
pub(crate) fn exact_pass<E: Element, K: ExactKernels + ?Sized>(
    kernel: &K,
    task: Blocks<'_, E>,
    scales: &mut [f32],
    found: &mut Found,
) -> usize {
    let Blocks {
        input, bs, norm, ..
    } = task;
    let mut mask = [0u64; MASK_WORDS];
    for b in 0..scales.len() {
        let start = b * bs;
        let block = &input[start..input.len().min(start + bs)];
        let max_bits = kernel.max_abs_bits(block);
        if max_bits >= E::NON_FINITE_ABS_BITS {
            return b;
        }
        // Cannot fail for a finite maximum.
        scales[b] = kernel.raw_scale_from_max(block, max_bits, norm);
        let at = (b, None);
        suspect_block(kernel, task, at, &mut mask, scales, found);
    }
    scales.len()
}

/// Blocks of one [`FilterKernels::group_filter`] call.
pub(crate) const GROUP_BLOCKS: usize = 8;

/// The OPQ filter's verdict on [`GROUP_BLOCKS`] consecutive full blocks (bit `j` of a mask is
/// block `j`); the masks and thresholds are meaningful only when every block is finite.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GroupPlan {
    /// Largest `abs_bits` of each block.
    pub(crate) max_bits: [u32; GROUP_BLOCKS],
    /// The same magnitudes as f32 (each block's absmax raw scale).
    pub(crate) max_abs: [f32; GROUP_BLOCKS],
    /// With signs (a signed-absmax filter): the same magnitudes with the sign of the block's
    /// values of that magnitude (each block's signed-absmax raw scale), except for blocks in
    /// `sign_ties`.
    pub(crate) signed: [f32; GROUP_BLOCKS],
    /// Blocks with both signs at the largest magnitude (their first such value decides).
    pub(crate) sign_ties: u32,
    /// Whether every block is finite (every `max_bits` below the type's non-finite bits).
    pub(crate) finite: bool,
    /// Blocks the filter did not clear ([`Threshold::provably_clean`] failed).
    pub(crate) suspects: u32,
    /// Suspects with f32 thresholds from [`f32_bracket`] whose largest magnitude is above
    /// `t_hi` (as [`f32_thresholds`] decides).
    pub(crate) decided: u32,
    pub(crate) t_lo: [f32; GROUP_BLOCKS],
    pub(crate) t_hi: [f32; GROUP_BLOCKS],
}

/// The raw scales of a block's values without its outliers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kept {
    /// The largest magnitude (the absmax raw scale; 0 when every value is an outlier).
    pub(crate) max: f32,
    /// The signed-absmax raw scale when the kernel knows it (`None`: [`ExactKernels::signed_masked`]
    /// finds it).
    pub(crate) signed: Option<f32>,
}

impl Kept {
    /// Only the largest magnitude.
    pub(crate) fn magnitude(max: f32) -> Self {
        Self { max, signed: None }
    }
}

/// OPQ settings and the per-length constants.
pub(crate) struct OpqContext {
    pub(crate) options: OpqOptions,
    full: (Threshold, FilterBound),
    tail: (Threshold, FilterBound),
}

impl OpqContext {
    /// The constants for blocks of `bs` values and a partial last block of `tail` (0: none).
    pub(crate) fn new(options: OpqOptions, bs: usize, tail: usize) -> Self {
        Self {
            options,
            full: (Threshold::new(bs, options.q), FilterBound::new(bs)),
            tail: (
                Threshold::new(tail.max(1), options.q),
                FilterBound::new(tail.max(1)),
            ),
        }
    }

    /// The constants for a block of `len` values (block size `bs`, or the partial last block).
    #[inline(always)]
    pub(crate) fn for_length(&self, len: usize, bs: usize) -> &(Threshold, FilterBound) {
        if len == bs {
            &self.full
        } else {
            &self.tail
        }
    }
}

/// [`ExactKernels::first_pass`] with the filter: groups of [`GROUP_BLOCKS`] full blocks go
/// through [`FilterKernels::group_filter`] (one vectorized filter for the group, then only the
/// suspects, while the group is in cache); the other blocks one at a time, each through
/// [`FilterKernels::f32_sums`] and [`Threshold::provably_clean`]. The filter only decides which
/// blocks the exact rule is applied to, so the results are [`exact_pass`]'s.
#[inline(always)]
pub(crate) fn filtered_pass<E: Element, K: FilterKernels + ?Sized>(
    kernel: &K,
    task: Blocks<'_, E>,
    scales: &mut [f32],
    found: &mut Found,
) -> usize {
    let Blocks {
        input,
        opq,
        bs,
        norm,
    } = task;
    let blocks = scales.len();
    let full_blocks = input.len() / bs;
    let mut mask = [0u64; MASK_WORDS];
    let mut plan = GroupPlan::default();
    let mut b = 0;
    // Blocks before `single` go one at a time (a group with a non-finite value).
    let mut single = 0;
    while b < blocks {
        if b >= single && b + GROUP_BLOCKS <= full_blocks {
            let group = &input[b * bs..(b + GROUP_BLOCKS) * bs];
            let (threshold, bound) = &opq.full;
            let filtered = kernel.group_filter(group, (bs, norm), (threshold, bound), &mut plan);
            if filtered && plan.finite {
                let group_scales = &mut scales[b..b + GROUP_BLOCKS];
                match norm {
                    Normalization::Absmax => group_scales.copy_from_slice(&plan.max_abs),
                    Normalization::SignedAbsmax => {
                        group_scales.copy_from_slice(&plan.signed);
                        let mut ties = plan.sign_ties;
                        while ties != 0 {
                            let j = ties.trailing_zeros() as usize;
                            ties &= ties - 1;
                            let block = &group[j * bs..(j + 1) * bs];
                            // Cannot fail for a finite maximum.
                            group_scales[j] =
                                kernel.raw_scale_from_max(block, plan.max_bits[j], norm);
                        }
                    }
                }
                // Decided suspects split at their f32 thresholds here; the rest (and those
                // with a value between the thresholds) take the exact path.
                let mut bits = plan.suspects;
                while bits != 0 {
                    if found.direct {
                        let first_index = (found.task_start + b * bs) as u64;
                        let scales = &mut scales[b..b + GROUP_BLOCKS];
                        let taken = kernel.take_decided(
                            group,
                            (bs, norm),
                            &plan,
                            bits,
                            first_index,
                            scales,
                            &mut found.outliers,
                        );
                        if let Some(rest) = taken {
                            bits = rest;
                            if bits == 0 {
                                break;
                            }
                        }
                    }
                    let j = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let block = &group[j * bs..(j + 1) * bs];
                    let kept = if plan.decided >> j & 1 == 1 {
                        kernel.split(block, (plan.t_lo[j], plan.t_hi[j]), norm, &mut mask)
                    } else {
                        None
                    };
                    match kept {
                        Some(kept) => {
                            let at = (b + j, bs);
                            mark_block(kernel, block, at, norm, kept, &mask, scales, found)
                        }
                        // A function, not a closure: closures do not inherit target features.
                        None => {
                            let at = (b + j, None);
                            suspect_block(kernel, task, at, &mut mask, scales, found)
                        }
                    }
                }
                b += GROUP_BLOCKS;
                continue;
            }
            single = b + GROUP_BLOCKS;
        }
        let start = b * bs;
        let block = &input[start..input.len().min(start + bs)];
        let max_bits = kernel.max_abs_bits(block);
        if max_bits >= E::NON_FINITE_ABS_BITS {
            return b;
        }
        // Cannot fail for a finite maximum.
        scales[b] = kernel.raw_scale_from_max(block, max_bits, norm);
        let (threshold, bound) = opq.for_length(block.len(), bs);
        let max_abs = E::abs_bits_to_f32(max_bits);
        let sums = kernel.f32_sums(block);
        if !sums.is_some_and(|(s, q)| threshold.provably_clean(max_abs, s, q, bound)) {
            // The values above the f32 thresholds, when they decide (else the exact rule).
            let split = match f32_thresholds(threshold, bound, sums, max_abs) {
                Some(thresholds) => kernel.split(block, thresholds, norm, &mut mask),
                None => None,
            };
            suspect_block(kernel, task, (b, split), &mut mask, scales, found);
        }
        b += 1;
    }
    blocks
}

/// Where the OPQ pass records the outliers it finds.
pub(crate) struct Found {
    /// The nonzero words of the outlier masks, for outliers whose storage can fail: collected
    /// after the pass, so that errors come in flat order.
    marks: Vec<Mark>,
    /// Outliers taken where found (`direct`: bfloat16 outliers of a bfloat16 tensor, whose
    /// stored bits are the value's own and cannot fail), in flat order.
    outliers: Vec<Outlier>,
    direct: bool,
    /// Flat index of the task's first value.
    task_start: usize,
}

/// Appends the values of `block` (bfloat16: [`OutlierDType::store`] of one is its own bits)
/// marked in `words` (bit `i` of word `w`: value `64 w + i`) to `outliers`, as their bits, with
/// flat indices from `first_index`.
#[inline(always)]
fn take_bits<E: Element>(
    block: &[E],
    words: &[u64],
    first_index: u64,
    outliers: &mut Vec<Outlier>,
) {
    assert!(words.len() * 64 >= block.len());
    outliers.reserve(block.len());
    let len = outliers.len();
    let dst = outliers.spare_capacity_mut().as_mut_ptr();
    let mut n = 0;
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let i = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            // Marks lie within the block: a set bit beyond it is a caller's bug.
            let value = (block[i].to_f32().to_bits() >> 16) as u16;
            // SAFETY: at most one write per value of the block, and `reserve` made room for
            // `block.len()`.
            unsafe { (*dst.add(n)).write(Outlier::new(first_index + i as u64, value)) };
            n += 1;
        }
    }
    // SAFETY: the first `n` spare slots were written above.
    unsafe { outliers.set_len(len + n) };
}

/// A nonzero word of an outlier mask: the task-relative index of its first value, and its bits
/// (bit `i` marks that index plus `i`).
type Mark = (u32, u64);

thread_local! {
    /// Each worker's [`Mark`] buffer, kept from task to task.
    static MARKS: std::cell::Cell<Vec<Mark>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The outliers of suspect block `b` recorded in `found` ([`mark_block`]) and its raw scale
/// without them: `split`, when the filter's f32 thresholds decided them (their mask in `mask`),
/// else the exact rule's ([`exact_outliers`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn suspect_block<E: Element, K: ExactKernels + ?Sized>(
    kernel: &K,
    Blocks {
        input,
        opq,
        bs,
        norm,
    }: Blocks<'_, E>,
    (b, split): (usize, Option<Kept>),
    mask: &mut [u64; MASK_WORDS],
    scales: &mut [f32],
    found: &mut Found,
) {
    let start = b * bs;
    let block = &input[start..input.len().min(start + bs)];
    let (threshold, _) = opq.for_length(block.len(), bs);
    let kept = match split {
        Some(kept) => Some(kept),
        None => exact_outliers(kernel, block, threshold, mask),
    };
    let Some(kept) = kept else {
        // No outlier after all: the plain raw scale (the group pass may not have set it).
        scales[b] = kernel.raw_scale_from_max(block, kernel.max_abs_bits(block), norm);
        return;
    };
    mark_block(kernel, block, (b, bs), norm, kept, mask, scales, found);
}

/// Records the outliers (`mask`) of block `b` (of a task with blocks of `bs` values) in `found`
/// and sets its raw scale from `kept`, the other values' scales.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mark_block<E: Element, K: ExactKernels + ?Sized>(
    kernel: &K,
    block: &[E],
    (b, bs): (usize, usize),
    norm: Normalization,
    kept: Kept,
    mask: &[u64; MASK_WORDS],
    scales: &mut [f32],
    found: &mut Found,
) {
    let start = b * bs;
    let words = &mask[..block.len().div_ceil(64)];
    if found.direct {
        take_bits(
            block,
            words,
            (found.task_start + start) as u64,
            &mut found.outliers,
        );
    } else {
        for (w, &word) in words.iter().enumerate() {
            if word != 0 {
                // Task-relative: a task holds far fewer than 2^32 values.
                found.marks.push(((start + w * 64) as u32, word));
            }
        }
    }
    scales[b] = match norm {
        Normalization::Absmax => kept.max,
        Normalization::SignedAbsmax => kept
            .signed
            .unwrap_or_else(|| kernel.signed_masked(block, mask, kept.max)),
    };
}

/// The f32 thresholds `(t_lo, t_hi)` ([`f32_bracket`]) that decide the outliers of a block
/// the filter did not clear, from its largest magnitude and the kernel's [`FilterKernels::f32_sums`];
/// `None` when they cannot (no sums, no positive lower bound, or the largest magnitude between
/// them): then the exact f64 sums decide.
#[inline(always)]
fn f32_thresholds(
    threshold: &Threshold,
    bound: &FilterBound,
    filter_sums: Option<(f32, f32)>,
    max_abs: f32,
) -> Option<(f32, f32)> {
    let (s, q) = filter_sums?;
    let (lo, hi) = threshold.bracket(s, q, bound)?;
    f32_bracket(lo, hi).filter(|&(_, t_hi)| max_abs > t_hi)
}

/// The OPQ outliers of a finite block by the exact rule (f64 sums): `None` when it has none;
/// else marks them in `mask` (exactly as [`scan`](super::scan) at the block's exact limit) and returns the
/// other values' largest magnitude (0 when all are outliers).
#[inline(always)]
fn exact_outliers<E: Element, K: ExactKernels + ?Sized>(
    kernel: &K,
    block: &[E],
    threshold: &Threshold,
    mask: &mut [u64; MASK_WORDS],
) -> Option<Kept> {
    let max = E::abs_bits_to_f32(kernel.max_abs_bits(block)) as f64;
    let limit2 = threshold.limit2(kernel.sums(block));
    if !(limit2 > 0.0 && max * max > limit2) {
        return None;
    }
    let t32 = f32_limit(limit2);
    kernel.scan(block, limit2, t32, mask);
    Some(Kept::magnitude(kernel.raw_scale(
        block,
        limit2,
        t32,
        Normalization::Absmax,
    )))
}
