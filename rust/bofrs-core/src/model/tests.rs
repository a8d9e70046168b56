//! The engine against a plain float64 forward pass of the same random model (packed layers
//! decoded), over prefill and decode steps; GQA, sliding windows, biases, tied and untied
//! outputs, chunked prefill, the parallel path, rewinding, and bad input.

use super::*;
use crate::blockwise::codebook::{Codebook, NF4};
use crate::blockwise::matvec::Activations;
use crate::isa::Isa;
use crate::testing::{lcg, step};
use std::sync::Arc;

/// How the random test model is made.
#[derive(Clone, Copy)]
struct Spec {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    block: usize,
    window: Option<usize>,
    tied: bool,
    bias: bool,
    /// Dense (not packed) projections.
    dense: bool,
    activations: Activations,
    max_positions: usize,
}

const SMALL: Spec = Spec {
    hidden: 64,
    intermediate: 96,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    vocab: 53,
    block: 32,
    window: None,
    tied: true,
    bias: false,
    dense: false,
    activations: Activations::Float,
    max_positions: 64,
};

/// A dense float64 layer of the reference.
struct RefLinear {
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    n_in: usize,
}

impl RefLinear {
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        self.w
            .chunks_exact(self.n_in)
            .enumerate()
            .map(|(o, row)| {
                let dot: f64 = row.iter().zip(x).map(|(a, b)| a * b).sum();
                dot + self.bias.as_ref().map_or(0.0, |b| b[o])
            })
            .collect()
    }
}

struct RefBlock {
    norms: [Vec<f64>; 2],
    q: RefLinear,
    k: RefLinear,
    v: RefLinear,
    o: RefLinear,
    gate: RefLinear,
    up: RefLinear,
    down: RefLinear,
}

struct Reference {
    spec: Spec,
    embedding: Vec<f64>,
    blocks: Vec<RefBlock>,
    norm: Vec<f64>,
    head: RefLinear,
    rope: Rope,
}

/// A random layer for both sides: packed (codes, scales) or dense.
fn layer(
    spec: &Spec,
    n_out: usize,
    n_in: usize,
    seed: &mut u64,
    bias: bool,
) -> (Linear, RefLinear) {
    let scale = 1.0 / (n_in as f32).sqrt();
    let bias_values = bias.then(|| {
        lcg(n_out, step(seed))
            .iter()
            .map(|v| v * 0.1)
            .collect::<Vec<f32>>()
    });
    let (linear, w) = if spec.dense {
        let w: Vec<f32> = lcg(n_out * n_in, step(seed))
            .iter()
            .map(|v| v * scale)
            .collect();
        let wd = w.iter().map(|&v| v as f64).collect();
        (Linear::dense(n_out, n_in, Arc::from(w)).unwrap(), wd)
    } else {
        let book = Codebook::new(&NF4).unwrap();
        let codes: Vec<u8> = (0..n_out * n_in / 2)
            .map(|_| (step(seed) >> 56) as u8)
            .collect();
        let scales: Vec<f32> = lcg(n_out * n_in / spec.block, step(seed))
            .iter()
            .map(|v| v * scale)
            .collect();
        let w = (0..n_out * n_in)
            .map(|i| {
                let byte = codes[i / 2];
                let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                NF4[c as usize] as f64 * scales[i / spec.block] as f64
            })
            .collect();
        let l = Linear::packed(
            n_out,
            n_in,
            codes,
            scales,
            book,
            spec.block,
            spec.activations,
        );
        (l.unwrap(), w)
    };
    let linear = match &bias_values {
        Some(b) => linear.with_bias(b.clone()).unwrap(),
        None => linear,
    };
    let bias = bias_values.map(|b| b.iter().map(|&v| v as f64).collect());
    (linear, RefLinear { w, bias, n_in })
}

