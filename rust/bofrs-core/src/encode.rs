//! Encoding: per-block scales, nearest-level codes, two codes per byte.
//!
//! For each block with stored scale `S` (see [`crate::scale`]), each value `x` becomes
//! `y = x / S` (f32 division; `y = 0` when `S == 0`) and then the code `#{k : y > t_k}` against
//! the codebook's midpoint thresholds. Codes `2j` and `2j+1` share byte `j` (high, low nibble).

use crate::codebook::{Codebook, Normalization};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::layout::BlockLayout;
use crate::pool::{blocks_per_task, pool};
use crate::scale::{stored_block_scale, ScaleDType};
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
    if !isa.is_supported() {
        return Err(Error::InvalidArgument {
            name: "isa",
            message: format!("{} is not supported by this CPU", isa.name()),
        });
    }
    let layout = BlockLayout::new(input.len(), options.block_size)?;
    layout.check_buffers(codes.len(), scales.len())?;
    let bpt = blocks_per_task(options.block_size);
    let task_values = bpt * options.block_size;
    let outcome = pool().install(|| {
        input
            .par_chunks(task_values)
            .zip(codes.par_chunks_mut(task_values / 2))
            .zip(scales.par_chunks_mut(bpt))
            .enumerate()
            .try_for_each(|(task, ((x, c), s))| {
                // SAFETY: `isa` was checked to be supported by this CPU above.
                unsafe { pack_task(isa, x, options, c, s, task * bpt) }
            })
    });
    // Parallel tasks may fail in any order; report the first failure in flat order.
    outcome.map_err(|_| first_error(input, options))
}

/// The first error of a sequential scan (only called once a task has failed).
fn first_error<E: Element>(input: &[E], options: &EncodeOptions<'_>) -> Error {
    input
        .chunks(options.block_size)
        .enumerate()
        .find_map(|(b, block)| {
            stored_block_scale(
                block,
                options.normalization,
                options.scale_dtype,
                b * options.block_size,
                b,
            )
            .err()
        })
        .unwrap_or(Error::InvalidArgument { name: "input", message: "encoding failed".into() })
}

/// Dispatches one task to the kernel variant.
///
/// # Safety
/// `isa` must be supported by the running CPU.
unsafe fn pack_task<E: Element>(
    isa: Isa,
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
    first_block: usize,
) -> Result<()> {
    match isa {
        Isa::Portable => pack_blocks(input, options, codes, scales, first_block),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => pack_blocks_avx2(input, options, codes, scales, first_block),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => pack_blocks_avx512(input, options, codes, scales, first_block),
        #[cfg(not(target_arch = "x86_64"))]
        _ => pack_blocks(input, options, codes, scales, first_block),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_blocks_avx2<E: Element>(
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
    first_block: usize,
) -> Result<()> {
    pack_blocks(input, options, codes, scales, first_block)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn pack_blocks_avx512<E: Element>(
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
    first_block: usize,
) -> Result<()> {
    pack_blocks(input, options, codes, scales, first_block)
}

/// The portable body every variant compiles: blocks of one task.
#[inline(always)]
fn pack_blocks<E: Element>(
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
    first_block: usize,
) -> Result<()> {
    let bs = options.block_size;
    for (b, ((block, out), scale)) in
        input.chunks(bs).zip(codes.chunks_mut(bs / 2)).zip(scales.iter_mut()).enumerate()
    {
        let index = first_block + b;
        *scale =
            stored_block_scale(block, options.normalization, options.scale_dtype, index * bs, index)?;
        encode_block(block, *scale, options.codebook, out);
    }
    Ok(())
}

/// Encodes one block against its stored scale into `out` (`block.len().div_ceil(2)` bytes).
#[inline(always)]
fn encode_block<E: Element>(block: &[E], scale: f32, codebook: &Codebook, out: &mut [u8]) {
    if scale == 0.0 {
        let zero = codebook.encode_one(0.0);
        out.fill((zero << 4) | zero);
        if block.len() % 2 == 1 {
            if let Some(last) = out.last_mut() {
                *last = zero << 4;
            }
        }
        return;
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
    // Tail of a partial last block (any length, possibly odd).
    let tail = values.remainder();
    for (byte, pair) in bytes.into_remainder().iter_mut().zip(tail.chunks(2)) {
        let hi = codebook.encode_one(pair[0].to_f32() / scale);
        let lo = pair.get(1).map_or(0, |v| codebook.encode_one(v.to_f32() / scale));
        *byte = (hi << 4) | lo;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::NF4;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn encode(isa: Isa, x: &[f32], bs: usize, norm: Normalization) -> (Vec<u8>, Vec<f32>) {
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
        pack_with_isa(isa, x, &opts, &mut codes, &mut scales).unwrap();
        (codes, scales)
    }

    #[test]
    fn every_isa_matches_scalar_reference() {
        let cb = Codebook::new(&NF4).unwrap();
        for &n in &[0usize, 1, 7, 64, 65, 1000, 70001] {
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
        let x = [0.1f32, -3.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::SignedAbsmax);
        assert_eq!(scales[0], -3.0);
        assert_eq!(codes[0] & 15, 15);
    }
}
