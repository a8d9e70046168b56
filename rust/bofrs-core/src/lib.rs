//! bofrs-core: block-wise 4-bit weight quantization in pure Rust.
//!
//! The crate knows nothing about Python. It works on slices:
//! - [`codebook`]: 16-level codebooks (NF4, FP4, INT4, AF4) and their midpoint thresholds,
//! - [`bof4`]: the BOF4 optimizer (Lloyd on the weight-domain error, Gaussian or data-driven),
//! - [`element`]: the input element types (f32, bf16, f16) and exact conversions,
//! - [`scale`]: per-block scales (absmax / signed absmax) and their storage rounding,
//! - [`encode`] / [`decode`]: nearest-level encoding with 2-codes-per-byte packing, and back,
//! - [`opq`]: OPQ outliers (per-block sample std threshold) and their 16-bit storage,
//! - [`dq`]: double quantization of block scales (8 bits in groups of 256),
//! - [`matvec`]: fused 4-bit matrix-vector products (never materializing the weight),
//! - [`matvec_int16`] / [`matvec_int8`]: its opt-in integer-activation paths (approximate,
//!   faster), with their shared pieces in [`matvec_quant`],
//! - [`pool`]: the dedicated rayon pool (size from `BOFRS_NUM_THREADS`),
//! - [`recycle`]: outlier buffers kept from one pack to the next,
//! - [`checksum`]: CRC-32 of stored buffers, used to validate files.
//!
//! Block layout: blocks are consecutive runs of `block_size` values of the flattened input
//! (the last one may be partial). Code `2j` goes to the high nibble of byte `j`, code `2j+1` to
//! its low nibble; an odd total leaves the last low nibble zero.

pub mod af4;
pub mod allocate;
pub mod bof4;
pub mod buffer;
pub mod checksum;
pub mod codebook;
pub mod decode;
pub mod dq;
pub mod element;
pub mod encode;
pub mod error;
pub mod gauss;
pub mod hadamard;
pub mod higgs;
pub mod isa;
pub mod layout;
pub mod matvec;
pub mod matvec_int16;
pub mod matvec_int8;
pub mod matvec_quant;
pub mod opq;
pub mod pool;
pub mod recycle;
pub mod scale;
mod simd;

pub use codebook::{Codebook, Normalization};
pub use element::{Bf16, Element, F16};
pub use error::{Error, Result};
pub use isa::Isa;
pub use layout::BlockLayout;
pub use scale::ScaleDType;
