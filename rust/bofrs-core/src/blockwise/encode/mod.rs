//! Encoding: per-block scales, nearest-level codes, two codes per byte.
//!
//! For each block with stored scale `S` (see [`crate::blockwise::scale`]), each value `x` becomes
//! `y = x / S` (f32 division; `y = 0` when `S == 0`) and then the code `#{k : y > t_k}` against
//! the codebook's midpoint thresholds. Codes `2j` and `2j+1` share byte `j` (high, low nibble).
//!
//! With OPQ ([`crate::blockwise::opq`]) a block's outliers are found first, the scale is taken without
//! them and their codes are set to the code of 0; with double quantization ([`crate::blockwise::dq`]) the
//! raw scales of a group of 256 blocks are quantized before any code is chosen, so the codes are
//! chosen against the decoded scales.

use crate::blockwise::codebook::{Codebook, Normalization};
use crate::blockwise::dq::{quantize_group, GROUP};
use crate::blockwise::layout::BlockLayout;
use crate::blockwise::opq::{
    block_sums, collect_word, f32_bracket, f32_limit, raw_scale_within, scan, signed_scale_masked,
    FilterBound, OpqOptions, Outlier, OutlierDType, Threshold, MASK_WORDS,
};
use crate::blockwise::scale::{max_abs_bits, raw_block_scale_from_max, ScaleDType};
use crate::error::{Error, Result};
use crate::isa::{dispatch, Isa};
use crate::numeric::element::Bf16;
use crate::numeric::element::Element;
use crate::runtime::pool::{blocks_per_task, pool};
use crate::runtime::recycle::{self, OutlierParts};
use rayon::prelude::*;
use std::any::TypeId;

/// What to encode with.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions<'a> {
    pub codebook: &'a Codebook,
    pub block_size: usize,
    pub normalization: Normalization,
    pub scale_dtype: ScaleDType,
}

/// Values encoded per inner step (16 code bytes).
const STEP: usize = 32;

/// Options beyond the basic format: OPQ outliers and double-quantized scales.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PackExtras {
    /// Outlier-preserving quantization (see [`crate::blockwise::opq`]); `None` disables it.
    pub opq: Option<OpqOptions>,
    /// Double-quantized ("dq8") scales (see [`crate::blockwise::dq`]); `options.scale_dtype` is then unused.
    pub double_quant: bool,
}

/// Output buffers of [`pack_ext_with_isa`].
pub struct PackBuffers<'a> {
    /// `numel.div_ceil(2)` bytes of codes.
    pub codes: &'a mut [u8],
    /// One decoded scale per block (the value the decoder uses).
    pub scales: &'a mut [f32],
    /// Double quantization only (else empty): one stored byte per block.
    pub scale_codes: &'a mut [u8],
    /// Double quantization only (else empty): `[lo, step]` per group of [`GROUP`] blocks.
    pub scale_params: &'a mut [f32],
}

/// Packs `input` into `codes` (`numel.div_ceil(2)` bytes) and `scales` (one per block, already
/// rounded to the storage type), on the pool, with the best instruction set of this CPU.
pub fn pack<E: Element>(
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    pack_with_isa(Isa::best(), input, options, codes, scales)
}

/// [`pack`] with an explicit kernel variant (for tests and benches).
pub fn pack_with_isa<E: Element>(
    isa: Isa,
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    let buffers = PackBuffers {
        codes,
        scales,
        scale_codes: &mut [],
        scale_params: &mut [],
    };
    pack_ext_with_isa(isa, input, options, &PackExtras::default(), buffers).map(|_| ())
}

/// [`pack_with_isa`] with OPQ and / or double-quantized scales. Returns the outliers (flat
/// index ascending, stored 16-bit value); empty without OPQ. Errors name the first bad block in
/// flat order.
pub fn pack_ext_with_isa<E: Element>(
    isa: Isa,
    input: &[E],
    options: &EncodeOptions<'_>,
    extras: &PackExtras,
    out: PackBuffers<'_>,
) -> Result<Vec<Outlier>> {
    let parts = pack_ext_parts_with_isa(isa, input, options, extras, out)?;
    let mut outliers = Vec::with_capacity(parts.total());
    for part in parts.iter() {
        outliers.extend_from_slice(part);
    }
    Ok(outliers)
}

/// [`pack_ext_with_isa`] with the outliers as the parallel tasks found them: consecutive
/// parts, in flat order, whose concatenation is [`pack_ext_with_isa`]'s result (see
/// [`split_outliers`] to lay them out without a serial join). Their vectors are reused by the
/// next pack once the parts are dropped.
pub fn pack_ext_parts_with_isa<E: Element>(
    isa: Isa,
    input: &[E],
    options: &EncodeOptions<'_>,
    extras: &PackExtras,
    out: PackBuffers<'_>,
) -> Result<OutlierParts> {
    isa.ensure_supported()?;
    let bs = options.block_size;
    let layout = BlockLayout::new(input.len(), bs)?;
    layout.check_buffers(out.codes.len(), out.scales.len())?;
    if extras.opq.is_some() && input.len() as u64 >= Outlier::INDEX_LIMIT {
        return Err(Error::InvalidArgument {
            name: "opq",
            message: format!("OPQ takes fewer than 2^48 values, got {}", input.len()),
        });
    }
    let blocks = layout.num_blocks();
    let dq = extras.double_quant;
    let (want_codes, want_params) = if dq {
        (blocks, 2 * blocks.div_ceil(GROUP))
    } else {
        (0, 0)
    };
    for (what, expected, actual) in [
        ("scale_codes", want_codes, out.scale_codes.len()),
        ("scale_scales", want_params, out.scale_params.len()),
    ] {
        if expected != actual {
            return Err(Error::LengthMismatch {
                what,
                expected,
                actual,
            });
        }
    }
    let mut bpt = blocks_per_task(bs);
    if dq {
        // A task holds whole scale groups.
        bpt = bpt.next_multiple_of(GROUP);
    }
    let task_values = bpt * bs;
    let tail = input.len() % bs;
    let context = TaskContext {
        options,
        opq: extras.opq.map(|o| OpqContext {
            options: o,
            full: (Threshold::new(bs, o.q), FilterBound::new(bs)),
            tail: (
                Threshold::new(tail.max(1), o.q),
                FilterBound::new(tail.max(1)),
            ),
        }),
        double_quant: dq,
        signed: options.normalization == Normalization::SignedAbsmax,
    };
    let tasks = blocks.div_ceil(bpt);
    let mut scale_codes: Vec<&mut [u8]> = if dq {
        out.scale_codes.chunks_mut(bpt).collect()
    } else {
        (0..tasks).map(|_| Default::default()).collect()
    };
    let mut scale_params: Vec<&mut [f32]> = if dq {
        out.scale_params.chunks_mut(2 * bpt / GROUP).collect()
    } else {
        (0..tasks).map(|_| Default::default()).collect()
    };
    pool()
        .install(|| {
            input
                .par_chunks(task_values)
                .zip(out.codes.par_chunks_mut(task_values / 2))
                .zip(out.scales.par_chunks_mut(bpt))
                .zip(scale_codes.par_iter_mut())
                .zip(scale_params.par_iter_mut())
                .enumerate()
                .map(
                    |(task, ((((x, codes), scales), scale_codes), scale_params))| {
                        let out = TaskOut {
                            codes,
                            scales,
                            scale_codes,
                            scale_params,
                        };
                        // SAFETY: `isa` was checked to be supported by this CPU above.
                        unsafe { pack_task(isa, x, &context, out, task * bpt) }
                    },
                )
                // Tasks are in flat order and each stops at its first bad block.
                .collect::<Vec<Result<Vec<Outlier>>>>()
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .map(OutlierParts::new)
}

/// Lays out outlier parts (as [`pack_ext_parts_with_isa`] returns them) as two arrays, in
/// parallel on the pool: `indices[k] = index(i_k)` and `values[k] = v_k` for the `k`-th outlier
/// `(i_k, v_k)` of the concatenation. `index` narrows a flat index to the index type.
///
/// # Panics
/// When `indices` or `values` does not have one slot per outlier.
pub fn split_outliers<I: Send>(
    parts: &[Vec<Outlier>],
    index: impl Fn(u64) -> I + Sync,
    indices: &mut [I],
    values: &mut [u16],
) {
    let total: usize = parts.iter().map(Vec::len).sum();
    assert!(
        indices.len() == total && values.len() == total,
        "one slot per outlier"
    );
    let mut slots = Vec::with_capacity(parts.len());
    let (mut rest_i, mut rest_v) = (indices, values);
    for part in parts {
        let (i, ri) = rest_i.split_at_mut(part.len());
        let (v, rv) = rest_v.split_at_mut(part.len());
        slots.push((part, i, v));
        (rest_i, rest_v) = (ri, rv);
    }
    pool().install(|| {
        slots.into_par_iter().for_each(|(part, i, v)| {
            for ((outlier, i), v) in part.iter().zip(i).zip(v) {
                *i = index(outlier.index());
                *v = outlier.value();
            }
        })
    });
}

/// What every task needs to know.
struct TaskContext<'a> {
    options: &'a EncodeOptions<'a>,
    /// OPQ settings with the thresholds of full blocks and of the partial last block.
    opq: Option<OpqContext>,
    double_quant: bool,
    signed: bool,
}

/// OPQ settings and the per-length constants.
struct OpqContext {
    options: OpqOptions,
    full: (Threshold, FilterBound),
    tail: (Threshold, FilterBound),
}

impl OpqContext {
    /// The constants for a block of `len` values (block size `bs`, or the partial last block).
    #[inline(always)]
    fn for_length(&self, len: usize, bs: usize) -> &(Threshold, FilterBound) {
        if len == bs {
            &self.full
        } else {
            &self.tail
        }
    }
}

/// The slices of the outputs one task writes.
struct TaskOut<'a> {
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    scale_codes: &'a mut [u8],
    scale_params: &'a mut [f32],
}

/// The per-ISA pieces of the encoder.
trait Kernel {
    /// Largest `abs_bits` of a block.
    fn max_abs_bits<T: Element>(&self, block: &[T]) -> u32;
    /// Codes of one block against its (decoded) scale.
    fn encode<T: Element>(&self, block: &[T], scale: f32, out: &mut [u8]);
    /// The block's shifted sums, exactly as [`block_sums`] computes them.
    fn sums<T: Element>(&self, block: &[T]) -> (f64, f64);
    /// Cheap f32 shifted sums for [`Threshold::provably_clean`], or `None` (no filter).
    fn f32_sums<T: Element>(&self, block: &[T]) -> Option<(f32, f32)>;
    /// The outlier mask of a block, exactly as [`scan`] computes it (`t32` = [`f32_limit`]).
    fn scan<T: Element>(&self, block: &[T], limit2: f64, t32: f32, mask: &mut [u64; MASK_WORDS]);
    /// The raw scale without outliers, exactly as [`raw_scale_within`] computes it.
    fn raw_scale<T: Element>(&self, block: &[T], limit2: f64, t32: f32, norm: Normalization)
        -> f32;
    /// For f32 thresholds from [`f32_bracket`]: when no value has `t_lo < |x| <= t_hi`, the
    /// mask of `|x| > t_hi` (then exactly [`scan`]'s) and the kept values' raw scales
    /// ([`Kept`]: the signed one only where cheap and `norm` is signed absmax); `None`
    /// otherwise or where unsupported.
    fn split<T: Element>(
        &self,
        block: &[T],
        thresholds: (f32, f32),
        norm: Normalization,
        mask: &mut [u64; MASK_WORDS],
    ) -> Option<Kept>;
    /// [`signed_scale_masked`].
    fn signed_masked<T: Element>(&self, block: &[T], mask: &[u64; MASK_WORDS], max: f32) -> f32;
    /// The raw scale of a finite block from its largest `abs_bits`, exactly as
    /// [`raw_block_scale_from_max`] gives it.
    fn raw_scale_from_max<T: Element>(
        &self,
        block: &[T],
        max_bits: u32,
        norm: Normalization,
    ) -> f32;
    /// The suspects `bits` of a group of [`GROUP_BLOCKS`] bfloat16 blocks of 64 values
    /// (`plan`: their verdicts) whose outliers are taken as their own bits, in order: each
    /// decided one split at its f32 thresholds ([`Kernel::split`]), its outliers appended to
    /// `outliers` (flat indices from `first_index`) and its raw scale set in `scales` (one per
    /// block of the group), up to the first that needs more (undecided, a value between the
    /// thresholds, or a tie of signs). Returns the suspects left, that one first; `None` where
    /// unsupported (other types or block sizes; the default).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn take_decided<T: Element>(
        &self,
        _group: &[T],
        _block: (usize, Normalization),
        _plan: &GroupPlan,
        _bits: u32,
        _first_index: u64,
        _scales: &mut [f32],
        _outliers: &mut Vec<Outlier>,
    ) -> Option<u32> {
        None
    }
    /// Into `plan`: the largest `abs_bits` of each of [`GROUP_BLOCKS`] full blocks of `bs`
    /// values (`group`), their signed-absmax raw scales where one sign has that magnitude (for
    /// a signed `norm`) and, when all are finite, the OPQ filter's verdict on them, in one pass
    /// over the values; `false` where unsupported (then one block at a time).
    fn group_filter<T: Element>(
        &self,
        group: &[T],
        block: (usize, Normalization),
        opq: (&Threshold, &FilterBound),
        plan: &mut GroupPlan,
    ) -> bool;
}

