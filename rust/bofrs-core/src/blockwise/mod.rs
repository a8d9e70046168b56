//! The block-wise 4-bit format: values cut into blocks, one scale per block, one 4-bit code per
//! value (the index of the nearest codebook level of the normalized value).
//!
//! Layers, each with its portable kernels (the definition of the results) beside their x86 twins:
//! - [`codebook`]: 16-level codebooks (NF4, FP4, INT4, AF4, the BOF4 family and its optimizer),
//! - [`layout`]: the buffer sizes of a tensor cut into blocks,
//! - [`scale`]: per-block scales (absmax / signed absmax) and their storage rounding,
//! - [`dq`]: double quantization of block scales (8 bits in groups of 256),
//! - [`encode`]: the encoder (scales, codes, and the drive of the OPQ pass),
//! - [`opq`]: OPQ outliers (the rule, its kernels and the pass that finds them),
//! - [`decode`]: codes and scales back to values,
//! - [`matvec`]: fused matrix-vector products on the packed weight.
//!
//! Block layout: blocks are consecutive runs of `block_size` values of the flattened input
//! (the last one may be partial). Code `2j` goes to the high nibble of byte `j`, code `2j+1` to
//! its low nibble; an odd total leaves the last low nibble zero.

pub mod codebook;
pub mod decode;
pub mod dq;
pub mod encode;
pub mod layout;
pub mod matvec;
pub mod opq;
pub mod scale;
