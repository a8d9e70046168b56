//! The dimensions and constants of a Llama-architecture decoder.

use super::rope::Rope;
use crate::error::{Error, Result};

/// A Llama-architecture decoder (Llama, SmolLM2, Mistral): pre-norm blocks of RMSNorm, grouped
/// query attention with rotary embeddings, and a SiLU-gated MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Values per head (even).
    pub head_dim: usize,
    /// Token ids are `0..vocab_size`.
    pub vocab_size: usize,
    /// The epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// The rotary embedding.
    pub rope: Rope,
    /// Keys each query sees at most (Mistral's sliding window), or all earlier ones.
    pub sliding_window: Option<usize>,
    /// Positions the KV cache holds.
    pub max_positions: usize,
}

impl LlamaConfig {
    /// Checks that the dimensions fit together.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_positions", self.max_positions),
        ] {
            if v == 0 {
                return Err(Error::invalid(name, "must be positive"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::invalid(
                "num_kv_heads",
                format!(
                    "{} does not divide num_heads={}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::invalid("vocab_size", "must fit 32 bits"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(Error::invalid("rms_norm_eps", "must be finite and >= 0"));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::invalid("sliding_window", "must be positive"));
        }
        // The KV cache: layers * kv heads * positions * head_dim * 2 values must be addressable.
        self.num_layers
            .checked_mul(self.num_kv_heads)
            .and_then(|n| n.checked_mul(self.max_positions))
            .and_then(|n| n.checked_mul(self.head_dim))
            .and_then(|n| n.checked_mul(8))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid("max_positions", "the KV cache would not fit memory"))?;
        self.rope.check(self.head_dim)
    }

    /// Width of all query heads together.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
