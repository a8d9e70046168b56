//! The decoder: weights, the KV cache, reused buffers, and the forward pass of new tokens.

use super::attention::{attend, Heads};
use super::cache::KvCache;
use super::config::LlamaConfig;
use super::linear::Linear;
use super::ops::{add, rms_norm, silu_mul};
use super::project::{project, StepBuffers};
use super::rope::rotate;
use crate::error::{check_len, Error, Result};
use crate::isa::Isa;
use crate::runtime::buffer::zeroed_vec;
use crate::runtime::pool::pool;
use std::sync::Arc;

/// Tokens one pass through the blocks processes together (longer inputs run in chunks).
pub const MAX_BATCH: usize = 32;

/// The weights of one decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_attention_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Every weight of the decoder.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[vocab_size, hidden_size]` f32, row-major.
    pub embedding: Arc<[f32]>,
    pub blocks: Vec<Block>,
    /// The final norm.
    pub norm: Vec<f32>,
    /// The output projection; `None`: tied to the embedding (a dense product with it).
    pub lm_head: Option<Linear>,
}

/// Which logits [`Llama::forward`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Those of the last token only (`vocab_size` values).
    Last,
    /// Those of every token (`tokens * vocab_size` values, token-major).
    All,
}

/// The buffers one pass needs, allocated once for [`MAX_BATCH`] tokens.
struct Buffers {
    /// Residual stream `[batch, hidden]`.
    x: Vec<f32>,
    /// Normed stream, and the outputs that go back into the residual `[batch, hidden]`.
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, by head `[heads, batch, head_dim]` and token-major.
    by_head: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    step: StepBuffers,
}

/// A Llama-architecture decoder ready to run: weights, KV cache and buffers. One
/// [`Llama::forward`] call runs the whole pass of its new tokens on the bofrs pool; nothing is
/// allocated per call.
pub struct Llama {
    config: LlamaConfig,
    blocks: Vec<Block>,
    embedding: Arc<[f32]>,
    norm: Vec<f32>,
    lm_head: Linear,
    cache: KvCache,
    buffers: Buffers,
    isa: Isa,
}

