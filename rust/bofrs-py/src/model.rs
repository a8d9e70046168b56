//! The native Llama decoder: a builder that takes the weights once (numpy arrays), and the
//! engine whose `forward` runs a whole pass of new tokens without the interpreter.

use crate::convert::{codebook, contiguous, isa_or_best, Parsed};
use crate::detach::run;
use crate::errors::to_py;
use bofrs_core::blockwise::matvec::Activations;
use bofrs_core::model::{Block, Linear, Llama, LlamaConfig, Logits, Rope, Weights};
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::Isa;
use numpy::{IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::Arc;

/// The projections of a block, by their transformers names.
const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// The norms of a block.
const NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// The parts of one block given so far.
#[derive(Default)]
struct Parts {
    linears: [Option<Linear>; 7],
    norms: [Option<Vec<f32>>; 2],
}

/// Collects a decoder's configuration and weights, then builds a `LlamaEngine`.
#[pyclass(module = "bofrs._native")]
pub struct LlamaBuilder {
    config: LlamaConfig,
    embedding: Option<Arc<[f32]>>,
    blocks: Vec<Parts>,
    norm: Option<Vec<f32>>,
    lm_head: Option<Linear>,
}

fn index(names: &[&str], name: &str, what: &str) -> PyResult<usize> {
    names.iter().position(|&n| n == name).ok_or_else(|| {
        PyValueError::new_err(format!("{what} must be one of {names:?}, got {name:?}"))
    })
}

impl LlamaBuilder {
    /// The slot of a projection: block `layer`'s `name`, or `lm_head` (no layer).
    fn linear_slot(&mut self, layer: Option<usize>, name: &str) -> PyResult<&mut Option<Linear>> {
        match layer {
            None if name == "lm_head" => Ok(&mut self.lm_head),
            None => Err(PyValueError::new_err(format!(
                "without a layer the only projection is 'lm_head', got {name:?}"
            ))),
            Some(l) => {
                let layers = self.blocks.len();
                let k = index(&PROJECTIONS, name, "name")?;
                let block = self.blocks.get_mut(l).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "layer {l} is out of range (num_layers={layers})"
                    ))
                })?;
                Ok(&mut block.linears[k])
            }
        }
    }
}

/// An optional float32 array as a vector.
fn vector(a: Option<PyReadonlyArray1<'_, f32>>, name: &str) -> PyResult<Option<Vec<f32>>> {
    a.map(|a| contiguous(&a, name).map(<[f32]>::to_vec))
        .transpose()
}

