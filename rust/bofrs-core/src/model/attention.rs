//! Causal grouped-query attention over the KV cache, one layer at a time, parallel over query
//! heads.
//!
//! Query head `h` reads key/value head `h / (heads / kv_heads)`. The query at position `p` sees
//! the keys at positions `lo..=p` (`lo = p + 1 - window` with a sliding window, else 0):
//! `softmax(q . k_j * scale) @ v`, in f32.

use super::cache::KvCache;
use super::dense::{axpy, dot};
use super::ops::softmax;
use crate::isa::Isa;
use rayon::prelude::*;

/// Multiply-adds below which one layer's attention runs on the calling thread.
const INLINE_WORK: usize = 1 << 15;

/// The geometry of one attention step.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window, if any.
    pub window: Option<usize>,
    /// Factor of the scores (`head_dim^-0.5`).
    pub scale: f32,
}

/// Attention of `batch` queries at positions `start..start + batch` in `layer`, whose keys and
/// values `cache` already holds. `q` is `[batch, heads * head_dim]` (rotated), `out_by_head`
/// receives `[heads][batch][head_dim]`; `scores` is scratch of `heads * cache.capacity()`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    geometry: Heads,
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    start: usize,
    batch: usize,
    scores: &mut [f32],
    out_by_head: &mut [f32],
) {
    let Heads {
        heads,
        kv_heads,
        head_dim: d,
        window,
        scale,
    } = geometry;
    let group = heads / kv_heads;
    let capacity = cache.capacity();
    let head = |h: usize, out: &mut [f32], scores: &mut [f32]| {
        let (keys, values) = cache.head(layer, h / group);
        for (t, o) in out.chunks_exact_mut(d).enumerate() {
            let pos = start + t;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let qh = &q[(t * heads + h) * d..][..d];
            let s = &mut scores[..pos + 1 - lo];
            for (j, sj) in (lo..=pos).zip(s.iter_mut()) {
                *sj = dot(isa, qh, &keys[j * d..(j + 1) * d]) * scale;
            }
            softmax(s);
            o.fill(0.0);
            for (j, &p) in (lo..=pos).zip(s.iter()) {
                axpy(isa, p, &values[j * d..(j + 1) * d], o);
            }
        }
    };
    let work = heads * batch * (start + batch) * d;
    if work <= INLINE_WORK {
        let outs = out_by_head.chunks_exact_mut(batch * d);
        for (h, (o, s)) in outs.zip(scores.chunks_exact_mut(capacity)).enumerate() {
            head(h, o, s);
        }
    } else {
        out_by_head
            .par_chunks_exact_mut(batch * d)
            .zip(scores.par_chunks_exact_mut(capacity))
            .enumerate()
            .for_each(|(h, (o, s))| head(h, o, s));
    }
}
