//! Decoding: `value = level[code] * scale`, computed in f32 and rounded (nearest even) to the
//! output type; OPQ outliers written back. The kernels: `portable` (the definition) and its
//! AVX2 twin `x86`.

mod portable;
mod stored;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use stored::{OutlierIndices, StoredScales};

use crate::blockwise::codebook::Codebook;
use crate::blockwise::layout::BlockLayout;
use crate::blockwise::opq::OutlierDType;
use crate::error::{check_len, Error, Result};
use crate::isa::{dispatch, Isa};
use crate::numeric::element::Element;
use crate::runtime::pool::{blocks_per_task, pool};
use rayon::prelude::*;

/// A packed block-wise tensor as the decoder reads it.
#[derive(Debug, Clone, Copy)]
pub struct Packed<'a> {
    /// `numel.div_ceil(2)` bytes of codes.
    pub codes: &'a [u8],
    /// One scale per block, as stored.
    pub scales: StoredScales<'a>,
    pub codebook: &'a Codebook,
    pub block_size: usize,
    /// OPQ outliers to write back, if any.
    pub outliers: Option<OutlierView<'a>>,
}

/// Unpacks `packed` into `out` (one value per original element), on the pool, with the best
/// instruction set of this CPU.
pub fn unpack<E: Element>(packed: &Packed<'_>, out: &mut [E]) -> Result<()> {
    unpack_with_isa(Isa::best(), packed, out)
}

/// Stored OPQ outliers: flat indices (strictly ascending) and 16-bit values.
#[derive(Debug, Clone, Copy)]
pub struct OutlierView<'a> {
    pub indices: OutlierIndices<'a>,
    pub values: &'a [u16],
    pub dtype: OutlierDType,
}

impl OutlierView<'_> {
    /// Checks lengths, order, range and finiteness against a tensor of `numel` values.
    pub fn validate(&self, numel: usize) -> Result<()> {
        check_len("outlier_values", self.indices.len(), self.values.len())?;
        if let Some(i) = self.indices.first_unordered() {
            return Err(Error::invalid(
                "outlier_indices",
                format!("must be strictly ascending (position {i})"),
            ));
        }
        if let Some(last) = self
            .indices
            .len()
            .checked_sub(1)
            .map(|k| self.indices.get(k))
        {
            if last >= numel as u64 {
                return Err(Error::invalid(
                    "outlier_indices",
                    format!("index {last} is out of range for {numel} values"),
                ));
            }
        }
        if let Some(i) = self
            .values
            .iter()
            .position(|&v| !self.dtype.to_f32(v).is_finite())
        {
            return Err(Error::invalid(
                "outlier_values",
                format!("outlier {i} is not finite"),
            ));
        }
        Ok(())
    }
}