#[pymethods]
impl LlamaBuilder {
    /// A builder for a decoder of these dimensions; `inv_freq` (head_dim / 2 float32 values) and
    /// `attention_scaling` are the rotary embedding's table, `max_positions` the KV cache length.
    #[new]
    #[pyo3(signature = (*, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size, rms_norm_eps, inv_freq, attention_scaling, sliding_window, max_positions))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        vocab_size: usize,
        rms_norm_eps: f32,
        inv_freq: PyReadonlyArray1<'_, f32>,
        attention_scaling: f32,
        sliding_window: Option<usize>,
        max_positions: usize,
    ) -> PyResult<Self> {
        let config = LlamaConfig {
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope: Rope {
                inv_freq: contiguous(&inv_freq, "inv_freq")?.to_vec(),
                attention_scaling,
            },
            sliding_window,
            max_positions,
        };
        config.check().map_err(to_py)?;
        Ok(LlamaBuilder {
            blocks: (0..num_layers).map(|_| Parts::default()).collect(),
            config,
            embedding: None,
            norm: None,
            lm_head: None,
        })
    }

    /// The token embedding, `vocab_size * hidden_size` float32 values (row-major).
    fn embedding(&mut self, values: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        self.embedding = Some(Arc::from(contiguous(&values, "values")?));
        Ok(())
    }

    /// A norm weight: block `layer`'s `name` (`input_layernorm`, `post_attention_layernorm`),
    /// or the final `norm` (no layer).
    #[pyo3(signature = (layer, name, values))]
    fn norm(
        &mut self,
        layer: Option<usize>,
        name: &str,
        values: PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        let values = contiguous(&values, "values")?.to_vec();
        match layer {
            None if name == "norm" => self.norm = Some(values),
            None => {
                return Err(PyValueError::new_err(format!(
                    "without a layer the only norm is 'norm', got {name:?}"
                )))
            }
            Some(l) => {
                let k = index(&NORMS, name, "name")?;
                let layers = self.blocks.len();
                let block = self.blocks.get_mut(l).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "layer {l} is out of range (num_layers={layers})"
                    ))
                })?;
                block.norms[k] = Some(values);
            }
        }
        Ok(())
    }

    /// A block-wise packed projection (block `layer`'s `name`, or `lm_head` without a layer):
    /// codes, float32 scales per block, the 16 levels, the activation mode; optionally a bias,
    /// the Hadamard rotation group, and OPQ outliers as flat indices (uint64, increasing) with
    /// their differences from the decoded codes.
    #[pyo3(signature = (layer, name, out_features, in_features, codes, scales, levels, block_size, activations, bias=None, rotation=None, outlier_indices=None, outlier_deltas=None))]
    #[allow(clippy::too_many_arguments)]
    fn packed_linear(
        &mut self,
        layer: Option<usize>,
        name: &str,
        out_features: usize,
        in_features: usize,
        codes: PyReadonlyArray1<'_, u8>,
        scales: PyReadonlyArray1<'_, f32>,
        levels: PyReadonlyArray1<'_, f32>,
        block_size: usize,
        activations: Parsed<Activations>,
        bias: Option<PyReadonlyArray1<'_, f32>>,
        rotation: Option<usize>,
        outlier_indices: Option<PyReadonlyArray1<'_, u64>>,
        outlier_deltas: Option<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<()> {
        let slot = self.linear_slot(layer, name)?;
        let mut linear = Linear::packed(
            out_features,
            in_features,
            contiguous(&codes, "codes")?.to_vec(),
            contiguous(&scales, "scales")?.to_vec(),
            codebook(&levels)?,
            block_size,
            activations.0,
        )
        .map_err(to_py)?;
        if let Some(group) = rotation {
            linear = linear.with_rotation(group).map_err(to_py)?;
        }
        match (outlier_indices, outlier_deltas) {
            (Some(i), Some(d)) => {
                let (i, d) = (
                    contiguous(&i, "outlier_indices")?,
                    contiguous(&d, "outlier_deltas")?,
                );
                linear = linear.with_outliers(i, d).map_err(to_py)?;
            }
            (None, None) => {}
            _ => {
                return Err(PyValueError::new_err(
                    "outlier_indices and outlier_deltas go together",
                ))
            }
        }
        if let Some(b) = vector(bias, "bias")? {
            linear = linear.with_bias(b).map_err(to_py)?;
        }
        *slot = Some(linear);
        Ok(())
    }

    /// A dense float32 projection `[out_features, in_features]` (row-major), optionally with a
    /// bias; names as `packed_linear`.
    #[pyo3(signature = (layer, name, out_features, in_features, weight, bias=None))]
    fn dense_linear(
        &mut self,
        layer: Option<usize>,
        name: &str,
        out_features: usize,
        in_features: usize,
        weight: PyReadonlyArray1<'_, f32>,
        bias: Option<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<()> {
        let slot = self.linear_slot(layer, name)?;
        let weight: Arc<[f32]> = Arc::from(contiguous(&weight, "weight")?);
        let mut linear = Linear::dense(out_features, in_features, weight).map_err(to_py)?;
        if let Some(b) = vector(bias, "bias")? {
            linear = linear.with_bias(b).map_err(to_py)?;
        }
        *slot = Some(linear);
        Ok(())
    }

    /// The engine (the builder is emptied). Without an `lm_head` the output projection is tied
    /// to the embedding. `isa` picks the kernel variant (default: the best of this CPU).
    #[pyo3(signature = (isa=None))]
    fn build(&mut self, py: Python<'_>, isa: Option<Parsed<Isa>>) -> PyResult<LlamaEngine> {
        let missing = |what: String| PyValueError::new_err(format!("{what} was not given"));
        let embedding = self
            .embedding
            .take()
            .ok_or_else(|| missing("the embedding".into()))?;
        let norm = self
            .norm
            .take()
            .ok_or_else(|| missing("the final norm".into()))?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (l, parts) in std::mem::take(&mut self.blocks).into_iter().enumerate() {
            let [q, k, v, o, gate, up, down] = parts.linears;
            let take = |x: Option<Linear>, name: &str| {
                x.ok_or_else(|| missing(format!("layers.{l}.{name}")))
            };
            let (q, k, v, o) = (
                take(q, "q_proj")?,
                take(k, "k_proj")?,
                take(v, "v_proj")?,
                take(o, "o_proj")?,
            );
            let (gate, up, down) = (
                take(gate, "gate_proj")?,
                take(up, "up_proj")?,
                take(down, "down_proj")?,
            );
            let [n1, n2] = parts.norms;
            blocks.push(Block {
                input_norm: n1.ok_or_else(|| missing(format!("layers.{l}.input_layernorm")))?,
                post_attention_norm: n2
                    .ok_or_else(|| missing(format!("layers.{l}.post_attention_layernorm")))?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let weights = Weights {
            embedding,
            blocks,
            norm,
            lm_head: self.lm_head.take(),
        };
        let config = self.config.clone();
        let isa = isa_or_best(isa);
        let model = run(py, move || Llama::new(config, weights, isa))?;
        Ok(LlamaEngine { model })
    }
}

/// A Llama-architecture decoder with its KV cache; `forward` runs a pass of new tokens.
#[pyclass(module = "bofrs._native")]
pub struct LlamaEngine {
    model: Llama,
}

#[pymethods]
impl LlamaEngine {
    /// Logits (float32 `[1, vocab_size]`, or `[tokens, vocab_size]` with `all_logits`) of
    /// `token_ids` (int64) at positions `position..position + tokens`. `position` defaults to
    /// the cached positions (continue); a smaller one drops the cache from there, 0 starts over.
    #[pyo3(signature = (token_ids, position=None, all_logits=false))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        token_ids: PyReadonlyArray1<'py, i64>,
        position: Option<usize>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let ids = contiguous(&token_ids, "token_ids")?;
        let tokens = ids
            .iter()
            .map(|&t| u32::try_from(t))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| PyValueError::new_err("token_ids must be in 0..vocab_size"))?;
        let vocab = self.model.config().vocab_size;
        let start = position.unwrap_or_else(|| self.model.cached_positions());
        let (rows, logits) = if all_logits {
            (tokens.len(), Logits::All)
        } else {
            (1, Logits::Last)
        };
        let model = &mut self.model;
        let out = run(py, move || {
            let mut out = zeroed_vec::<f32>(rows * vocab);
            model.forward(&tokens, start, logits, &mut out)?;
            Ok(out)
        })?;
        out.into_pyarray(py).reshape([rows, vocab])
    }

    /// Empties the KV cache.
    fn reset(&mut self) {
        self.model.reset();
    }

    /// Positions the KV cache holds.
    #[getter]
    fn cached_positions(&self) -> usize {
        self.model.cached_positions()
    }

    /// Positions the KV cache can hold.
    #[getter]
    fn max_positions(&self) -> usize {
        self.model.config().max_positions
    }

    /// Token ids are `0..vocab_size`.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LlamaBuilder>()?;
    m.add_class::<LlamaEngine>()?;
    Ok(())
}
