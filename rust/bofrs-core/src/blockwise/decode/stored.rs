//! The decoder's inputs as they are stored: block scales in their storage type (f32, bf16,
//! f16, or dq8 bytes with their group parameters) and OPQ outlier indices in their index type
//! (u16, u32, u64), so that a dequantize converts nothing before it starts.

use crate::blockwise::dq::{check_params, decode_one, max_code, GROUP};
use crate::error::{Error, Result};
use crate::numeric::element::{Bf16, Element, F16};

/// Block scales as stored.
#[derive(Debug, Clone, Copy)]
pub enum StoredScales<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
    F16(&'a [F16]),
    /// dq8: one byte per block and `[lo, step]` per group of [`GROUP`] blocks (see
    /// [`crate::blockwise::dq`]); `signed` for signed-absmax codebooks.
    Dq8 {
        codes: &'a [u8],
        params: &'a [f32],
        signed: bool,
    },
}

impl<'a> From<&'a [f32]> for StoredScales<'a> {
    fn from(scales: &'a [f32]) -> Self {
        Self::F32(scales)
    }
}

impl StoredScales<'_> {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::Bf16(s) => s.len(),
            Self::F16(s) => s.len(),
            Self::Dq8 { codes, .. } => codes.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that every scale decodes to a finite value (dq8: parameters finite and
    /// non-negative, and of the right count).
    pub fn validate(&self) -> Result<()> {
        let bad = match self {
            Self::F32(s) => first_bad(s),
            Self::Bf16(s) => first_bad(s),
            Self::F16(s) => first_bad(s),
            Self::Dq8 {
                codes,
                params,
                signed,
            } => {
                check_params(codes.len(), params)?;
                let groups = codes.len().div_ceil(GROUP);
                // Decoding is monotonic in the code: a group whose largest code decodes to a
                // finite magnitude has only finite scales; only other groups are scanned.
                let top = (max_code(*signed) - 1) as f32;
                (0..groups)
                    .filter(|&g| !(params[2 * g] + top * params[2 * g + 1]).is_finite())
                    .flat_map(|g| g * GROUP..((g + 1) * GROUP).min(codes.len()))
                    .find(|&b| !self.decode_dq8(codes, params, *signed, b).is_finite())
            }
        };
        match bad {
            Some(b) => Err(Error::invalid(
                "scales",
                format!("scale of block {b} is not finite"),
            )),
            None => Ok(()),
        }
    }

    #[inline(always)]
    fn decode_dq8(&self, codes: &[u8], params: &[f32], signed: bool, b: usize) -> f32 {
        let g = b / GROUP;
        decode_one(codes[b], params[2 * g], params[2 * g + 1], signed)
    }

    /// The f32 scales of blocks `first..first + out.len()`.
    pub fn decode_into(&self, first: usize, out: &mut [f32]) {
        let run = first..first + out.len();
        match self {
            Self::F32(s) => out.copy_from_slice(&s[run]),
            Self::Bf16(s) => widen(&s[run], out),
            Self::F16(s) => widen(&s[run], out),
            Self::Dq8 {
                codes,
                params,
                signed,
            } => {
                for (b, o) in run.zip(out.iter_mut()) {
                    *o = self.decode_dq8(codes, params, *signed, b);
                }
            }
        }
    }
}

fn first_bad<E: Element>(scales: &[E]) -> Option<usize> {
    scales.iter().position(|s| !s.to_f32().is_finite())
}

fn widen<E: Element>(scales: &[E], out: &mut [f32]) {
    for (o, s) in out.iter_mut().zip(scales) {
        *o = s.to_f32();
    }
}

/// OPQ outlier indices as stored: the smallest unsigned type that holds every flat index.
#[derive(Debug, Clone, Copy)]
pub enum OutlierIndices<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
    U64(&'a [u64]),
}

impl<'a> From<&'a [u64]> for OutlierIndices<'a> {
    fn from(indices: &'a [u64]) -> Self {
        Self::U64(indices)
    }
}