fn norm_weight(n: usize, seed: &mut u64) -> Vec<f32> {
    lcg(n, step(seed)).iter().map(|v| 1.0 + 0.2 * v).collect()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The engine and the reference of one random model.
fn build(spec: Spec, seed: u64, isa: Isa) -> (Llama, Reference) {
    let (config, weights, reference) = parts(spec, seed);
    (Llama::new(config, weights, isa).unwrap(), reference)
}

/// The config, the engine's weights and the reference of one random model.
fn parts(spec: Spec, seed: u64) -> (LlamaConfig, Weights, Reference) {
    let s = &mut { seed };
    let (hd, qw, kvw) = (
        spec.hidden,
        spec.heads * spec.head_dim,
        spec.kv_heads * spec.head_dim,
    );
    let embedding = lcg(spec.vocab * hd, step(s));
    let mut blocks = Vec::new();
    let mut ref_blocks = Vec::new();
    for _ in 0..spec.layers {
        let n1 = norm_weight(hd, s);
        let n2 = norm_weight(hd, s);
        let (q, rq) = layer(&spec, qw, hd, s, spec.bias);
        let (k, rk) = layer(&spec, kvw, hd, s, spec.bias);
        let (v, rv) = layer(&spec, kvw, hd, s, spec.bias);
        let (o, ro) = layer(&spec, hd, qw, s, false);
        let (gate, rg) = layer(&spec, spec.intermediate, hd, s, false);
        let (up, ru) = layer(&spec, spec.intermediate, hd, s, false);
        let (down, rd) = layer(&spec, hd, spec.intermediate, s, false);
        ref_blocks.push(RefBlock {
            norms: [widen(&n1), widen(&n2)],
            q: rq,
            k: rk,
            v: rv,
            o: ro,
            gate: rg,
            up: ru,
            down: rd,
        });
        blocks.push(Block {
            input_norm: n1,
            q,
            k,
            v,
            o,
            post_attention_norm: n2,
            gate,
            up,
            down,
        });
    }
    let norm = norm_weight(hd, s);
    let (lm_head, head) = if spec.tied {
        let head = RefLinear {
            w: widen(&embedding),
            bias: None,
            n_in: hd,
        };
        (None, head)
    } else {
        let (l, r) = layer(&spec, spec.vocab, hd, s, false);
        (Some(l), r)
    };
    let rope = Rope::from_theta(10000.0, spec.head_dim);
    let config = LlamaConfig {
        hidden_size: hd,
        intermediate_size: spec.intermediate,
        num_layers: spec.layers,
        num_heads: spec.heads,
        num_kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
        vocab_size: spec.vocab,
        rms_norm_eps: 1e-5,
        rope: rope.clone(),
        sliding_window: spec.window,
        max_positions: spec.max_positions,
    };
    let reference = Reference {
        spec,
        embedding: widen(&embedding),
        blocks: ref_blocks,
        norm: widen(&norm),
        head,
        rope,
    };
    let weights = Weights {
        embedding: Arc::from(embedding),
        blocks,
        norm,
        lm_head,
    };
    (config, weights, reference)
}

fn ref_norm(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

fn ref_rope(v: &mut [f64], pos: usize, rope: &Rope) {
    let h = rope.inv_freq.len();
    for head in v.chunks_exact_mut(2 * h) {
        for i in 0..h {
            let a = pos as f64 * rope.inv_freq[i] as f64;
            let (x, y) = (head[i], head[i + h]);
            head[i] = x * a.cos() - y * a.sin();
            head[i + h] = y * a.cos() + x * a.sin();
        }
    }
}

impl Reference {
    /// Logits of every token of `tokens` (positions 0..), the whole sequence at once.
    fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let sp = &self.spec;
        let (hd, d) = (sp.hidden, sp.head_dim);
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| self.embedding[t as usize * hd..(t as usize + 1) * hd].to_vec())
            .collect();
        for b in &self.blocks {
            let hs: Vec<Vec<f64>> = xs.iter().map(|x| ref_norm(x, &b.norms[0])).collect();
            let mut qs: Vec<Vec<f64>> = hs.iter().map(|h| b.q.apply(h)).collect();
            let mut ks: Vec<Vec<f64>> = hs.iter().map(|h| b.k.apply(h)).collect();
            let vs: Vec<Vec<f64>> = hs.iter().map(|h| b.v.apply(h)).collect();
            for (p, (q, k)) in qs.iter_mut().zip(ks.iter_mut()).enumerate() {
                ref_rope(q, p, &self.rope);
                ref_rope(k, p, &self.rope);
            }
            let group = sp.heads / sp.kv_heads;
            for p in 0..tokens.len() {
                let lo = sp.window.map_or(0, |w| (p + 1).saturating_sub(w));
                let mut attn = vec![0f64; sp.heads * d];
                for h in 0..sp.heads {
                    let kh = h / group;
                    let q = &qs[p][h * d..(h + 1) * d];
                    let s: Vec<f64> = (lo..=p)
                        .map(|j| {
                            let k = &ks[j][kh * d..(kh + 1) * d];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for (j, w) in (lo..=p).zip(&e) {
                        for i in 0..d {
                            attn[h * d + i] += w / total * vs[j][kh * d + i];
                        }
                    }
                }
                let o = b.o.apply(&attn);
                for (x, v) in xs[p].iter_mut().zip(&o) {
                    *x += v;
                }
            }
            for x in xs.iter_mut() {
                let h = ref_norm(x, &b.norms[1]);
                let g = b.gate.apply(&h);
                let u = b.up.apply(&h);
                let a: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                for (xv, dv) in x.iter_mut().zip(b.down.apply(&a)) {
                    *xv += dv;
                }
            }
        }
        xs.iter()
            .map(|x| self.head.apply(&ref_norm(x, &self.norm)))
            .collect()
    }
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| ((step(&mut s) >> 33) % vocab as u64) as u32)
        .collect()
}

/// Largest |engine - reference| over the largest |reference| of each token's logits.
fn worst(got: &[f32], want: &[Vec<f64>]) -> f64 {
    let vocab = want[0].len();
    want.iter()
        .enumerate()
        .map(|(t, w)| {
            let top = w.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = w.iter().enumerate().fold(0f64, |m, (i, v)| {
                m.max((got[t * vocab + i] as f64 - v).abs())
            });
            err / top
        })
        .fold(0f64, f64::max)
}

/// Prefill of `prefill` tokens (all logits), then single-token decode steps; every logit
/// against the reference over the whole sequence. Returns the worst relative error.
fn run(spec: Spec, isa: Isa, prefill: usize, decode: usize) -> f64 {
    let (mut engine, reference) = build(spec, 11, isa);
    let seq = tokens(prefill + decode, spec.vocab, 5);
    let want = reference.logits(&seq);
    let vocab = spec.vocab;
    let mut got = vec![0f32; prefill * vocab];
    engine
        .forward(&seq[..prefill], 0, Logits::All, &mut got)
        .unwrap();
    let mut err = worst(&got, &want[..prefill]);
    for t in prefill..prefill + decode {
        let mut one = vec![0f32; vocab];
        engine
            .forward(&seq[t..t + 1], t, Logits::Last, &mut one)
            .unwrap();
        err = err.max(worst(&one, &want[t..t + 1]));
    }
    assert_eq!(engine.cached_positions(), prefill + decode);
    err
}

/// Float mode (and dense layers): f32 rounding only. The bound, 1e-5 of the largest logit, is
/// about 100 f32 epsilons: sums of up to a few hundred terms in another order, through a
/// couple of layers.
const FLOAT_BOUND: f64 = 1e-5;

#[test]
fn float_engine_matches_the_reference() {
    for isa in Isa::supported() {
        let specs = [
            SMALL,
            Spec {
                tied: false,
                bias: true,
                window: Some(3),
                ..SMALL
            },
            Spec {
                dense: true,
                kv_heads: 1,
                ..SMALL
            },
            // head_dim not a power of two, no GQA, block 16, odd vocab and widths.
            Spec {
                hidden: 48,
                heads: 2,
                kv_heads: 2,
                head_dim: 24,
                intermediate: 80,
                block: 16,
                vocab: 31,
                tied: false,
                ..SMALL
            },
        ];
        for spec in specs {
            let err = run(spec, isa, 5, 4);
            assert!(err <= FLOAT_BOUND, "{isa:?}: relative error {err:e}");
        }
    }
}

#[test]
fn chunked_prefill_and_the_parallel_path_match() {
    // Wide enough that every product runs split on the pool, long enough for two chunks.
    let spec = Spec {
        hidden: 256,
        intermediate: 512,
        layers: 1,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        block: 64,
        vocab: 300,
        tied: false,
        max_positions: 80,
        ..SMALL
    };
    let err = run(spec, Isa::best(), MAX_BATCH + 7, 2);
    assert!(err <= FLOAT_BOUND, "relative error {err:e}");
}

#[test]
fn integer_modes_stay_within_their_bounds() {
    // Per product the int16 error is about 6e-5 and the int8 error about 7e-3 of sum |w x|;
    // through two blocks the logits move by a few times that.
    for (mode, bound) in [(Activations::Int16, 3e-4), (Activations::Int8, 3e-2)] {
        let err = run(
            Spec {
                activations: mode,
                ..SMALL
            },
            Isa::best(),
            4,
            3,
        );
        assert!(err <= bound, "{mode:?}: relative error {err:e}");
        assert!(err > 0.0);
    }
}

#[test]
fn rewinding_repeats_the_logits() {
    let (mut engine, _) = build(SMALL, 3, Isa::best());
    let seq = tokens(6, SMALL.vocab, 9);
    let vocab = SMALL.vocab;
    let mut first = vec![0f32; vocab];
    engine.forward(&seq, 0, Logits::Last, &mut first).unwrap();
    let mut again = vec![0f32; vocab];
    engine
        .forward(&seq[4..], 4, Logits::Last, &mut again)
        .unwrap();
    assert_eq!(first, again);
    engine.reset();
    assert_eq!(engine.cached_positions(), 0);
    engine.forward(&seq, 0, Logits::Last, &mut again).unwrap();
    assert_eq!(first, again);
}

#[test]
fn bad_input_is_an_error() {
    let (mut engine, _) = build(
        Spec {
            max_positions: 8,
            ..SMALL
        },
        3,
        Isa::best(),
    );
    let vocab = SMALL.vocab;
    let mut out = vec![0f32; vocab];
    assert!(engine.forward(&[], 0, Logits::Last, &mut out).is_err());
    assert!(engine
        .forward(&[vocab as u32], 0, Logits::Last, &mut out)
        .is_err());
    assert!(engine.forward(&[1, 2], 0, Logits::All, &mut out).is_err());
    assert!(engine.forward(&[1; 9], 0, Logits::Last, &mut out).is_err());
    engine.forward(&[1; 8], 0, Logits::Last, &mut out).unwrap();
    assert!(
        engine.forward(&[1], 8, Logits::Last, &mut out).is_err(),
        "cache full"
    );
    engine.reset();
    assert!(
        engine.forward(&[1], 1, Logits::Last, &mut out).is_err(),
        "past the cache"
    );
    // Shapes that do not fit the config.
    let (ok, _) = build(SMALL, 3, Isa::best());
    let mut config = ok.config().clone();
    config.num_kv_heads = 3;
    assert!(config.check().is_err());
    let spec = Spec {
        dense: true,
        ..SMALL
    };
    let s = &mut 1u64;
    let (wrong, _) = layer(&spec, 7, SMALL.hidden, s, false);
    let (config, mut weights, _) = parts(spec, 3);
    weights.blocks[1].k = wrong;
    let err = Llama::new(config, weights, Isa::best()).err().unwrap();
    assert!(err.to_string().contains("layers.1.k_proj"), "{err}");
}

/// Sylvester's orthonormal Hadamard matrix entry.
fn hadamard_entry(i: usize, j: usize, n: usize) -> f64 {
    let sign = if (i & j).count_ones() % 2 == 0 {
        1.0
    } else {
        -1.0
    };
    sign / (n as f64).sqrt()
}

#[test]
fn rotated_layers_with_outliers_match_the_reference() {
    let (n_out, n_in, block, group, batch) = (9, 64, 16, 32, 3);
    let book = Codebook::new(&NF4).unwrap();
    let s = &mut 4u64;
    let codes: Vec<u8> = (0..n_out * n_in / 2)
        .map(|_| (step(s) >> 56) as u8)
        .collect();
    let scales = lcg(n_out * n_in / block, step(s));
    let indices = [3u64, 70, 71, 300, 575];
    let deltas = [0.5f32, -1.0, 2.0, 0.25, -0.75];
    let x = lcg(batch * n_in, step(s));
    for isa in Isa::supported() {
        let linear = Linear::packed(
            n_out,
            n_in,
            codes.clone(),
            scales.clone(),
            book.clone(),
            block,
            Activations::Float,
        )
        .unwrap()
        .with_rotation(group)
        .unwrap()
        .with_outliers(&indices, &deltas)
        .unwrap()
        .with_bias((0..n_out).map(|o| o as f32).collect())
        .unwrap();
        let mut input = linear::Input::default();
        linear.prepare(isa, &x, batch, &mut input).unwrap();
        let mut out = vec![0f32; 5 * batch];
        linear.rows(&x, &input, batch, 2..7, &mut out, isa).unwrap();
        for o in 2..7 {
            for b in 0..batch {
                let xb = &x[b * n_in..(b + 1) * n_in];
                let mut want = o as f64;
                for i in 0..n_in {
                    let flat = o * n_in + i;
                    let byte = codes[flat / 2];
                    let c = if flat % 2 == 0 { byte >> 4 } else { byte & 15 };
                    let mut w = NF4[c as usize] as f64 * scales[flat / block] as f64;
                    if let Some(k) = indices.iter().position(|&j| j as usize == flat) {
                        w += deltas[k] as f64;
                    }
                    // (H x) at i, per group.
                    let g0 = i / group * group;
                    let hx: f64 = (0..group)
                        .map(|j| hadamard_entry(i - g0, j, group) * xb[g0 + j] as f64)
                        .sum();
                    want += w * hx;
                }
                let got = out[(o - 2) * batch + b] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{isa:?} row {o}: {got} vs {want}"
                );
            }
        }
    }
    let plain =
        Linear::packed(n_out, n_in, codes, scales, book, block, Activations::Float).unwrap();
    assert!(plain.clone().with_rotation(48).is_err());
    assert!(plain.clone().with_outliers(&[5, 5], &[1.0, 1.0]).is_err());
    assert!(plain
        .clone()
        .with_outliers(&[(n_out * n_in) as u64], &[1.0])
        .is_err());
    assert!(plain.with_bias(vec![0.0; 3]).is_err());
}