/// [`unpack`] with an explicit kernel variant. The decoded value of an outlier is its stored
/// 16-bit value, rounded to the output type.
pub fn unpack_with_isa<E: Element>(isa: Isa, packed: &Packed<'_>, out: &mut [E]) -> Result<()> {
    let &Packed {
        codes,
        scales,
        codebook,
        block_size,
        outliers,
    } = packed;
    isa.ensure_supported()?;
    let layout = BlockLayout::new(out.len(), block_size)?;
    layout.check_buffers(codes.len(), scales.len())?;
    scales.validate()?;
    if let Some(view) = &outliers {
        view.validate(out.len())?;
    }
    let bpt = blocks_per_task(block_size);
    let task_values = bpt * block_size;
    let levels = codebook.levels();
    pool().install(|| {
        out.par_chunks_mut(task_values)
            .zip(codes.par_chunks(task_values / 2))
            .enumerate()
            .for_each(|(task, (o, c))| {
                let first = task * bpt;
                let mut s = vec![0f32; o.len().div_ceil(block_size)];
                scales.decode_into(first, &mut s);
                for ((block, bytes), &scale) in o
                    .chunks_mut(block_size)
                    .zip(c.chunks(block_size / 2))
                    .zip(&s)
                {
                    dispatch!(isa,
                        // SAFETY: `isa` was checked to be supported by this CPU above.
                        avx2 => unsafe { x86::decode_block(bytes, scale, levels, block) },
                        portable => portable::decode_block(bytes, scale, levels, block),
                    )
                }
                if let Some(view) = &outliers {
                    let base = (task * task_values) as u64;
                    let end = base + o.len() as u64;
                    let from = view.indices.count_below(base);
                    let to = view.indices.count_below(end);
                    for k in from..to {
                        let i = view.indices.get(k);
                        o[(i - base) as usize] = E::from_f32(view.dtype.to_f32(view.values[k]));
                    }
                }
            })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::codebook::NF4;
    use crate::numeric::element::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Bf16, F16};

    fn data(n: usize, bs: usize) -> (Vec<u8>, Vec<f32>) {
        let codes = (0..n.div_ceil(2))
            .map(|i| (i * 37 + 11) as u8)
            .collect::<Vec<u8>>();
        let scales = (0..n.div_ceil(bs))
            .map(|b| (b as f32 - 3.5) * 1.37e-3)
            .collect();
        let mut codes = codes;
        if n % 2 == 1 {
            *codes.last_mut().unwrap() &= 0xf0;
        }
        (codes, scales)
    }

    fn packed<'a>(codes: &'a [u8], scales: &'a [f32], cb: &'a Codebook, bs: usize) -> Packed<'a> {
        Packed {
            codes,
            scales: scales.into(),
            codebook: cb,
            block_size: bs,
            outliers: None,
        }
    }

    #[test]
    fn every_isa_and_output_matches_definition() {
        let cb = Codebook::new(&NF4).unwrap();
        for &n in &[0usize, 1, 15, 16, 17, 64, 99, 4097, 70001] {
            for &bs in &[16usize, 64, 256] {
                let (codes, scales) = data(n, bs);
                let expect: Vec<f32> = (0..n)
                    .map(|i| {
                        let c = if i % 2 == 0 {
                            codes[i / 2] >> 4
                        } else {
                            codes[i / 2] & 15
                        };
                        NF4[c as usize] * scales[i / bs]
                    })
                    .collect();
                for isa in Isa::supported() {
                    let mut f = vec![0f32; n];
                    unpack_with_isa(isa, &packed(&codes, &scales, &cb, bs), &mut f).unwrap();
                    assert_eq!(f, expect, "{isa:?} n={n} bs={bs}");
                    let mut b = vec![Bf16::default(); n];
                    unpack_with_isa(isa, &packed(&codes, &scales, &cb, bs), &mut b).unwrap();
                    for (i, v) in b.iter().enumerate() {
                        assert_eq!(v.0, f32_to_bf16(expect[i]), "{isa:?} bf16 i={i}");
                        assert!((bf16_to_f32(v.0) - expect[i]).abs() <= expect[i].abs() / 128.0);
                    }
                    let mut h = vec![F16::default(); n];
                    unpack_with_isa(isa, &packed(&codes, &scales, &cb, bs), &mut h).unwrap();
                    for (i, v) in h.iter().enumerate() {
                        assert_eq!(v.0, f32_to_f16(expect[i]), "{isa:?} f16 i={i}");
                        assert!(
                            (f16_to_f32(v.0) - expect[i]).abs() <= 1e-3 * expect[i].abs() + 6e-8
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_wrong_lengths_and_bad_scales() {
        let cb = Codebook::new(&NF4).unwrap();
        let mut out = vec![0f32; 64];
        assert!(unpack(&packed(&[0u8; 31], &[1.0], &cb, 64), &mut out).is_err());
        assert!(unpack(&packed(&[0u8; 32], &[1.0, 2.0], &cb, 64), &mut out).is_err());
        assert!(unpack(&packed(&[0u8; 32], &[f32::NAN], &cb, 64), &mut out).is_err());
        assert!(unpack(&packed(&[0u8; 32], &[1.0], &cb, 48), &mut out).is_err());
    }
}