impl OutlierIndices<'_> {
    /// Number of indices.
    pub fn len(&self) -> usize {
        match self {
            Self::U16(i) => i.len(),
            Self::U32(i) => i.len(),
            Self::U64(i) => i.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index `k`, widened.
    #[inline(always)]
    pub fn get(&self, k: usize) -> u64 {
        match self {
            Self::U16(i) => i[k] as u64,
            Self::U32(i) => i[k] as u64,
            Self::U64(i) => i[k],
        }
    }

    /// The number of indices below `bound` (they are ascending).
    pub fn count_below(&self, bound: u64) -> usize {
        match self {
            Self::U16(i) => i.partition_point(|&x| (x as u64) < bound),
            Self::U32(i) => i.partition_point(|&x| (x as u64) < bound),
            Self::U64(i) => i.partition_point(|&x| x < bound),
        }
    }

    /// The position of the first index not above its predecessor, if any.
    pub fn first_unordered(&self) -> Option<usize> {
        fn find<T: PartialOrd>(i: &[T]) -> Option<usize> {
            i.windows(2).position(|w| w[0] >= w[1]).map(|p| p + 1)
        }
        match self {
            Self::U16(i) => find(i),
            Self::U32(i) => find(i),
            Self::U64(i) => find(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::dq::decode_scales;
    use crate::numeric::element::{f32_to_bf16, f32_to_f16};

    #[test]
    fn every_storage_decodes_like_its_reference() {
        let f: Vec<f32> = (0..700).map(|b| (b as f32 - 350.0) * 3.1e-3).collect();
        let mut out = vec![0f32; 300];
        StoredScales::F32(&f).decode_into(200, &mut out);
        assert_eq!(out, f[200..500]);
        let bf: Vec<Bf16> = f.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
        StoredScales::Bf16(&bf).decode_into(7, &mut out);
        assert!(out.iter().zip(&bf[7..]).all(|(o, s)| *o == s.to_f32()));
        let h: Vec<F16> = f.iter().map(|&v| F16(f32_to_f16(v))).collect();
        StoredScales::F16(&h).decode_into(0, &mut out);
        assert!(out.iter().zip(&h).all(|(o, s)| *o == s.to_f32()));
        let codes: Vec<u8> = (0..700).map(|b| (b * 37 % 256) as u8).collect();
        let params = [0.01f32, 0.002, 0.0, 0.5, 1.0, 0.0];
        for signed in [false, true] {
            let mut want = vec![0f32; 700];
            decode_scales(&codes, &params, signed, &mut want).unwrap();
            let dq = StoredScales::Dq8 {
                codes: &codes,
                params: &params,
                signed,
            };
            dq.validate().unwrap();
            let mut got = vec![0f32; 450];
            dq.decode_into(250, &mut got);
            assert_eq!(got, want[250..]);
        }
    }

    #[test]
    fn bad_scales_are_named() {
        let mut f = vec![1f32; 10];
        f[6] = f32::INFINITY;
        let e = StoredScales::F32(&f).validate().unwrap_err().to_string();
        assert!(e.contains("block 6"), "{e}");
        let bf = [Bf16(0x3f80), Bf16(0x7fc0)];
        assert!(StoredScales::Bf16(&bf).validate().is_err());
        let codes = [1u8; 3];
        assert!(StoredScales::Dq8 {
            codes: &codes,
            params: &[1.0],
            signed: false
        }
        .validate()
        .is_err());
        let e = StoredScales::Dq8 {
            codes: &codes,
            params: &[1.0, -1.0],
            signed: false,
        }
        .validate();
        assert!(e.unwrap_err().to_string().contains("scale_scales"));
        let huge = StoredScales::Dq8 {
            codes: &[255],
            params: &[3.0e38, 3.0e38],
            signed: false,
        };
        assert!(huge.validate().is_err());
        // A group whose largest code would overflow but whose stored codes do not is valid.
        let unused = StoredScales::Dq8 {
            codes: &[0, 1, 2],
            params: &[1.0, 3.0e36],
            signed: false,
        };
        unused.validate().unwrap();
        let used = StoredScales::Dq8 {
            codes: &[0, 1, 200],
            params: &[1.0, 3.0e36],
            signed: false,
        };
        assert!(used.validate().unwrap_err().to_string().contains("block 2"));
    }

    #[test]
    fn indices_of_every_width_agree() {
        let wide: Vec<u64> = vec![3, 9, 10, 400, 65535];
        let i32s: Vec<u32> = wide.iter().map(|&v| v as u32).collect();
        let i16s: Vec<u16> = wide.iter().map(|&v| v as u16).collect();
        for view in [
            OutlierIndices::U64(&wide),
            OutlierIndices::U32(&i32s),
            OutlierIndices::U16(&i16s),
        ] {
            assert_eq!(view.len(), 5);
            assert_eq!((0..5).map(|k| view.get(k)).collect::<Vec<_>>(), wide);
            assert_eq!(view.count_below(10), 2);
            assert_eq!(view.count_below(11), 3);
            assert_eq!(view.first_unordered(), None);
        }
        assert_eq!(OutlierIndices::U16(&[1, 5, 5]).first_unordered(), Some(2));
        assert_eq!(OutlierIndices::U32(&[7, 2]).first_unordered(), Some(1));
    }
}
