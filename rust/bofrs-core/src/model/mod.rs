//! A native decoder for Llama-architecture models (Llama, SmolLM2, Mistral), so that a whole
//! token's work is one call: every product through the block-wise fused kernels (or dense f32),
//! split over output rows on the bofrs pool, with a preallocated f32 KV cache.
//!
//! Layers, each with one job:
//! - [`config`]: the dimensions and constants ([`LlamaConfig`]),
//! - [`rope`]: rotary embeddings (rotate-half convention, a frequency table),
//! - [`ops`]: RMSNorm, SiLU gating, softmax, residual adds,
//! - [`dense`]: dense f32 products and the vector kernels of attention,
//! - [`linear`]: one layer prepared once (packed or dense, bias, rotation, OPQ outliers),
//! - [`project`]: the products of one step run together on the pool,
//! - [`cache`]: the KV cache,
//! - [`attention`]: causal grouped-query attention over the cache,
//! - [`llama`]: the decoder and its forward pass ([`Llama`]).
//!
//! Numbers: everything is f32 as transformers computes a float32 model, so with the float
//! activation mode the logits agree with transformers' to float rounding (sums in other orders);
//! the integer modes add their documented error per product.

pub mod attention;
pub mod cache;
pub mod config;
pub mod dense;
pub mod linear;
pub mod llama;
pub mod ops;
pub mod project;
pub mod rope;
#[cfg(test)]
mod tests;

pub use config::LlamaConfig;
pub use linear::Linear;
pub use llama::{Block, Llama, Logits, Weights, MAX_BATCH};
pub use rope::Rope;