/// The raw scales of a block's values without its outliers.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// The largest magnitude (the absmax raw scale; 0 when every value is an outlier).
    max: f32,
    /// The signed-absmax raw scale when the kernel knows it (`None`: [`Kernel::signed_masked`]
    /// finds it).
    signed: Option<f32>,
}

impl Kept {
    /// Only the largest magnitude.
    fn magnitude(max: f32) -> Self {
        Self { max, signed: None }
    }
}

/// The portable kernels: the definition of the results.
struct Portable<'a> {
    codebook: &'a Codebook,
}

impl Kernel for Portable<'_> {
    #[inline(always)]
    fn max_abs_bits<T: Element>(&self, block: &[T]) -> u32 {
        max_abs_bits(block)
    }
    #[inline(always)]
    fn encode<T: Element>(&self, block: &[T], scale: f32, out: &mut [u8]) {
        encode_block(block, scale, self.codebook, out)
    }
    #[inline(always)]
    fn sums<T: Element>(&self, block: &[T]) -> (f64, f64) {
        block_sums(block)
    }
    #[inline(always)]
    fn f32_sums<T: Element>(&self, _block: &[T]) -> Option<(f32, f32)> {
        None
    }
    #[inline(always)]
    fn scan<T: Element>(&self, block: &[T], limit2: f64, _t32: f32, mask: &mut [u64; MASK_WORDS]) {
        scan(block, limit2, mask)
    }
    #[inline(always)]
    fn raw_scale<T: Element>(
        &self,
        block: &[T],
        limit2: f64,
        _t32: f32,
        norm: Normalization,
    ) -> f32 {
        raw_scale_within(block, limit2, norm)
    }
    #[inline(always)]
    fn split<T: Element>(
        &self,
        _block: &[T],
        _thresholds: (f32, f32),
        _norm: Normalization,
        _mask: &mut [u64; MASK_WORDS],
    ) -> Option<Kept> {
        None
    }
    #[inline(always)]
    fn signed_masked<T: Element>(&self, block: &[T], mask: &[u64; MASK_WORDS], max: f32) -> f32 {
        signed_scale_masked(block, mask, max)
    }
    #[inline(always)]
    fn raw_scale_from_max<T: Element>(
        &self,
        block: &[T],
        max_bits: u32,
        norm: Normalization,
    ) -> f32 {
        // Cannot fail for a finite maximum.
        raw_block_scale_from_max(block, max_bits, norm).unwrap_or(0.0)
    }
    #[inline(always)]
    fn group_filter<T: Element>(
        &self,
        _group: &[T],
        _block: (usize, Normalization),
        _opq: (&Threshold, &FilterBound),
        _plan: &mut GroupPlan,
    ) -> bool {
        false
    }
}

/// Dispatches one task to the kernel variant.
///
/// # Safety
/// `isa` must be supported by the running CPU.
unsafe fn pack_task<E: Element>(
    isa: Isa,
    input: &[E],
    context: &TaskContext<'_>,
    out: TaskOut<'_>,
    first_block: usize,
) -> Result<Vec<Outlier>> {
    dispatch!(isa,
        avx2 => x86::pack_task_avx2(input, context, out, first_block),
        portable => {
            let kernel = Portable {
                codebook: context.options.codebook,
            };
            run_task(&kernel, input, context, out, first_block)
        },
    )
}

/// One task: the raw scale of every block (after removing its outliers), the scales' storage
/// rounding or double quantization, then the codes against the decoded scales.
///
/// In passes, so that the common case runs without unpredictable branches: every block's
/// maximum, raw scale and (with OPQ) the cheap outlier filter; then only the blocks the filter
/// could not clear (their outlier masks, raw scale without them; bfloat16 outliers of a
/// bfloat16 tensor, which cannot fail, are taken right there); then the other outliers' stored
/// values; then the scales' storage; then every block's codes; then the outliers' codes set to
/// the code of 0. Errors are those of the first bad block in flat order (within a block:
/// non-finite value, outlier, scale).
#[inline(always)]
fn run_task<E: Element, K: Kernel>(
    kernel: &K,
    input: &[E],
    context: &TaskContext<'_>,
    out: TaskOut<'_>,
    first_block: usize,
) -> Result<Vec<Outlier>> {
    let options = context.options;
    let bs = options.block_size;
    let norm = options.normalization;
    let blocks = out.scales.len();
    let mut outliers: Vec<Outlier> = if context.opq.is_some() {
        recycle::take()
    } else {
        Vec::new()
    };
    // Outlier masks of the task, in flat order (OPQ only).
    let mut marks = if context.opq.is_some() {
        MARKS.take()
    } else {
        Vec::new()
    };
    marks.clear();
    // bfloat16 outliers of a bfloat16 tensor: their bits, taken when the codes are patched.
    let same_bits = TypeId::of::<E>() == TypeId::of::<Bf16>()
        && context
            .opq
            .as_ref()
            .is_some_and(|o| o.options.dtype == OutlierDType::BFloat16);
    // Blocks before the first one with a non-finite value, and the first block whose outliers
    // cannot be stored, with the error.
    let (finite_blocks, outlier_error) = match &context.opq {
        None => {
            let mut finite_blocks = blocks;
            for (b, (block, scale)) in input.chunks(bs).zip(out.scales.iter_mut()).enumerate() {
                let max_bits = kernel.max_abs_bits(block);
                if max_bits >= E::NON_FINITE_ABS_BITS {
                    finite_blocks = b;
                    break;
                }
                // Cannot fail for a finite maximum.
                *scale = kernel.raw_scale_from_max(block, max_bits, norm);
            }
            (finite_blocks, None)
        }
        Some(opq) => {
            if !same_bits {
                marks.reserve(blocks * bs.div_ceil(64));
            }
            let mut found = Found {
                marks,
                outliers,
                direct: same_bits,
                task_start: first_block * bs,
            };
            let finite_blocks = opq_pass(kernel, input, opq, bs, norm, out.scales, &mut found);
            (marks, outliers) = (found.marks, found.outliers);
            // The marked values in flat order, up to the first that cannot be stored (bfloat16
            // stored as bfloat16 cannot fail: those were taken where found).
            let mut outlier_error = None;
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
                    outlier_error = Some((start / bs, err));
                    break;
                }
            }
            (finite_blocks, outlier_error)
        }
    };
    let stored_blocks = outlier_error.as_ref().map_or(finite_blocks, |e| e.0);
    if !context.double_quant {
        for (b, scale) in out.scales[..stored_blocks].iter_mut().enumerate() {
            let raw = *scale;
            *scale = options
                .scale_dtype
                .store(raw, E::MAX_FINITE)
                .ok_or(Error::ScaleOverflow {
                    block: first_block + b,
                    value: raw,
                    dtype: options.scale_dtype.name(),
                })?;
        }
    }
    if let Some((_, err)) = outlier_error {
        return Err(err);
    }
    if finite_blocks < blocks {
        let block = input.chunks(bs).nth(finite_blocks).unwrap_or_default();
        let bad = block
            .iter()
            .position(|v| v.abs_bits() >= E::NON_FINITE_ABS_BITS);
        return Err(Error::NonFinite {
            index: (first_block + finite_blocks) * bs + bad.unwrap_or(0),
        });
    }
    if context.double_quant {
        for ((scales, codes), params) in out
            .scales
            .chunks_mut(GROUP)
            .zip(out.scale_codes.chunks_mut(GROUP))
            .zip(out.scale_params.chunks_mut(2))
        {
            params.copy_from_slice(&quantize_group(
                scales,
                context.signed,
                E::MAX_FINITE,
                codes,
            ));
        }
    }
    for ((block, codes), &scale) in input
        .chunks(bs)
        .zip(out.codes.chunks_mut(bs / 2))
        .zip(out.scales.iter())
    {
        kernel.encode(block, scale, codes);
    }
    // Outliers are coded as the value 0 (codes depend only on the value and the scale).
    let zero = options.codebook.encode_one(0.0);
    code_outliers_as(zero, &outliers, (first_block * bs) as u64, out.codes);
    if context.opq.is_some() {
        MARKS.set(marks);
    }
    Ok(outliers)
}

/// Sets the code of every outlier (flat indices from `task_start`, within `codes`) to `zero`.
/// Not inlined: a short loop of its own, outside the task's register pressure.
#[inline(never)]
fn code_outliers_as(zero: u8, outliers: &[Outlier], task_start: u64, codes: &mut [u8]) {
    // High nibble for even `i`, low for odd, without a data-dependent branch: the nibble kept
    // and the one put in, by parity.
    let keep = [0x0f_u8, 0xf0];
    let put = [zero << 4, zero & 0x0f];
    for outlier in outliers {
        let i = (outlier.index() - task_start) as usize;
        let byte = &mut codes[i / 2];
        *byte = (*byte & keep[i & 1]) | put[i & 1];
    }
}

/// Blocks of one [`Kernel::group_filter`] call.
pub(crate) const GROUP_BLOCKS: usize = 8;

/// The OPQ filter's verdict on [`GROUP_BLOCKS`] consecutive full blocks (bit `j` of a mask is
/// block `j`); the masks and thresholds are meaningful only when every block is finite.
#[derive(Debug, Clone, Copy, Default)]
struct GroupPlan {
    /// Largest `abs_bits` of each block.
    max_bits: [u32; GROUP_BLOCKS],
    /// The same magnitudes as f32 (each block's absmax raw scale).
    max_abs: [f32; GROUP_BLOCKS],
    /// With signs (a signed-absmax filter): the same magnitudes with the sign of the block's
    /// values of that magnitude (each block's signed-absmax raw scale), except for blocks in
    /// `sign_ties`.
    signed: [f32; GROUP_BLOCKS],
    /// Blocks with both signs at the largest magnitude (their first such value decides).
    sign_ties: u32,
    /// Whether every block is finite (every `max_bits` below the type's non-finite bits).
    finite: bool,
    /// Blocks the filter did not clear ([`Threshold::provably_clean`] failed).
    suspects: u32,
    /// Suspects with f32 thresholds from [`f32_bracket`] whose largest magnitude is above
    /// `t_hi` (as [`f32_thresholds`] decides).
    decided: u32,
    t_lo: [f32; GROUP_BLOCKS],
    t_hi: [f32; GROUP_BLOCKS],
}

