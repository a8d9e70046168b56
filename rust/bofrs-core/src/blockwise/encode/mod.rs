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
//!
//! Files: this one (the API and the split into parallel tasks), `task` (one task, generic
//! over the kernel set), `portable` (the definition) and `x86` (its AVX2 twin); the OPQ pass
//! a task runs is `opq::pass`.

pub(crate) mod portable;
mod task;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use crate::blockwise::codebook::{Codebook, Normalization};
use crate::blockwise::dq::GROUP;
use crate::blockwise::layout::BlockLayout;
use crate::blockwise::opq::pass::OpqContext;
use crate::blockwise::opq::{OpqOptions, Outlier};
use crate::blockwise::scale::ScaleDType;
use crate::error::{check_lengths, Error, Result};
use crate::isa::{dispatch, Isa};
use crate::numeric::element::Element;
use crate::runtime::buffer::zeroed_vec;
use crate::runtime::pool::{blocks_per_task, pool};
use crate::runtime::recycle::OutlierParts;
use rayon::prelude::*;

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

/// Output buffers of [`pack_ext_parts_with_isa`].
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

/// Owned output buffers of [`pack_ext_parts_with_isa`], zeroed and sized for a layout.
pub struct PackOutput {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    /// Empty without double quantization.
    pub scale_codes: Vec<u8>,
    /// Empty without double quantization.
    pub scale_params: Vec<f32>,
}

impl PackOutput {
    /// Buffers for `layout`, with those of double-quantized scales when `double_quant`.
    pub fn new(layout: &BlockLayout, double_quant: bool) -> Self {
        let blocks = layout.num_blocks();
        let dq = |n: usize| if double_quant { n } else { 0 };
        Self {
            codes: zeroed_vec(layout.code_bytes()),
            scales: vec![0f32; blocks],
            scale_codes: vec![0u8; dq(blocks)],
            scale_params: vec![0f32; dq(2 * blocks.div_ceil(GROUP))],
        }
    }

    /// The buffers, borrowed for one pack.
    pub fn buffers(&mut self) -> PackBuffers<'_> {
        PackBuffers {
            codes: &mut self.codes,
            scales: &mut self.scales,
            scale_codes: &mut self.scale_codes,
            scale_params: &mut self.scale_params,
        }
    }
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
    pack_ext_parts_with_isa(isa, input, options, &PackExtras::default(), buffers).map(|_| ())
}

/// [`pack_with_isa`] with OPQ and / or double-quantized scales. Returns the outliers (flat
/// index ascending, stored 16-bit value; none without OPQ) as the parallel tasks found them:
/// consecutive parts in flat order ([`OutlierParts::concat`] joins them, [`split_outliers`]
/// lays them out as two arrays without a serial join); their vectors are reused by the next
/// pack once the parts are dropped. Errors name the first bad block in flat order.
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
        return Err(Error::invalid(
            "opq",
            format!("OPQ takes fewer than 2^48 values, got {}", input.len()),
        ));
    }
    let blocks = layout.num_blocks();
    let dq = extras.double_quant;
    let (want_codes, want_params) = if dq {
        (blocks, 2 * blocks.div_ceil(GROUP))
    } else {
        (0, 0)
    };
    check_lengths(&[
        ("scale_codes", want_codes, out.scale_codes.len()),
        ("scale_scales", want_params, out.scale_params.len()),
    ])?;
    let mut bpt = blocks_per_task(bs);
    if dq {
        // A task holds whole scale groups.
        bpt = bpt.next_multiple_of(GROUP);
    }
    let task_values = bpt * bs;
    let tail = input.len() % bs;
    let context = TaskContext {
        options,
        opq: extras.opq.map(|o| OpqContext::new(o, bs, tail)),
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
pub(crate) struct TaskContext<'a> {
    pub(crate) options: &'a EncodeOptions<'a>,
    /// OPQ settings with the thresholds of full blocks and of the partial last block.
    pub(crate) opq: Option<OpqContext>,
    pub(crate) double_quant: bool,
    pub(crate) signed: bool,
}

/// The slices of the outputs one task writes.
pub(crate) struct TaskOut<'a> {
    pub(crate) codes: &'a mut [u8],
    pub(crate) scales: &'a mut [f32],
    pub(crate) scale_codes: &'a mut [u8],
    pub(crate) scale_params: &'a mut [f32],
}

/// The encoder's kernels of one ISA: [`portable::Portable`] (the definition of the results)
/// and its AVX2 twin `x86::Avx2`; the OPQ rule's kernels of the same sets are in
/// [`crate::blockwise::opq`].
pub(crate) trait BlockKernels {
    /// Largest `abs_bits` of a block.
    fn max_abs_bits<T: Element>(&self, block: &[T]) -> u32;
    /// The raw scale of a finite block from its largest `abs_bits`, exactly as
    /// [`crate::blockwise::scale::raw_block_scale_from_max`] gives it.
    fn raw_scale_from_max<T: Element>(&self, block: &[T], max: u32, norm: Normalization) -> f32;
    /// Codes of one block against its (decoded) scale.
    fn encode<T: Element>(&self, block: &[T], scale: f32, out: &mut [u8]);
}

/// Dispatches one task to the kernel set of `isa`.
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
        // SAFETY: the caller checked `isa`.
        avx2 => unsafe { x86::pack_task(input, context, out, first_block) },
        portable => {
            let kernel = portable::Portable {
                codebook: context.options.codebook,
            };
            task::run_task(&kernel, input, context, out, first_block)
        },
    )
}