/// Checks a norm weight: `n` finite values.
fn check_norm(what: &str, w: &[f32], n: usize) -> Result<()> {
    if w.len() != n {
        return Err(Error::invalid(
            "weights",
            format!("{what} has {} values, expected {n}", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "weights",
            format!("{what} value {i} is not finite"),
        ));
    }
    Ok(())
}

/// Checks a layer's shape: `[out, in]`.
fn check_linear(what: &str, l: &Linear, out: usize, inp: usize) -> Result<()> {
    if (l.out_features(), l.in_features()) != (out, inp) {
        return Err(Error::invalid(
            "weights",
            format!(
                "{what} is [{}, {}], expected [{out}, {inp}]",
                l.out_features(),
                l.in_features()
            ),
        ));
    }
    Ok(())
}

impl Llama {
    /// A decoder of `config` with `weights` (every shape checked), running the kernels of `isa`.
    pub fn new(config: LlamaConfig, weights: Weights, isa: Isa) -> Result<Llama> {
        config.check()?;
        isa.ensure_supported()?;
        let c = &config;
        let (hd, qw, kvw) = (c.hidden_size, c.q_width(), c.kv_width());
        if weights.blocks.len() != c.num_layers {
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} blocks, expected num_layers={}",
                    weights.blocks.len(),
                    c.num_layers
                ),
            ));
        }
        if weights.embedding.len() != c.vocab_size * hd {
            return Err(Error::invalid(
                "weights",
                format!(
                    "the embedding has {} values, expected vocab_size * hidden_size = {}",
                    weights.embedding.len(),
                    c.vocab_size * hd
                ),
            ));
        }
        if let Some(i) = weights.embedding.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "weights",
                format!("embedding value {i} is not finite"),
            ));
        }
        for (i, b) in weights.blocks.iter().enumerate() {
            let at = |name: &str| format!("layers.{i}.{name}");
            check_norm(&at("input_layernorm"), &b.input_norm, hd)?;
            check_norm(&at("post_attention_layernorm"), &b.post_attention_norm, hd)?;
            check_linear(&at("q_proj"), &b.q, qw, hd)?;
            check_linear(&at("k_proj"), &b.k, kvw, hd)?;
            check_linear(&at("v_proj"), &b.v, kvw, hd)?;
            check_linear(&at("o_proj"), &b.o, hd, qw)?;
            check_linear(&at("gate_proj"), &b.gate, c.intermediate_size, hd)?;
            check_linear(&at("up_proj"), &b.up, c.intermediate_size, hd)?;
            check_linear(&at("down_proj"), &b.down, hd, c.intermediate_size)?;
        }
        check_norm("norm", &weights.norm, hd)?;
        let lm_head = match weights.lm_head {
            Some(l) => l,
            None => Linear::dense(c.vocab_size, hd, weights.embedding.clone())?,
        };
        check_linear("lm_head", &lm_head, c.vocab_size, hd)?;
        let b = MAX_BATCH;
        let widest = [hd, qw, kvw, c.intermediate_size, c.vocab_size]
            .into_iter()
            .max()
            .unwrap_or(0);
        let buffers = Buffers {
            x: zeroed_vec(b * hd),
            h: zeroed_vec(b * hd),
            q: zeroed_vec(b * qw),
            k: zeroed_vec(b * kvw),
            v: zeroed_vec(b * kvw),
            by_head: zeroed_vec(b * qw),
            attn: zeroed_vec(b * qw),
            gate: zeroed_vec(b * c.intermediate_size),
            up: zeroed_vec(b * c.intermediate_size),
            scores: zeroed_vec(c.num_heads * c.max_positions),
            cos: zeroed_vec(b * c.head_dim / 2),
            sin: zeroed_vec(b * c.head_dim / 2),
            step: StepBuffers::new(widest, b),
        };
        let cache = KvCache::new(c.num_layers, c.num_kv_heads, c.head_dim, c.max_positions);
        Ok(Llama {
            blocks: weights.blocks,
            embedding: weights.embedding,
            norm: weights.norm,
            lm_head,
            cache,
            buffers,
            isa,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Positions the KV cache holds (the next token's position, when continuing).
    pub fn cached_positions(&self) -> usize {
        self.cache.len()
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.cache.truncate(0);
    }

    /// Runs `tokens` at positions `start..start + tokens.len()` and writes their logits to
    /// `out` (`vocab_size` values for [`Logits::Last`], `tokens.len() * vocab_size` for
    /// [`Logits::All`]). `start` may be at most [`Llama::cached_positions`]: the cache keeps
    /// positions `0..start` and continues from there (0 starts over). On the bofrs pool.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        start: usize,
        logits: Logits,
        out: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::invalid("token_ids", "no tokens"));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(
                "token_ids",
                format!(
                    "token {t} is outside the vocabulary (vocab_size={})",
                    c.vocab_size
                ),
            ));
        }
        if start > self.cache.len() {
            return Err(Error::invalid(
                "position",
                format!(
                    "{start} is past the {} cached positions (it may be at most that: the \
                     KV cache continues from a position it holds)",
                    self.cache.len()
                ),
            ));
        }
        let end = start + tokens.len();
        if end > c.max_positions {
            return Err(Error::invalid(
                "token_ids",
                format!(
                    "positions up to {end} exceed the KV cache of {} positions (build the \
                     engine with a larger max_length)",
                    c.max_positions
                ),
            ));
        }
        let vocab = c.vocab_size;
        let expected = match logits {
            Logits::Last => vocab,
            Logits::All => tokens.len() * vocab,
        };
        check_len("logits", expected, out.len())?;
        self.cache.truncate(start);
        pool().install(|| {
            let chunks = tokens.chunks(MAX_BATCH).count();
            for (i, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
                let first = start + i * MAX_BATCH;
                self.blocks_pass(chunk, first)?;
                match logits {
                    Logits::All => {
                        let at = i * MAX_BATCH * vocab;
                        self.logits(0..chunk.len(), &mut out[at..at + chunk.len() * vocab])?
                    }
                    Logits::Last if i + 1 == chunks => {
                        self.logits(chunk.len() - 1..chunk.len(), out)?
                    }
                    Logits::Last => {}
                }
            }
            Ok(())
        })
    }

    /// Runs up to [`MAX_BATCH`] tokens through every block, leaving the residual stream in the
    /// buffers and their keys and values in the cache.
    fn blocks_pass(&mut self, tokens: &[u32], first: usize) -> Result<()> {
        let c = &self.config;
        let isa = self.isa;
        let n = tokens.len();
        let (hd, qw, kvw, im) = (
            c.hidden_size,
            c.q_width(),
            c.kv_width(),
            c.intermediate_size,
        );
        let half = c.head_dim / 2;
        let buf = &mut self.buffers;
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &self.embedding[tok as usize * hd..(tok as usize + 1) * hd];
            buf.x[t * hd..(t + 1) * hd].copy_from_slice(row);
            c.rope.angles(
                first + t,
                &mut buf.cos[t * half..(t + 1) * half],
                &mut buf.sin[t * half..(t + 1) * half],
            );
        }
        let geometry = Heads {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
            scale: (c.head_dim as f32).powf(-0.5),
        };
        let (x, h) = (&mut buf.x[..n * hd], &mut buf.h[..n * hd]);
        for (l, b) in self.blocks.iter().enumerate() {
            rms_norm(x, &b.input_norm, c.rms_norm_eps, h);
            let (q, k, v) = (
                &mut buf.q[..n * qw],
                &mut buf.k[..n * kvw],
                &mut buf.v[..n * kvw],
            );
            project(
                isa,
                h,
                n,
                &[&b.q, &b.k, &b.v],
                &mut [q, k, v],
                &mut buf.step,
            )?;
            for t in 0..n {
                let (cos, sin) = (
                    &buf.cos[t * half..(t + 1) * half],
                    &buf.sin[t * half..(t + 1) * half],
                );
                rotate(&mut buf.q[t * qw..(t + 1) * qw], cos, sin);
                rotate(&mut buf.k[t * kvw..(t + 1) * kvw], cos, sin);
                for kh in 0..c.num_kv_heads {
                    let at = t * kvw + kh * c.head_dim;
                    let range = at..at + c.head_dim;
                    self.cache
                        .write(l, kh, first + t, &buf.k[range.clone()], &buf.v[range]);
                }
            }
            let by_head = &mut buf.by_head[..n * qw];
            attend(
                isa,
                geometry,
                &self.cache,
                l,
                &buf.q[..n * qw],
                first,
                n,
                &mut buf.scores,
                by_head,
            );
            let attn = &mut buf.attn[..n * qw];
            for (hh, head) in by_head.chunks_exact(n * c.head_dim).enumerate() {
                for (t, vals) in head.chunks_exact(c.head_dim).enumerate() {
                    attn[t * qw + hh * c.head_dim..][..c.head_dim].copy_from_slice(vals);
                }
            }
            project(isa, attn, n, &[&b.o], &mut [h], &mut buf.step)?;
            add(x, h);
            rms_norm(x, &b.post_attention_norm, c.rms_norm_eps, h);
            let (gate, up) = (&mut buf.gate[..n * im], &mut buf.up[..n * im]);
            project(isa, h, n, &[&b.gate, &b.up], &mut [gate, up], &mut buf.step)?;
            silu_mul(&mut buf.gate[..n * im], &buf.up[..n * im]);
            project(
                isa,
                &buf.gate[..n * im],
                n,
                &[&b.down],
                &mut [h],
                &mut buf.step,
            )?;
            add(x, h);
        }
        self.cache.set_len(first + n);
        Ok(())
    }

    /// Logits of tokens `rows` of the last pass (final norm, output projection) into `out`.
    fn logits(&mut self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let c = &self.config;
        let hd = c.hidden_size;
        let buf = &mut self.buffers;
        let n = rows.len();
        let (x, h) = (&buf.x[rows.start * hd..rows.end * hd], &mut buf.h[..n * hd]);
        rms_norm(x, &self.norm, c.rms_norm_eps, h);
        project(self.isa, h, n, &[&self.lm_head], &mut [out], &mut buf.step)
    }
}