/// The first pass of a task with OPQ, in flat block order: every block's raw scale (without its
/// outliers) and, for the blocks the filter does not clear, their outliers recorded in `found`
/// (as [`suspect_block`] does). Stops at the first block with a non-finite value;
/// returns the number of blocks before it (all when none).
///
/// Groups of [`GROUP_BLOCKS`] full blocks go through [`Kernel::group_filter`] where the kernel
/// has it (one vectorized filter for the group, then only the suspects, while the group is in
/// cache); the other blocks one at a time. Either way the filter only decides which blocks the
/// exact rule is applied to, so the results are those of the portable code.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn opq_pass<E: Element, K: Kernel>(
    kernel: &K,
    input: &[E],
    opq: &OpqContext,
    bs: usize,
    norm: Normalization,
    scales: &mut [f32],
    found: &mut Found,
) -> usize {
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
                            suspect_block(
                                kernel, input, opq, bs, norm, at, &mut mask, scales, found,
                            )
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
            let thresholds = f32_thresholds(threshold, bound, sums, max_abs);
            suspect_block(
                kernel,
                input,
                opq,
                bs,
                norm,
                (b, thresholds),
                &mut mask,
                scales,
                found,
            );
        }
        b += 1;
    }
    blocks
}

/// Where the OPQ pass records the outliers it finds.
struct Found {
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

/// The outliers of suspect block `b` (`plan`: its thresholds, as [`f32_thresholds`] gives
/// them): the nonzero words of their mask appended to `marks` (collected after the pass, in a
/// loop of its own), and its raw scale without them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn suspect_block<E: Element, K: Kernel>(
    kernel: &K,
    input: &[E],
    opq: &OpqContext,
    bs: usize,
    norm: Normalization,
    (b, plan): (usize, Option<(f32, f32)>),
    mask: &mut [u64; MASK_WORDS],
    scales: &mut [f32],
    found: &mut Found,
) {
    let start = b * bs;
    let block = &input[start..input.len().min(start + bs)];
    let (threshold, _) = opq.for_length(block.len(), bs);
    let Some(kept) = outliers_of_block(kernel, block, (plan, norm), threshold, mask) else {
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
fn mark_block<E: Element, K: Kernel>(
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
/// the filter did not clear, from its largest magnitude and the kernel's [`Kernel::f32_sums`];
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

/// Finds the OPQ outliers of a finite block: `None` when it has none; else marks them in
/// `mask` (exactly as [`scan`] at the block's exact limit) and returns the other values' scales
/// (largest magnitude 0 when all are outliers).
///
/// With thresholds from [`f32_thresholds`] one pass marks the values above `t_hi`, unless a
/// value falls between the two; only then, and without thresholds, the exact f64 sums decide.
#[inline(always)]
fn outliers_of_block<E: Element, K: Kernel>(
    kernel: &K,
    block: &[E],
    (thresholds, norm): (Option<(f32, f32)>, Normalization),
    threshold: &Threshold,
    mask: &mut [u64; MASK_WORDS],
) -> Option<Kept> {
    if let Some(thresholds) = thresholds {
        if let Some(kept) = kernel.split(block, thresholds, norm, mask) {
            return Some(kept);
        }
    }
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

/// Fills the codes of a block whose stored scale is 0: every value encodes as 0.
#[inline(always)]
fn encode_zero_block(len: usize, codebook: &Codebook, out: &mut [u8]) {
    let zero = codebook.encode_one(0.0);
    out.fill((zero << 4) | zero);
    if len % 2 == 1 {
        if let Some(last) = out.last_mut() {
            *last = zero << 4;
        }
    }
}

/// Encodes one block against its stored scale into `out` (`block.len().div_ceil(2)` bytes).
#[inline(always)]
fn encode_block<E: Element>(block: &[E], scale: f32, codebook: &Codebook, out: &mut [u8]) {
    if scale == 0.0 {
        return encode_zero_block(block.len(), codebook, out);
    }
    let thresholds = codebook.thresholds();
    let mut values = block.chunks_exact(STEP);
    let mut bytes = out.chunks_exact_mut(STEP / 2);
    for (x, o) in (&mut values).zip(&mut bytes) {
        let mut y = [0f32; STEP];
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = xi.to_f32() / scale;
        }
        let mut q = [0u32; STEP];
        for &t in thresholds {
            for (qi, &yi) in q.iter_mut().zip(&y) {
                *qi += (yi > t) as u32;
            }
        }
        for (byte, pair) in o.iter_mut().zip(q.chunks_exact(2)) {
            *byte = ((pair[0] << 4) | pair[1]) as u8;
        }
    }
    // Index the tail (not `into_remainder`, which is empty when the loop never ran).
    let done = block.len() / STEP * STEP;
    encode_tail(values.remainder(), scale, codebook, &mut out[done / 2..]);
}

/// Scalar encoding of the values after the last full step (any count, possibly odd).
#[inline(always)]
fn encode_tail<E: Element>(values: &[E], scale: f32, codebook: &Codebook, out: &mut [u8]) {
    for (byte, pair) in out.iter_mut().zip(values.chunks(2)) {
        let hi = codebook.encode_one(pair[0].to_f32() / scale);
        let lo = pair
            .get(1)
            .map_or(0, |v| codebook.encode_one(v.to_f32() / scale));
        *byte = (hi << 4) | lo;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        encode_tail, encode_zero_block, run_task, GroupPlan, Kept, Kernel, TaskContext, TaskOut,
        GROUP_BLOCKS, MASK_WORDS, STEP,
    };
    use crate::blockwise::codebook::{Codebook, Normalization};
    use crate::blockwise::opq::Outlier;
    use crate::blockwise::opq::{FilterBound, Threshold, NARROW, WIDEN};
    use crate::error::Result;
    use crate::numeric::element::{Bf16, Element, F16};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// Loads 8 values as f32 (exact widening).
    #[inline(always)]
    unsafe fn load8<E: Element>(p: *const E) -> __m256 {
        let kind = TypeId::of::<E>();
        if kind == TypeId::of::<f32>() {
            _mm256_loadu_ps(p as *const f32)
        } else if kind == TypeId::of::<Bf16>() {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else if kind == TypeId::of::<F16>() {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            let mut tmp = [0f32; 8];
            for (i, t) in tmp.iter_mut().enumerate() {
                *t = (*p.add(i)).to_f32();
            }
            _mm256_loadu_ps(tmp.as_ptr())
        }
    }

    /// Largest `abs_bits` of a block: 16-bit types 16 at a time, f32 8 at a time.
    #[inline(always)]
    unsafe fn max_abs_bits_avx2<E: Element>(block: &[E]) -> u32 {
        let kind = TypeId::of::<E>();
        let half = kind == TypeId::of::<Bf16>() || kind == TypeId::of::<F16>();
        if !(half || kind == TypeId::of::<f32>()) {
            return crate::blockwise::scale::max_abs_bits(block);
        }
        let lanes = if half { 16 } else { 8 };
        let full = block.len() / lanes;
        let p = block.as_ptr() as *const __m256i;
        let mut acc = _mm256_setzero_si256();
        if half {
            let mask = _mm256_set1_epi16(0x7fff);
            for i in 0..full {
                acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256(p.add(i)), mask));
            }
            // Widen the 16 u16 maxima to 32-bit lanes (zero-extended), then reduce as u32.
            let lo = _mm256_unpacklo_epi16(acc, _mm256_setzero_si256());
            let hi = _mm256_unpackhi_epi16(acc, _mm256_setzero_si256());
            acc = _mm256_max_epu32(lo, hi);
        } else {
            let mask = _mm256_set1_epi32(0x7fff_ffff);
            for i in 0..full {
                acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_loadu_si256(p.add(i)), mask));
            }
        }
        let quad = _mm_max_epu32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256::<1>(acc),
        );
        let pair = _mm_max_epu32(quad, _mm_shuffle_epi32::<0b01_00_11_10>(quad));
        let one = _mm_max_epu32(pair, _mm_shuffle_epi32::<0b10_11_00_01>(pair));
        let vector_max = _mm_cvtsi128_si32(one) as u32;
        vector_max.max(crate::blockwise::scale::max_abs_bits(
            &block[full * lanes..],
        ))
    }

    /// The 15 thresholds arranged for a 4-step branch-free binary search: code bits are decided
    /// from the most significant down, each step comparing against the threshold that splits the
    /// remaining range. `#{k : y > t_k}` is the partition point of a monotone predicate, so the
    /// search gives exactly the count the portable kernel computes.
    struct SearchTables {
        mid: __m256,    // t7
        q_lo: __m256,   // t3
        q_hi: __m256,   // t11
        eighth: __m256, // [t1, t5, t9, t13] by bits 3..2
        last: __m256,   // [t0, t2, ..., t14] by bits 3..1
    }

    #[inline(always)]
    unsafe fn search_tables(codebook: &Codebook) -> SearchTables {
        let t = codebook.thresholds();
        SearchTables {
            mid: _mm256_set1_ps(t[7]),
            q_lo: _mm256_set1_ps(t[3]),
            q_hi: _mm256_set1_ps(t[11]),
            eighth: _mm256_setr_ps(t[1], t[5], t[9], t[13], 0.0, 0.0, 0.0, 0.0),
            last: _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]),
        }
    }

    /// All-ones where `y > t`, else 0, per 32-bit lane.
    #[inline(always)]
    unsafe fn above(y: __m256, t: __m256) -> __m256i {
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(y, t))
    }

    /// Appends a search bit to the code: `2 c + 1` where `mask` is set, else `2 c`.
    #[inline(always)]
    unsafe fn push_bit(code: __m256i, mask: __m256i) -> __m256i {
        _mm256_sub_epi32(_mm256_add_epi32(code, code), mask)
    }

    /// Codes of 8 normalized values, as 32-bit lanes (short dependency chain: masks feed the
    /// blend and the codes directly).
    #[inline(always)]
    unsafe fn search(y: __m256, tables: &SearchTables) -> __m256i {
        let m3 = above(y, tables.mid);
        let code = _mm256_sub_epi32(_mm256_setzero_si256(), m3); // bit 3
        let t2 = _mm256_blendv_ps(tables.q_lo, tables.q_hi, _mm256_castsi256_ps(m3));
        let code = push_bit(code, above(y, t2)); // bits 3..2
        let code = push_bit(
            code,
            above(y, _mm256_permutevar8x32_ps(tables.eighth, code)),
        );
        push_bit(code, above(y, _mm256_permutevar8x32_ps(tables.last, code)))
    }

    /// The AVX2 kernels. Only built inside [`pack_task_avx2`], so only where AVX2 runs.
    struct Avx2<'a> {
        codebook: &'a Codebook,
        tables: SearchTables,
    }

    impl Kernel for Avx2<'_> {
        #[inline(always)]
        fn max_abs_bits<T: Element>(&self, block: &[T]) -> u32 {
            // SAFETY: an `Avx2` exists only inside `pack_task_avx2` (AVX2 checked by caller).
            unsafe { max_abs_bits_avx2(block) }
        }
        #[inline(always)]
        fn encode<T: Element>(&self, block: &[T], scale: f32, out: &mut [u8]) {
            // SAFETY: as above.
            unsafe { encode_block_avx2(block, scale, self.codebook, &self.tables, out) }
        }
        #[inline(always)]
        fn sums<T: Element>(&self, block: &[T]) -> (f64, f64) {
            // SAFETY: as above.
            unsafe { sums_avx2(block) }
        }
        #[inline(always)]
        fn f32_sums<T: Element>(&self, block: &[T]) -> Option<(f32, f32)> {
            // SAFETY: as above.
            unsafe { f32_sums_avx2(block) }
        }
        #[inline(always)]
        fn scan<T: Element>(
            &self,
            block: &[T],
            limit2: f64,
            t32: f32,
            mask: &mut [u64; MASK_WORDS],
        ) {
            // SAFETY: as above.
            unsafe { scan_avx2(block, limit2, t32, mask) }
        }
        #[inline(always)]
        fn raw_scale<T: Element>(
            &self,
            block: &[T],
            limit2: f64,
            t32: f32,
            norm: Normalization,
        ) -> f32 {
            // SAFETY: as above.
            match unsafe { kept_max_avx2(block, t32) } {
                None => crate::blockwise::opq::raw_scale_within(block, limit2, norm),
                Some(max) if norm == Normalization::Absmax => max,
                Some(max) => crate::blockwise::opq::signed_scale_within(block, limit2, max),
            }
        }
        #[inline(always)]
        fn split<T: Element>(
            &self,
            block: &[T],
            (t_lo, t_hi): (f32, f32),
            norm: Normalization,
            mask: &mut [u64; MASK_WORDS],
        ) -> Option<Kept> {
            // SAFETY: as above.
            unsafe {
                match norm {
                    Normalization::Absmax => split_avx2::<T, false>(block, t_lo, t_hi, mask),
                    Normalization::SignedAbsmax => split_avx2::<T, true>(block, t_lo, t_hi, mask),
                }
            }
        }
        #[inline(always)]
        fn signed_masked<T: Element>(
            &self,
            block: &[T],
            mask: &[u64; MASK_WORDS],
            max: f32,
        ) -> f32 {
            // SAFETY: as above.
            unsafe { signed_masked_avx2(block, mask, max) }
        }
        #[inline(always)]
        fn raw_scale_from_max<T: Element>(
            &self,
            block: &[T],
            max_bits: u32,
            norm: Normalization,
        ) -> f32 {
            let fast = match norm {
                Normalization::Absmax => Some(T::abs_bits_to_f32(max_bits)),
                // SAFETY: as above.
                Normalization::SignedAbsmax => unsafe { signed_scale_avx2(block, max_bits) },
            };
            // Cannot fail for a finite maximum.
            fast.unwrap_or_else(|| {
                crate::blockwise::scale::raw_block_scale_from_max(block, max_bits, norm)
                    .unwrap_or(0.0)
            })
        }
        #[inline(always)]
        fn take_decided<T: Element>(
            &self,
            group: &[T],
            (bs, norm): (usize, Normalization),
            plan: &GroupPlan,
            bits: u32,
            first_index: u64,
            scales: &mut [f32],
            outliers: &mut Vec<Outlier>,
        ) -> Option<u32> {
            if TypeId::of::<T>() != TypeId::of::<Bf16>()
                || bs != 64
                || group.len() != GROUP_BLOCKS * 64
                || scales.len() != GROUP_BLOCKS
            {
                return None;
            }
            // SAFETY: as above; `T` is `Bf16` (checked), so the cast keeps the type.
            let group =
                unsafe { std::slice::from_raw_parts(group.as_ptr() as *const Bf16, group.len()) };
            // SAFETY: as above; the lengths were checked.
            Some(unsafe {
                match norm {
                    Normalization::Absmax => {
                        take_decided_bf16::<false>(group, plan, bits, first_index, scales, outliers)
                    }
                    Normalization::SignedAbsmax => {
                        take_decided_bf16::<true>(group, plan, bits, first_index, scales, outliers)
                    }
                }
            })
        }
        #[inline(always)]
        fn group_filter<T: Element>(
            &self,
            group: &[T],
            (bs, norm): (usize, Normalization),
            (threshold, bound): (&Threshold, &FilterBound),
            plan: &mut GroupPlan,
        ) -> bool {
            // SAFETY: as above.
            unsafe {
                match norm {
                    Normalization::Absmax => {
                        group_filter_avx2::<T, false>(group, bs, threshold, bound, plan)
                    }
                    Normalization::SignedAbsmax => {
                        group_filter_avx2::<T, true>(group, bs, threshold, bound, plan)
                    }
                }
            }
        }
    }

    /// Lanes of 4 vectors reduced by `op` across each vector, as the 4 lanes of one
    /// (`[op(v0), .., op(v3)]`), by a transposing tree (`op` associative and commutative).
    #[inline(always)]
    unsafe fn reduce4(v: [__m256; 4], op: impl Fn(__m256, __m256) -> __m256) -> __m128 {
        let pair = |a: __m256, b: __m256| op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let (a, b) = (
            _mm256_castps_pd(pair(v[0], v[1])),
            _mm256_castps_pd(pair(v[2], v[3])),
        );
        let quad = op(
            _mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)),
        );
        let halves = op(quad, _mm256_permute2f128_ps::<0x01>(quad, quad));
        _mm256_castps256_ps128(halves)
    }

    /// One block's maxima and its f32 shifted sums (as [`f32_sums_avx2`], in another order: any
    /// order is fine for the filter), in one pass of 16 values at a time (`block.len() % 16 ==
    /// 0`, a type [`known`] reads). The maxima are 32-bit lanes: without `SIGNS`, of the
    /// `abs_bits` (and zeros); with `SIGNS`, of the raw bits as unsigned (the largest is a
    /// negative value's, sign bit set, when the block has one) and as signed (sign-extended: the
    /// largest is a non-negative value's, when the block has one), which [`sign_split`] turns
    /// into magnitudes.
    #[inline(always)]
    unsafe fn block_stats<E: Element, const SIGNS: bool>(
        block: *const E,
        len: usize,
    ) -> (__m256i, __m256i, __m256, __m256) {
        let kind = TypeId::of::<E>();
        let vk = _mm256_set1_ps((*block).to_f32());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut q0, mut q1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let half = kind != TypeId::of::<f32>();
        // Start at the least unsigned (0) and signed (the sign bit alone) raw bits.
        let (mut hi_u, mut hi_s) = if half {
            (_mm256_setzero_si256(), _mm256_set1_epi16(i16::MIN))
        } else {
            (_mm256_setzero_si256(), _mm256_set1_epi32(i32::MIN))
        };
        for i in 0..len / 16 {
            let p = block.add(i * 16);
            let (v0, v1) = if half {
                let raw = _mm256_loadu_si256(p as *const __m256i);
                if SIGNS {
                    hi_u = _mm256_max_epu16(hi_u, raw);
                    hi_s = _mm256_max_epi16(hi_s, raw);
                } else {
                    let abs = _mm256_and_si256(raw, _mm256_set1_epi16(0x7fff));
                    hi_u = _mm256_max_epu16(hi_u, abs);
                }
                if kind == TypeId::of::<Bf16>() {
                    // Each 32-bit lane holds two bfloat16: shifted up, the first; masked, the
                    // second (exact f32 values, in another order than load8's).
                    (
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw)),
                        _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(-65536))),
                    )
                } else {
                    (
                        _mm256_cvtph_ps(_mm256_castsi256_si128(raw)),
                        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(raw)),
                    )
                }
            } else {
                let (v0, v1) = (
                    _mm256_loadu_ps(p as *const f32),
                    _mm256_loadu_ps(p.add(8) as *const f32),
                );
                let (r0, r1) = (_mm256_castps_si256(v0), _mm256_castps_si256(v1));
                if SIGNS {
                    hi_u = _mm256_max_epu32(hi_u, _mm256_max_epu32(r0, r1));
                    hi_s = _mm256_max_epi32(hi_s, _mm256_max_epi32(r0, r1));
                } else {
                    let abs = _mm256_set1_epi32(0x7fff_ffff);
                    let bits =
                        _mm256_max_epu32(_mm256_and_si256(r0, abs), _mm256_and_si256(r1, abs));
                    hi_u = _mm256_max_epu32(hi_u, bits);
                }
                (v0, v1)
            };
            let d0 = _mm256_sub_ps(v0, vk);
            let d1 = _mm256_sub_ps(v1, vk);
            s0 = _mm256_add_ps(s0, d0);
            s1 = _mm256_add_ps(s1, d1);
            q0 = _mm256_fmadd_ps(d0, d0, q0);
            q1 = _mm256_fmadd_ps(d1, d1, q1);
        }
        if half {
            // 16 u16 / i16 maxima to 8 zero- / sign-extended 32-bit lanes.
            let zero = _mm256_setzero_si256();
            hi_u = _mm256_max_epu32(
                _mm256_unpacklo_epi16(hi_u, zero),
                _mm256_unpackhi_epi16(hi_u, zero),
            );
            if SIGNS {
                hi_s = _mm256_max_epi32(
                    _mm256_srai_epi32::<16>(_mm256_unpacklo_epi16(zero, hi_s)),
                    _mm256_srai_epi32::<16>(_mm256_unpackhi_epi16(zero, hi_s)),
                );
            }
        }
        (hi_u, hi_s, _mm256_add_ps(s0, s1), _mm256_add_ps(q0, q1))
    }

    /// From the largest raw bits of four blocks (unsigned `hi_u`, signed `hi_s`, as
    /// [`block_stats`] leaves them, reduced per block): each block's largest `abs_bits`, and
    /// the masks of blocks whose values of that magnitude are all negative / all non-negative
    /// (neither: both signs have it, the first value decides).
    #[inline(always)]
    unsafe fn sign_split<E: Element>(hi_u: __m128i, hi_s: __m128i) -> (__m128i, __m128i, __m128i) {
        let sign_shift = if TypeId::of::<E>() == TypeId::of::<f32>() {
            31
        } else {
            15
        };
        let magnitude = _mm_set1_epi32(((1u32 << sign_shift) - 1) as i32);
        // Largest negative magnitude, or -1 without a negative value.
        let has_negative = _mm_sub_epi32(
            _mm_setzero_si128(),
            _mm_srl_epi32(hi_u, _mm_cvtsi32_si128(sign_shift)),
        );
        let negative = _mm_or_si128(
            _mm_and_si128(hi_u, magnitude),
            _mm_xor_si128(has_negative, _mm_set1_epi32(-1)),
        );
        // Largest non-negative magnitude, or negative without a non-negative value.
        let positive = hi_s;
        (
            _mm_max_epi32(negative, positive),
            _mm_cmpgt_epi32(negative, positive),
            _mm_cmpgt_epi32(positive, negative),
        )
    }

    /// Four `abs_bits` (u32 lanes) of a type [`known`] reads as f32 lanes (exact).
    #[inline(always)]
    unsafe fn abs_bits_to_f32_lanes4<E: Element>(bits: __m128i) -> __m128 {
        let kind = TypeId::of::<E>();
        if kind == TypeId::of::<Bf16>() {
            _mm_castsi128_ps(_mm_slli_epi32::<16>(bits))
        } else if kind == TypeId::of::<F16>() {
            // Lanes are below 2^16: pack to u16 in order, then convert.
            _mm_cvtph_ps(_mm_packus_epi32(bits, bits))
        } else {
            _mm_castsi128_ps(bits)
        }
    }

    /// Four blocks' statistics, as [`four_block_verdict`] takes them.
    type FourStats = (__m128i, __m128i, __m128i, __m256d, __m256d);

    /// The statistics of four consecutive blocks of `bs` values from `p`: their largest
    /// `abs_bits`, their sign masks ([`sign_split`]; with `SIGNS`, else 0), and their f32
    /// shifted sums and sums of squares as f64 lanes.
    #[inline(always)]
    unsafe fn four_block_stats<E: Element, const SIGNS: bool>(p: *const E, bs: usize) -> FourStats {
        let c = _mm256_castsi256_ps;
        let umax = |a: __m256, b: __m256| {
            c(_mm256_max_epu32(
                _mm256_castps_si256(a),
                _mm256_castps_si256(b),
            ))
        };
        let smax = |a: __m256, b: __m256| {
            c(_mm256_max_epi32(
                _mm256_castps_si256(a),
                _mm256_castps_si256(b),
            ))
        };
        let add = |a: __m256, b: __m256| _mm256_add_ps(a, b);
        let (u0, i0, s0, q0) = block_stats::<E, SIGNS>(p, bs);
        let (u1, i1, s1, q1) = block_stats::<E, SIGNS>(p.add(bs), bs);
        let (u2, i2, s2, q2) = block_stats::<E, SIGNS>(p.add(2 * bs), bs);
        let (u3, i3, s3, q3) = block_stats::<E, SIGNS>(p.add(3 * bs), bs);
        let hi_u = _mm_castps_si128(reduce4([c(u0), c(u1), c(u2), c(u3)], umax));
        let (max_bits, negative, positive) = if SIGNS {
            let hi_s = _mm_castps_si128(reduce4([c(i0), c(i1), c(i2), c(i3)], smax));
            sign_split::<E>(hi_u, hi_s)
        } else {
            (hi_u, _mm_setzero_si128(), _mm_setzero_si128())
        };
        let s = _mm256_cvtps_pd(reduce4([s0, s1, s2, s3], add));
        let ss = _mm256_cvtps_pd(reduce4([q0, q1, q2, q3], add));
        (max_bits, negative, positive, s, ss)
    }

    /// The filter's verdict on four blocks from their statistics ([`four_block_stats`]), in
    /// f64 exactly the scalar steps of [`Threshold::provably_clean`], [`Threshold::bracket`],
    /// [`crate::blockwise::opq::f32_bracket`] and `f32_thresholds` (the same operations in the same order,
    /// so the same verdicts): stores their maxima and f32 thresholds at `plan`'s lanes
    /// `at..at + 4` and returns the masks (bit `j`: block `at + j`) of finite blocks, suspects
    /// and decided suspects. Branch-free, so that the two halves of a group overlap.
    #[inline(always)]
    unsafe fn four_block_verdict<E: Element>(
        (max_bits, negative, positive, s, ss): FourStats,
        threshold: &Threshold,
        bound: &FilterBound,
        plan: &mut GroupPlan,
        at: usize,
    ) -> (u32, u32, u32, u32) {
        let pd = |x: f64| _mm256_set1_pd(x);
        let abs = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fff_ffff_ffff_ffff));
        let inf = pd(f64::INFINITY);
        _mm_storeu_si128(plan.max_bits.as_mut_ptr().add(at) as *mut __m128i, max_bits);
        let max32 = abs_bits_to_f32_lanes4::<E>(max_bits);
        _mm_storeu_ps(plan.max_abs.as_mut_ptr().add(at), max32);
        // The signed-absmax raw scales where one sign has the largest magnitude.
        let sign = _mm_and_si128(negative, _mm_set1_epi32(i32::MIN));
        _mm_storeu_ps(
            plan.signed.as_mut_ptr().add(at),
            _mm_or_ps(max32, _mm_castsi128_ps(sign)),
        );
        let decided_sign =
            _mm_movemask_ps(_mm_castsi128_ps(_mm_or_si128(negative, positive))) as u32;
        // Magnitude bits are below 2^31: a signed compare orders them.
        let non_finite = _mm_set1_epi32(E::NON_FINITE_ABS_BITS as i32);
        let finite_blocks =
            _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(non_finite, max_bits))) as u32;
        let max = _mm256_cvtps_pd(max32);
        // Finite sums (ordered compares: false for NaN).
        let finite = _mm256_and_pd(
            _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_and_pd(s, abs), inf),
            _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_and_pd(ss, abs), inf),
        );
        // Threshold::bracket.
        let a = _mm256_add_pd(_mm256_and_pd(s, abs), pd(bound.c_tiny));
        let m2_lo = _mm256_sub_pd(
            _mm256_sub_pd(
                _mm256_mul_pd(ss, pd(bound.c_ss)),
                _mm256_mul_pd(_mm256_mul_pd(a, a), pd(bound.c_a)),
            ),
            pd(bound.c_0),
        );
        let positive = _mm256_cmp_pd::<_CMP_GT_OQ>(m2_lo, _mm256_setzero_pd());
        let lo = _mm256_blendv_pd(
            pd(-1.0),
            _mm256_mul_pd(_mm256_mul_pd(m2_lo, pd(threshold.factor)), pd(1.0 - 1e-12)),
            positive,
        );
        let m2_hi = _mm256_sub_pd(
            _mm256_add_pd(_mm256_mul_pd(ss, pd(bound.h_ss)), pd(bound.h_0)),
            _mm256_mul_pd(_mm256_mul_pd(s, s), pd(bound.h_a)),
        );
        let hi = _mm256_mul_pd(
            _mm256_mul_pd(
                _mm256_max_pd(m2_hi, _mm256_setzero_pd()),
                pd(threshold.factor),
            ),
            pd(1.0 + 1e-12),
        );
        // Threshold::provably_clean.
        let clean = _mm256_and_pd(
            finite,
            _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_mul_pd(max, max), lo),
        );
        let suspects = !_mm256_movemask_pd(clean) as u32 & 0xf;
        // f32_bracket, and f32_thresholds' `max_abs > t_hi` (meaningful for suspects only).
        let lo32 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sqrt_pd(lo), pd(NARROW)));
        let hi32 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sqrt_pd(hi), pd(WIDEN)));
        let (lo64, hi64) = (_mm256_cvtps_pd(lo32), _mm256_cvtps_pd(hi32));
        let decided = _mm256_and_pd(
            _mm256_and_pd(finite, _mm256_cmp_pd::<_CMP_GT_OQ>(lo, _mm256_setzero_pd())),
            _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_mul_pd(lo64, lo64), lo),
                _mm256_cmp_pd::<_CMP_GE_OQ>(_mm256_mul_pd(hi64, hi64), hi),
            ),
        );
        let above = _mm256_cvtps_pd(_mm_cmpgt_ps(max32, hi32));
        let decided = _mm256_movemask_pd(_mm256_and_pd(decided, above)) as u32 & suspects;
        _mm_storeu_ps(plan.t_lo.as_mut_ptr().add(at), lo32);
        _mm_storeu_ps(plan.t_hi.as_mut_ptr().add(at), hi32);
        (finite_blocks, suspects, decided, !decided_sign & 0xf)
    }

    /// [`Kernel::group_filter`]: every block's largest `abs_bits` (and sign masks, with
    /// `SIGNS`) and f32 shifted sums ([`block_stats`]), then the verdicts of
    /// [`four_block_verdict`], into `plan`; `false` where unsupported (a type [`known`] does
    /// not read, or blocks not a multiple of 16).
    #[inline(always)]
    pub(super) unsafe fn group_filter_avx2<E: Element, const SIGNS: bool>(
        group: &[E],
        bs: usize,
        threshold: &Threshold,
        bound: &FilterBound,
        plan: &mut GroupPlan,
    ) -> bool {
        if !known::<E>() || bs == 0 || bs % 16 != 0 || group.len() != GROUP_BLOCKS * bs {
            return false;
        }
        let p = group.as_ptr();
        // Both halves' statistics first, then both verdicts without a branch between them.
        let first = four_block_stats::<E, SIGNS>(p, bs);
        let second = four_block_stats::<E, SIGNS>(p.add(4 * bs), bs);
        let (f0, s0, d0, t0) = four_block_verdict::<E>(first, threshold, bound, plan, 0);
        let (f1, s1, d1, t1) = four_block_verdict::<E>(second, threshold, bound, plan, 4);
        plan.sign_ties = t0 | t1 << 4;
        plan.finite = (f0 & f1) == 0xf;
        plan.suspects = s0 | s1 << 4;
        plan.decided = d0 | d1 << 4;
        true
    }

    /// [`Kernel::take_decided`] for bfloat16 blocks of 64 values: one word of outlier bits
    /// per block, kept in a register from the split to the outliers it takes.
    ///
    /// # Safety
    /// AVX2 must be supported; `group` holds [`GROUP_BLOCKS`] blocks of 64 values and
    /// `scales` one slot per block.
    #[inline(always)]
    unsafe fn take_decided_bf16<const SIGNS: bool>(
        group: &[Bf16],
        plan: &GroupPlan,
        mut bits: u32,
        first_index: u64,
        scales: &mut [f32],
        outliers: &mut Vec<Outlier>,
    ) -> u32 {
        debug_assert!(group.len() == GROUP_BLOCKS * 64 && scales.len() == GROUP_BLOCKS);
        outliers.reserve(group.len() + 1);
        let len = outliers.len();
        let dst = outliers.spare_capacity_mut().as_mut_ptr();
        let mut n = 0;
        while bits != 0 {
            let j = bits.trailing_zeros() as usize;
            if plan.decided >> j & 1 == 0 {
                break;
            }
            let block = &group[j * 64..(j + 1) * 64];
            let mut word = 0u64;
            let kept = split_bf16::<Bf16, SIGNS>(
                block,
                plan.t_lo[j],
                plan.t_hi[j],
                std::slice::from_mut(&mut word),
            );
            let scale = match kept {
                Some(kept) if !SIGNS => kept.max,
                Some(Kept {
                    signed: Some(signed),
                    ..
                }) => signed,
                _ => break,
            };
            scales[j] = scale;
            let base = first_index + (j * 64) as u64;
            // A decided suspect has an outlier, mostly one or two: both slots are written
            // without a branch (a second slot past the block's count is rewritten by the next
            // block or left beyond the length), a loop takes any others.
            let count = word.count_ones() as usize;
            let second = word & word.wrapping_sub(1);
            let (i0, i1) = (
                (word.trailing_zeros() & 63) as usize,
                (second.trailing_zeros() & 63) as usize,
            );
            // SAFETY: `i0, i1 < 64` (masked: a word of 0 writes slots it does not count); the
            // slots written are below `n + max(count, 2)`, at most `group.len() + 1`, reserved
            // above (`n + count <= group.len()`, and a block after `group.len()` outliers is
            // impossible).
            unsafe {
                let write = |slot: usize, i: usize| {
                    let value = block.get_unchecked(i).0;
                    (*dst.add(slot)).write(Outlier::new(base + i as u64, value));
                };
                write(n, i0);
                write(n + 1, i1);
                let mut rest = second & second.wrapping_sub(1);
                let mut slot = n + 2;
                while rest != 0 {
                    write(slot, rest.trailing_zeros() as usize);
                    rest &= rest - 1;
                    slot += 1;
                }
            }
            n += count;
            bits &= bits - 1;
        }
        // SAFETY: the first `n` spare slots were written above.
        unsafe { outliers.set_len(len + n) };
        bits
    }

    /// [`Kernel::split`] for whole words of 64 values: 8 values at a time, the mask of
    /// `|x| > t_hi` and the maximum of the other magnitudes. A value lies between the two
    /// thresholds exactly when that maximum is above `t_lo`.
    #[inline(always)]
    pub(super) unsafe fn split_avx2<E: Element, const SIGNS: bool>(
        block: &[E],
        t_lo: f32,
        t_hi: f32,
        mask: &mut [u64; MASK_WORDS],
    ) -> Option<Kept> {
        if !known::<E>() || block.is_empty() || block.len() % 64 != 0 {
            return None;
        }
        if TypeId::of::<E>() == TypeId::of::<Bf16>() {
            let words = block.len() / 64;
            return split_bf16::<E, SIGNS>(block, t_lo, t_hi, &mut mask[..words]);
        }
        let hi = _mm256_set1_ps(t_hi);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut acc = _mm256_setzero_ps();
        for (w, word) in mask[..block.len() / 64].iter_mut().enumerate() {
            let mut bits = 0u64;
            for k in 0..8 {
                let v = _mm256_and_ps(load8(block.as_ptr().add(w * 64 + k * 8)), abs);
                let out = _mm256_cmp_ps::<_CMP_GT_OQ>(v, hi);
                acc = _mm256_max_ps(acc, _mm256_andnot_ps(out, v));
                bits |= (_mm256_movemask_ps(out) as u8 as u64) << (k * 8);
            }
            *word = bits;
        }
        let kept = hmax(acc);
        (kept <= t_lo).then_some(Kept::magnitude(kept))
    }

    /// [`split_avx2`] for bfloat16, 16 values at a time on the magnitude bits: for a bfloat16
    /// `x` and an f32 `t >= 0`, `|x| > t` iff `abs_bits(x) > B`, `B` the bits of the largest
    /// bfloat16 `<= t` (`t` truncated), and magnitude bits order like the magnitudes. A value
    /// lies between the thresholds exactly when the largest kept bits exceed `t_lo`'s `B`.
    ///
    /// The kept raw bits (outliers as +0) are also maximized as unsigned and as signed
    /// numbers ([`sign_split`]): when only one sign has the largest magnitude, and that is not
    /// 0, it is the signed-absmax scale's.
    #[inline(always)]
    unsafe fn split_bf16<E: Element, const SIGNS: bool>(
        block: &[E],
        t_lo: f32,
        t_hi: f32,
        mask: &mut [u64],
    ) -> Option<Kept> {
        let below = |t: f32| t.to_bits() >> 16;
        let hi = _mm256_set1_epi16(below(t_hi) as i16);
        let abs = _mm256_set1_epi16(0x7fff);
        let mut hi_u = _mm256_setzero_si256();
        let mut hi_s = _mm256_set1_epi16(i16::MIN);
        let p = block.as_ptr() as *const __m256i;
        for (w, word) in mask[..block.len() / 64].iter_mut().enumerate() {
            let mut out = [_mm256_setzero_si256(); 4];
            for (k, o) in out.iter_mut().enumerate() {
                let raw = _mm256_loadu_si256(p.add(w * 4 + k));
                // Finite magnitudes are at most 0x7f7f: positive as i16.
                let magnitude = _mm256_and_si256(raw, abs);
                *o = _mm256_cmpgt_epi16(magnitude, hi);
                if SIGNS {
                    let kept = _mm256_andnot_si256(*o, raw);
                    hi_u = _mm256_max_epu16(hi_u, kept);
                    hi_s = _mm256_max_epi16(hi_s, kept);
                } else {
                    hi_u = _mm256_max_epu16(hi_u, _mm256_andnot_si256(*o, magnitude));
                }
            }
            *word = word_of_masks16(out);
        }
        // Largest u16 lane: the smallest of the complements (`minpos`), complemented; the
        // largest i16 lane likewise, after flipping the sign bit (signed to unsigned order).
        let largest = |v: __m256i, flip: i16| {
            let v = _mm256_xor_si256(v, _mm256_set1_epi16(flip));
            let eight = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let least = _mm_minpos_epu16(_mm_xor_si128(eight, _mm_set1_epi16(-1)));
            (_mm_cvtsi128_si32(least) as u32 & 0xffff) ^ 0xffff ^ (flip as u16 as u32)
        };
        let top_u = largest(hi_u, 0);
        if !SIGNS {
            return (top_u <= below(t_lo)).then(|| Kept::magnitude(E::abs_bits_to_f32(top_u)));
        }
        let top_s = largest(hi_s, i16::MIN);
        // Magnitudes, -1 for a sign without kept values (`top_s` below 0x8000: non-negative),
        // by arithmetic: the signs of random data would defeat branch prediction.
        let negative = (top_u & 0x7fff) as i32 | ((top_u >> 15) as i32 - 1);
        let positive = top_s as i32 | -((top_s >> 15) as i32);
        let kept = negative.max(positive) as u32;
        if kept > below(t_lo) {
            return None;
        }
        let max = E::abs_bits_to_f32(kept);
        let signed = f32::from_bits(max.to_bits() | ((negative > positive) as u32) << 31);
        // Outliers count as +0 above: a kept magnitude of 0 is left to the exact search.
        let decided = kept != 0 && negative != positive;
        Some(Kept {
            max,
            signed: decided.then_some(signed),
        })
    }

    /// Largest lane of a vector of non-negative values.
    #[inline(always)]
    unsafe fn hmax(acc: __m256) -> f32 {
        let x = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps::<0b01>(x, x)))
    }

    /// The mask of the 64 values from `p` (a type [`known`] reads) whose `abs_bits` equal
    /// `bits` (bit `i` for value `i`): 16-bit types 16 at a time on their bits, f32 8 at a time.
    #[inline(always)]
    unsafe fn abs_equal_word<E: Element>(p: *const E, bits: u32) -> u64 {
        if TypeId::of::<E>() == TypeId::of::<f32>() {
            let (abs, target) = (
                _mm256_set1_epi32(0x7fff_ffff),
                _mm256_set1_epi32(bits as i32),
            );
            let mut word = 0u64;
            for k in 0..8 {
                let v = _mm256_and_si256(_mm256_loadu_si256(p.add(k * 8) as *const __m256i), abs);
                let hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, target));
                word |= (_mm256_movemask_ps(hit) as u8 as u64) << (k * 8);
            }
            return word;
        }
        let (abs, target) = (_mm256_set1_epi16(0x7fff), _mm256_set1_epi16(bits as i16));
        let q = p as *const __m256i;
        let hit = |k: usize| {
            _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_loadu_si256(q.add(k)), abs), target)
        };
        word_of_masks16([hit(0), hit(1), hit(2), hit(3)])
    }

    /// Four 16-lane compare masks (values `16k..16k+15` in mask `k`) as one 64-bit word, bit `i`
    /// for value `i`.
    #[inline(always)]
    unsafe fn word_of_masks16(m: [__m256i; 4]) -> u64 {
        // Bytes [a0-7, b0-7 | a8-15, b8-15] -> [a0-15, b0-15]: one bit per value, in order.
        let half = |a: __m256i, b: __m256i| {
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(a, b));
            _mm256_movemask_epi8(packed) as u32 as u64
        };
        half(m[0], m[1]) | (half(m[2], m[3]) << 32)
    }

    /// The signed-absmax raw scale of a finite block with largest `abs_bits` `max_bits`, as
    /// [`crate::blockwise::scale::raw_block_scale_from_max`] gives it (the first value of that magnitude),
    /// for whole words of 64 values (`None`: use the portable code).
    #[inline(always)]
    pub(super) unsafe fn signed_scale_avx2<E: Element>(block: &[E], max_bits: u32) -> Option<f32> {
        if !known::<E>() || block.is_empty() || block.len() % 64 != 0 {
            return None;
        }
        for w in 0..block.len() / 64 {
            let hits = abs_equal_word(block.as_ptr().add(w * 64), max_bits);
            if hits != 0 {
                return Some(block[w * 64 + hits.trailing_zeros() as usize].to_f32());
            }
        }
        // Unreachable for a true maximum; the portable code decides otherwise.
        None
    }

    /// [`crate::blockwise::opq::signed_scale_masked`] for whole words of 64 values (else the portable
    /// code): the first value of magnitude `max` whose mask bit is clear.
    #[inline(always)]
    pub(super) unsafe fn signed_masked_avx2<E: Element>(
        block: &[E],
        mask: &[u64; MASK_WORDS],
        max: f32,
    ) -> f32 {
        if !known::<E>() || max == 0.0 || block.len() % 64 != 0 {
            return crate::blockwise::opq::signed_scale_masked(block, mask, max);
        }
        // `max` is a magnitude of the block: its bits in the element type, exactly.
        let kind = TypeId::of::<E>();
        let bits = if kind == TypeId::of::<Bf16>() {
            max.to_bits() >> 16
        } else if kind == TypeId::of::<F16>() {
            crate::numeric::element::f32_to_f16(max) as u32
        } else {
            max.to_bits()
        };
        for (w, &outliers) in mask[..block.len() / 64].iter().enumerate() {
            let kept = abs_equal_word(block.as_ptr().add(w * 64), bits) & !outliers;
            if kept != 0 {
                return block[w * 64 + kept.trailing_zeros() as usize].to_f32();
            }
        }
        0.0
    }

    /// [`crate::blockwise::opq::scan`] 8 values at a time in f32: `|x| > t32` (`t32` from
    /// [`crate::blockwise::opq::f32_limit`]) is exactly the f64 test `x * x > limit2`.
    #[inline(always)]
    pub(super) unsafe fn scan_avx2<E: Element>(
        block: &[E],
        limit2: f64,
        t32: f32,
        mask: &mut [u64; MASK_WORDS],
    ) {
        if !known::<E>() || block.len() % 64 != 0 {
            return crate::blockwise::opq::scan(block, limit2, mask);
        }
        let limit = _mm256_set1_ps(t32);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (w, word) in mask[..block.len() / 64].iter_mut().enumerate() {
            let mut bits = 0u64;
            for k in 0..8 {
                let v = _mm256_and_ps(load8(block.as_ptr().add(w * 64 + k * 8)), abs);
                let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, limit));
                bits |= (m as u8 as u64) << (k * 8);
            }
            *word = bits;
        }
    }

    /// The largest magnitude `<= t32` of a block, as f32 (`None`: use the portable code).
    #[inline(always)]
    pub(super) unsafe fn kept_max_avx2<E: Element>(block: &[E], t32: f32) -> Option<f32> {
        if !known::<E>() || block.len() % 8 != 0 {
            return None;
        }
        let limit = _mm256_set1_ps(t32);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut acc = _mm256_setzero_ps();
        for k in 0..block.len() / 8 {
            let v = _mm256_and_ps(load8(block.as_ptr().add(k * 8)), abs);
            let kept = _mm256_cmp_ps::<_CMP_LE_OQ>(v, limit);
            acc = _mm256_max_ps(acc, _mm256_and_ps(v, kept));
        }
        Some(hmax(acc))
    }

    /// Whether the vector kernels read this element type natively.
    #[inline(always)]
    fn known<E: Element>() -> bool {
        let kind = TypeId::of::<E>();
        kind == TypeId::of::<f32>() || kind == TypeId::of::<Bf16>() || kind == TypeId::of::<F16>()
    }

    /// f32 shifted sums for the outlier filter (FMA for the squares; any order is fine, the
    /// filter's bound covers it). `None` for other element types or lengths not a multiple
    /// of 16.
    #[inline(always)]
    pub(super) unsafe fn f32_sums_avx2<E: Element>(block: &[E]) -> Option<(f32, f32)> {
        let kind = TypeId::of::<E>();
        let known = kind == TypeId::of::<f32>()
            || kind == TypeId::of::<Bf16>()
            || kind == TypeId::of::<F16>();
        if !known || block.is_empty() || block.len() % 16 != 0 {
            return None;
        }
        let vk = _mm256_set1_ps(block[0].to_f32());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut q0, mut q1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let bf16 = kind == TypeId::of::<Bf16>();
        for i in 0..block.len() / 16 {
            let p = block.as_ptr().add(i * 16);
            let (v0, v1) = if bf16 {
                // bfloat16 bits in the high half of each 32-bit lane are the f32 values (in
                // another order than load8's, which the sums do not care about).
                let raw = _mm256_loadu_si256(p as *const __m256i);
                let zero = _mm256_setzero_si256();
                (
                    _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)),
                    _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw)),
                )
            } else {
                (load8(p), load8(p.add(8)))
            };
            let d0 = _mm256_sub_ps(v0, vk);
            let d1 = _mm256_sub_ps(v1, vk);
            s0 = _mm256_add_ps(s0, d0);
            s1 = _mm256_add_ps(s1, d1);
            q0 = _mm256_fmadd_ps(d0, d0, q0);
            q1 = _mm256_fmadd_ps(d1, d1, q1);
        }
        // [s, s, q, q | s, s, q, q] -> [s, s, q, q] -> [s, q, s, q].
        let h = _mm256_hadd_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(q0, q1));
        let x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let x = _mm_hadd_ps(x, x);
        Some((
            _mm_cvtss_f32(x),
            _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(x, x)),
        ))
    }

    /// [`crate::blockwise::opq::block_sums`] with the sixteen f64 lanes in four registers (values
    /// `16k+4r..16k+4r+3` in register `r`): the same operations in the same order
    /// (multiply then add, no FMA; lanes combined pairwise as the portable code does), so the
    /// same result.
    #[inline(always)]
    pub(super) unsafe fn sums_avx2<E: Element>(block: &[E]) -> (f64, f64) {
        let kind = TypeId::of::<E>();
        let known = kind == TypeId::of::<f32>()
            || kind == TypeId::of::<Bf16>()
            || kind == TypeId::of::<F16>();
        if block.is_empty() || !known {
            return crate::blockwise::opq::block_sums(block);
        }
        let shift = block[0].to_f32() as f64;
        let vshift = _mm256_set1_pd(shift);
        // Lanes 0-3, 4-7, 8-11, 12-15 of S and SS.
        let mut s = [_mm256_setzero_pd(); 4];
        let mut q = [_mm256_setzero_pd(); 4];
        let full = block.len() / 16;
        for i in 0..full {
            let p = block.as_ptr().add(i * 16);
            let (v0, v1) = (load8(p), load8(p.add(8)));
            let d = [
                _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v0)), vshift),
                _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v0)), vshift),
                _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v1)), vshift),
                _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v1)), vshift),
            ];
            for k in 0..4 {
                s[k] = _mm256_add_pd(s[k], d[k]);
                q[k] = _mm256_add_pd(q[k], _mm256_mul_pd(d[k], d[k]));
            }
        }
        let rest = &block[full * 16..];
        if rest.is_empty() {
            // m = [l0+l8 .. l3+l11], [l4+l12 .. l7+l15]; then [m0+m4 .. m3+m7];
            // then [(m0+m4)+(m2+m6), (m1+m5)+(m3+m7)]; then their sum.
            let combine = |l: [__m256d; 4]| {
                let pairs = _mm256_add_pd(_mm256_add_pd(l[0], l[2]), _mm256_add_pd(l[1], l[3]));
                let halves = _mm_add_pd(
                    _mm256_castpd256_pd128(pairs),
                    _mm256_extractf128_pd::<1>(pairs),
                );
                _mm_cvtsd_f64(_mm_add_sd(halves, _mm_unpackhi_pd(halves, halves)))
            };
            return (combine(s), combine(q));
        }
        let mut sl = [0f64; 16];
        let mut ql = [0f64; 16];
        for k in 0..4 {
            _mm256_storeu_pd(sl.as_mut_ptr().add(4 * k), s[k]);
            _mm256_storeu_pd(ql.as_mut_ptr().add(4 * k), q[k]);
        }
        crate::blockwise::opq::sums_from_lanes(rest, shift, sl, ql)
    }

    /// The AVX2 raw-scale kernel, for tests (AVX2 must be supported).
    #[cfg(test)]
    pub(super) fn kernel_for_tests(
        codebook: &Codebook,
    ) -> impl Fn(&[Bf16], f64, f32, crate::blockwise::codebook::Normalization) -> f32 + '_ {
        move |block, limit2, t32, norm| {
            // SAFETY: only called by tests that checked AVX2 support.
            let kernel = Avx2 {
                codebook,
                tables: unsafe { search_tables(codebook) },
            };
            kernel.raw_scale(block, limit2, t32, norm)
        }
    }

    /// One task with the AVX2 kernels (the shared driver is inlined here, so its loops are
    /// compiled for AVX2 too).
    #[target_feature(enable = "avx2,fma,f16c,bmi1,bmi2,popcnt,lzcnt")]
    pub(super) unsafe fn pack_task_avx2<E: Element>(
        input: &[E],
        context: &TaskContext<'_>,
        out: TaskOut<'_>,
        first_block: usize,
    ) -> Result<Vec<Outlier>> {
        let codebook = context.options.codebook;
        let kernel = Avx2 {
            codebook,
            tables: search_tables(codebook),
        };
        run_task(&kernel, input, context, out, first_block)
    }

    /// AVX2 encoder of one block: 32 values per step, packed to 16 bytes.
    #[inline(always)]
    unsafe fn encode_block_avx2<E: Element>(
        block: &[E],
        scale: f32,
        codebook: &Codebook,
        tables: &SearchTables,
        out: &mut [u8],
    ) {
        if scale == 0.0 {
            return encode_zero_block(block.len(), codebook, out);
        }
        let vscale = _mm256_set1_ps(scale);
        // Restores value order after the in-lane packs: 4-byte groups [0,4,1,5,2,6,3,7].
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let nibble_pairs = _mm256_set1_epi16(0x0110); // first byte * 16 + second byte
        let steps = block.len() / STEP;
        for s in 0..steps {
            let p = block.as_ptr().add(s * STEP);
            let c0 = search(_mm256_div_ps(load8(p), vscale), tables);
            let c1 = search(_mm256_div_ps(load8(p.add(8)), vscale), tables);
            let c2 = search(_mm256_div_ps(load8(p.add(16)), vscale), tables);
            let c3 = search(_mm256_div_ps(load8(p.add(24)), vscale), tables);
            let ab = _mm256_packs_epi32(c0, c1);
            let cd = _mm256_packs_epi32(c2, c3);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            let pairs = _mm256_maddubs_epi16(bytes, nibble_pairs);
            let packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0b10_00);
            _mm_storeu_si128(
                out.as_mut_ptr().add(s * STEP / 2) as *mut __m128i,
                _mm256_castsi256_si128(packed),
            );
        }
        encode_tail(
            &block[steps * STEP..],
            scale,
            codebook,
            &mut out[steps * STEP / 2..],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::codebook::NF4;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// NF4 codes and stored scales of `x` (plain pack).
    fn pack_nf4<E: Element>(
        isa: Isa,
        x: &[E],
        bs: usize,
        norm: Normalization,
        scale_dtype: ScaleDType,
    ) -> (Vec<u8>, Vec<f32>) {
        let cb = Codebook::new(&NF4).unwrap();
        let opts = EncodeOptions {
            codebook: &cb,
            block_size: bs,
            normalization: norm,
            scale_dtype,
        };
        let layout = BlockLayout::new(x.len(), bs).unwrap();
        let mut codes = vec![0u8; layout.code_bytes()];
        let mut scales = vec![0f32; layout.num_blocks()];
        pack_with_isa(isa, x, &opts, &mut codes, &mut scales).unwrap();
        (codes, scales)
    }

    fn encode(isa: Isa, x: &[f32], bs: usize, norm: Normalization) -> (Vec<u8>, Vec<f32>) {
        pack_nf4(isa, x, bs, norm, ScaleDType::BFloat16)
    }

    #[test]
    fn every_isa_matches_scalar_reference() {
        let cb = Codebook::new(&NF4).unwrap();
        for &n in &[0usize, 1, 7, 31, 63, 64, 65, 95, 1000, 4095, 70001] {
            let x = lcg(n, n as u64 + 1);
            for &bs in &[16usize, 64, 4096] {
                for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                    let (codes, scales) = encode(Isa::Portable, &x, bs, norm);
                    for (i, &v) in x.iter().enumerate() {
                        let s = scales[i / bs];
                        let want = cb.encode_one(v / s);
                        let byte = codes[i / 2];
                        let got = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                        assert_eq!(got, want, "n={n} bs={bs} i={i}");
                    }
                    for isa in Isa::supported() {
                        assert_eq!(encode(isa, &x, bs, norm), (codes.clone(), scales.clone()));
                    }
                }
            }
        }
    }

    type Encoded = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>, Vec<Outlier>);

    fn encode_ext<E: Element>(
        isa: Isa,
        x: &[E],
        bs: usize,
        norm: Normalization,
        extras: &PackExtras,
    ) -> Encoded {
        let cb = Codebook::new(&NF4).unwrap();
        let opts = EncodeOptions {
            codebook: &cb,
            block_size: bs,
            normalization: norm,
            scale_dtype: ScaleDType::BFloat16,
        };
        let layout = BlockLayout::new(x.len(), bs).unwrap();
        let blocks = layout.num_blocks();
        let mut codes = vec![0u8; layout.code_bytes()];
        let mut scales = vec![0f32; blocks];
        let dq = extras.double_quant;
        let mut sc = vec![0u8; if dq { blocks } else { 0 }];
        let mut sp = vec![0f32; if dq { 2 * blocks.div_ceil(GROUP) } else { 0 }];
        let buffers = PackBuffers {
            codes: &mut codes,
            scales: &mut scales,
            scale_codes: &mut sc,
            scale_params: &mut sp,
        };
        let outliers = pack_ext_with_isa(isa, x, &opts, extras, buffers).unwrap();
        (codes, scales, sc, sp, outliers)
    }

    #[test]
    fn opq_and_double_quant_agree_across_isas_and_zero_the_outliers() {
        use crate::blockwise::opq::OutlierDType;
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        let cb = Codebook::new(&NF4).unwrap();
        for &n in &[1usize, 2, 17, 64, 100, 1000, 70001, 140_000] {
            let mut x = lcg(n, n as u64 + 7);
            for i in (0..n).step_by(97) {
                x[i] *= 40.0;
            }
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
            let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
            for &bs in &[16usize, 64, 4096] {
                for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                    for dq in [false, true] {
                        let extras = PackExtras {
                            opq: Some(OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap()),
                            double_quant: dq,
                        };
                        let want = encode_ext(Isa::Portable, &x, bs, norm, &extras);
                        if n >= 1000 {
                            assert!(!want.4.is_empty(), "n={n} bs={bs}: outliers expected");
                        }
                        // Outlier positions encode as 0 against the block's scale.
                        for outlier in &want.4 {
                            let i = outlier.index() as usize;
                            let byte = want.0[i / 2];
                            let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                            assert_eq!(code, cb.encode_one(0.0), "n={n} i={i}");
                        }
                        for isa in Isa::supported() {
                            assert_eq!(encode_ext(isa, &x, bs, norm, &extras), want);
                            encode_ext(isa, &xb, bs, norm, &extras);
                            let a = encode_ext(isa, &xh, bs, norm, &extras);
                            assert_eq!(a, encode_ext(Isa::Portable, &xh, bs, norm, &extras));
                        }
                    }
                }
            }
        }
    }

    /// The fused OPQ pass (groups of 8 blocks through the vector filter, suspects in place)
    /// against the portable kernels, which apply the exact rule to every block: adversarial
    /// blocks (a value one step either side of the exact limit, large offsets, tiny and huge
    /// magnitudes whose f32 sums overflow, constant blocks, groups with a NaN or an outlier
    /// float16 cannot hold), every element type, block sizes with and without groups, tails.
    #[test]
    fn fused_opq_pass_matches_the_exact_rule_on_adversarial_blocks() {
        use crate::blockwise::opq::OutlierDType;
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        fn run<E: Element>(
            isa: Isa,
            x: &[E],
            bs: usize,
            norm: Normalization,
            dtype: OutlierDType,
        ) -> String {
            let cb = Codebook::new(&NF4).unwrap();
            let opts = EncodeOptions {
                codebook: &cb,
                block_size: bs,
                normalization: norm,
                scale_dtype: ScaleDType::BFloat16,
            };
            let layout = BlockLayout::new(x.len(), bs).unwrap();
            let mut codes = vec![0u8; layout.code_bytes()];
            let mut scales = vec![0f32; layout.num_blocks()];
            let extras = PackExtras {
                opq: Some(OpqOptions::new(0.95, dtype).unwrap()),
                double_quant: false,
            };
            let buffers = PackBuffers {
                codes: &mut codes,
                scales: &mut scales,
                scale_codes: &mut [],
                scale_params: &mut [],
            };
            match pack_ext_with_isa(isa, x, &opts, &extras, buffers) {
                Ok(outliers) => format!("{codes:?} {scales:?} {outliers:?}"),
                Err(err) => format!("error {err:?}"),
            }
        }
        let mut state = 5u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut checked = 0;
        for trial in 0..96 {
            let bs = [64usize, 16, 128, 32][trial % 4];
            let n = bs * (8 * (1 + trial % 3)) + [0, 5, bs][(trial / 4) % 3].min(bs - 1);
            let offset = [0.0, 100.0, -3.0][(trial / 12) % 3];
            let scale = [1.0, 1e-30, 1e37][(trial / 36) % 3];
            let mut x: Vec<f32> = (0..n)
                .map(|_| {
                    let u = (rand() - 0.5) * 3.46;
                    let heavy = u / rand().max(1e-3).powf(0.25);
                    ((if trial % 2 == 0 { u } else { heavy } + offset) * scale) as f32
                })
                .collect();
            for b in 0..n / bs {
                let block = &mut x[b * bs..(b + 1) * bs];
                let argmax = |v: &[f32]| {
                    (0..v.len()).fold(0, |m, i| if v[i].abs() > v[m].abs() { i } else { m })
                };
                match (b + trial) % 7 {
                    0 => block.fill(block[0]),
                    5 => {
                        // Both signs at the largest magnitude, or at the largest below an
                        // outlier (the first of them gives the signed scale).
                        if b % 2 == 0 {
                            block[(b * 5) % bs] = block[argmax(block)] * 40.0;
                        }
                        let mut rest = block.to_vec();
                        let top = argmax(&rest);
                        if b % 2 == 0 {
                            rest[top] = 0.0;
                        }
                        let j = argmax(&rest);
                        let i = (j + 1 + b % (bs - 1)) % bs;
                        if i != top || b % 2 == 1 {
                            block[i] = -block[j];
                        }
                    }
                    6 => {
                        // Signed zeros, with one large value (an outlier) or two.
                        for (i, v) in block.iter_mut().enumerate() {
                            *v = if (i + b) % 3 == 0 { -0.0 } else { 0.0 };
                        }
                        block[(b * 3) % bs] = 7.0;
                        if b % 2 == 1 {
                            block[(b * 3 + 1) % bs] = -7.0;
                        }
                    }
                    1 | 2 => {
                        // One value just at, above or below the exact limit.
                        let th = Threshold::new(bs, 0.95);
                        let limit = th.limit2(block_sums(block)).sqrt() as f32;
                        let step = [0i32, 1, -1][b % 3];
                        let at = (b * 7) % bs;
                        block[at] = f32::from_bits((limit.to_bits() as i32 + step) as u32);
                    }
                    _ => {}
                }
            }
            if trial % 8 == 3 {
                x[n / 2] = f32::NAN;
            }
            if trial % 8 == 5 {
                x[n / 3] = 1e6; // beyond float16: refused as a float16 outlier
            }
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
            let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
            for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                for dtype in [OutlierDType::BFloat16, OutlierDType::Float16] {
                    let want = (
                        run(Isa::Portable, &x, bs, norm, dtype),
                        run(Isa::Portable, &xb, bs, norm, dtype),
                        run(Isa::Portable, &xh, bs, norm, dtype),
                    );
                    for isa in Isa::supported() {
                        let got = (
                            run(isa, &x, bs, norm, dtype),
                            run(isa, &xb, bs, norm, dtype),
                            run(isa, &xh, bs, norm, dtype),
                        );
                        assert!(
                            got == want,
                            "trial {trial} bs={bs} n={n} {isa:?} {norm:?} {dtype:?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 96 * 4);
    }

    #[test]
    fn sum_kernels_are_bit_identical() {
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        let cb = Codebook::new(&NF4).unwrap();
        if !Isa::Avx2.is_supported() {
            return;
        }
        for n in [
            0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 100, 4096,
        ] {
            let x: Vec<f32> = lcg(n, 99 + n as u64)
                .iter()
                .map(|v| v * 3.0 + 7.0)
                .collect();
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
            let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
            // SAFETY: AVX2 checked above.
            unsafe {
                let bits = |p: (f64, f64)| (p.0.to_bits(), p.1.to_bits());
                assert_eq!(bits(x86::sums_avx2(&x)), bits(block_sums(&x)));
                assert_eq!(bits(x86::sums_avx2(&xb)), bits(block_sums(&xb)));
                assert_eq!(bits(x86::sums_avx2(&xh)), bits(block_sums(&xh)));
                // The scan at a limit that splits the block, and at the exact square of a value.
                let first = x.first().copied().unwrap_or(1.0) as f64;
                for limit2 in [50.0, first * first, 1e-30] {
                    let t32 = crate::blockwise::opq::f32_limit(limit2);
                    let (mut a, mut b) = ([0u64; MASK_WORDS], [0u64; MASK_WORDS]);
                    x86::scan_avx2(&x, limit2, t32, &mut a);
                    crate::blockwise::opq::scan(&x, limit2, &mut b);
                    assert_eq!(a, b, "n={n}");
                    x86::scan_avx2(&xh, limit2, t32, &mut a);
                    crate::blockwise::opq::scan(&xh, limit2, &mut b);
                    assert_eq!(a, b, "n={n}");
                    for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                        let want = crate::blockwise::opq::raw_scale_within(&xb, limit2, norm);
                        let kernel = x86::kernel_for_tests(&cb);
                        let got = kernel(&xb, limit2, t32, norm);
                        assert_eq!(got.to_bits(), want.to_bits(), "n={n}");
                    }
                }
            }
        }
    }

    #[test]
    fn split_kernels_match_the_scan() {
        use crate::blockwise::opq::{f32_limit, raw_scale_within, scan, signed_scale_within};
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        if !Isa::Avx2.is_supported() {
            return;
        }
        fn check<E: Element>(x: &[E]) {
            for pick in [0usize, 5, x.len() - 1] {
                let v = x[pick].to_f32() as f64;
                for limit2 in [v * v, v * v * (1.0 + 1e-7), v * v * (1.0 - 1e-7), 1e-3] {
                    let t32 = f32_limit(limit2);
                    let mut want = [0u64; MASK_WORDS];
                    scan(x, limit2, &mut want);
                    let mut got = [0u64; MASK_WORDS];
                    // SAFETY: AVX2 checked by the caller.
                    let kept = unsafe { x86::split_avx2::<E, true>(x, t32, t32, &mut got) };
                    let kept = kept.expect("nothing lies strictly between equal thresholds");
                    assert_eq!(got, want, "limit2={limit2}");
                    let mut plain = [0u64; MASK_WORDS];
                    // SAFETY: as above.
                    let magnitude = unsafe { x86::split_avx2::<E, false>(x, t32, t32, &mut plain) };
                    assert_eq!(plain, want);
                    assert_eq!(magnitude.map(|k| k.max.to_bits()), Some(kept.max.to_bits()));
                    let absmax = raw_scale_within(x, limit2, Normalization::Absmax);
                    assert_eq!(kept.max.to_bits(), absmax.to_bits());
                    let signed = raw_scale_within(x, limit2, Normalization::SignedAbsmax);
                    if let Some(fast) = kept.signed {
                        assert_eq!(fast.to_bits(), signed.to_bits(), "limit2={limit2}");
                    }
                    // SAFETY: as above.
                    let got_signed = unsafe { x86::signed_masked_avx2(x, &got, kept.max) };
                    assert_eq!(got_signed.to_bits(), signed.to_bits());
                    assert_eq!(
                        signed_scale_within(x, limit2, kept.max).to_bits(),
                        signed.to_bits()
                    );
                    // A value strictly between the thresholds: undecided.
                    let m = x[pick].to_f32().abs();
                    if m > 0.0 {
                        let below = f32::from_bits(m.to_bits() - 1);
                        // SAFETY: as above.
                        let undecided =
                            unsafe { x86::split_avx2::<E, true>(x, below, m, &mut got) };
                        assert!(undecided.is_none());
                    }
                }
            }
        }
        for n in [64usize, 128, 4096] {
            let mut x = lcg(n, 5 + n as u64);
            for i in (3..n).step_by(29) {
                x[i] *= 30.0;
            }
            x[n / 2] = -x[3]; // a tie of magnitudes with opposite signs
            let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
            let xh: Vec<F16> = x.iter().map(|&v| F16(f32_to_f16(v))).collect();
            check(&x);
            check(&xb);
            check(&xh);
        }
    }

    #[test]
    fn zero_block_and_odd_tail() {
        let x = vec![0f32; 33];
        let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::Absmax);
        assert_eq!(scales, vec![0.0; 3]);
        assert_eq!(codes.len(), 17);
        assert_eq!(codes[16] & 15, 0, "pad nibble is zero");
        assert_eq!(codes[16] >> 4, 7, "zero encodes to NF4's zero level");
    }

    #[test]
    fn reports_first_non_finite_index() {
        let mut x = lcg(100_000, 3);
        x[77_777] = f32::NAN;
        x[90_000] = f32::INFINITY;
        let cb = Codebook::new(&NF4).unwrap();
        let opts = EncodeOptions {
            codebook: &cb,
            block_size: 64,
            normalization: Normalization::Absmax,
            scale_dtype: ScaleDType::Float32,
        };
        let mut codes = vec![0u8; 50_000];
        let mut scales = vec![0f32; 1563];
        let err = pack(&x, &opts, &mut codes, &mut scales).unwrap_err();
        assert_eq!(err, Error::NonFinite { index: 77_777 });
    }

    #[test]
    fn signed_absmax_maps_extreme_to_top_level() {
        let x = [
            0.1f32, -3.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::SignedAbsmax);
        assert_eq!(scales[0], -3.0);
        assert_eq!(codes[0] & 15, 15);
    }

    #[test]
    fn signed_scale_is_the_first_value_of_largest_magnitude_on_every_isa() {
        use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
        // Small integers: the largest magnitude repeats with both signs at random places; some
        // blocks are all zeros with a -0.0 or +0.0 first.
        fn check<E: Element + std::fmt::Debug>(x: &[E], bs: usize) {
            let run = |isa| {
                let norm = Normalization::SignedAbsmax;
                let (codes, scales) = pack_nf4(isa, x, bs, norm, ScaleDType::Float32);
                (
                    codes,
                    scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                )
            };
            let want = run(Isa::Portable);
            for (b, block) in x.chunks(bs).enumerate() {
                let max = block.iter().map(|v| v.abs_bits()).max().unwrap();
                let first = block.iter().find(|v| v.abs_bits() == max).unwrap();
                assert_eq!(want.1[b], first.to_f32().to_bits(), "block {b}");
            }
            for isa in Isa::supported() {
                assert_eq!(run(isa), want, "{isa:?} bs={bs} n={}", x.len());
            }
        }
        let mut state = 11u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for trial in 0..40 {
            let bs = [64usize, 128, 16, 256][trial % 4];
            let n = bs * (1 + trial % 5) + [0, 17, 64][trial % 3].min(bs - 1);
            let x: Vec<f32> = (0..n)
                .map(|i| match (i / bs + trial) % 4 {
                    0 => 0.0,
                    1 if i % bs == 0 => -0.0,
                    _ => ((next() % 7) as f32 - 3.0) * 0.5,
                })
                .collect();
            check(&x, bs);
            check(
                &x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect::<Vec<_>>(),
                bs,
            );
            check(
                &x.iter().map(|&v| F16(f32_to_f16(v))).collect::<Vec<_>>(),
                bs,
            );
        }
    }
}
