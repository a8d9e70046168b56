//! bofrs-core: block-wise 4-bit weight quantization in pure Rust.
//!
//! The crate knows nothing about Python. It works on slices, in layers:
//! - [`blockwise`]: the block-wise format, by layer: codebooks, layout, scales, double
//!   quantization, encoding, OPQ outliers, decoding, fused matvec,
//! - [`higgs`]: the HIGGS format (Hadamard rotation, Gaussian grids, group-wise pack/unpack and
//!   its fused matvec),
//! - [`model`]: a native Llama-architecture decoder over packed (or dense) layers,
//! - [`allocate`]: per-layer format allocation (the linearity theorem's knapsack),
//! - [`numeric`]: element types and exact conversions, the normal distribution, the Hadamard
//!   transform, CRC-32,
//! - [`runtime`]: the dedicated rayon pool (size from `BOFRS_NUM_THREADS`), output buffers,
//!   recycled outlier buffers,
//! - [`isa`]: the instruction-set variants the kernels are compiled for, and their detection,
//! - [`error`]: the typed error every fallible call returns.

pub mod allocate;
pub mod blockwise;
pub mod error;
pub mod higgs;
pub mod isa;
pub mod model;
pub(crate) mod names;
pub mod numeric;
pub mod runtime;
#[cfg(test)]
mod testing;

pub use blockwise::codebook::{Codebook, Normalization};
pub use blockwise::layout::BlockLayout;
pub use blockwise::scale::ScaleDType;
pub use error::{Error, Result};
pub use isa::Isa;
pub use numeric::element::{Bf16, Element, F16};
