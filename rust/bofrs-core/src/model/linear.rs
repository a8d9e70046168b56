//! One linear layer of the engine, prepared once: `y = x @ W.T (+ bias)` with `W` block-wise
//! packed (the fused matvec kernels, optionally with a Hadamard rotation of the input and
//! OPQ outliers as a sparse correction) or dense f32.
//!
//! A product runs in two steps so that the engine can share work and split rows over its pool:
//! [`Linear::prepare`] turns the input rows into what the kernels read (an [`Input`], shared by
//! every layer whose [`Linear::input_key`] is equal), then [`Linear::rows`] computes any run of
//! output rows from it.

use crate::blockwise::codebook::Codebook;
use crate::blockwise::matvec::{
    matvec_prepared, preferred_isa, Activations, MatShape, PackedMatrix, PreparedInput,
};
use crate::error::{check_len, Error, Result};
use crate::isa::Isa;
use crate::numeric::hadamard;
use std::ops::Range;
use std::sync::Arc;

/// A block-wise packed weight `[out, in]` (row-major codes, one f32 scale per block).
#[derive(Debug, Clone)]
pub struct Packed {
    codes: Vec<u8>,
    scales: Vec<f32>,
    codebook: Codebook,
    block_size: usize,
    activations: Activations,
    rotation: Option<usize>,
    outliers: Option<Outliers>,
}

/// OPQ outliers as per-row corrections: `y[r] += x[cols[k]] * deltas[k]` for `k` in
/// `starts[r]..starts[r + 1]`, where `delta` is the outlier's value minus the value its code
/// decodes to.
#[derive(Debug, Clone)]
struct Outliers {
    starts: Vec<usize>,
    cols: Vec<u32>,
    deltas: Vec<f32>,
}

/// The weight of a [`Linear`].
#[derive(Debug, Clone)]
pub enum Weight {
    /// Block-wise packed: the fused kernels.
    Packed(Box<Packed>),
    /// Dense f32 `[out, in]`, row-major (shared, for an output layer tied to the embeddings).
    Dense(Arc<[f32]>),
}

/// A linear layer without its input: shape, weight, optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    out_features: usize,
    in_features: usize,
    weight: Weight,
    bias: Option<Vec<f32>>,
}

/// What a layer's input is prepared as; layers with equal keys share one [`Input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKey {
    /// Dense weights read the f32 rows as they are.
    Dense,
    /// Packed weights: the prepared activations of a mode, codebook and block-size class, of
    /// the input rotated per group of `rotation` values (or not rotated).
    Packed {
        activations: Activations,
        levels: [u32; 16],
        wide: bool,
        rotation: Option<usize>,
    },
}

/// A layer input prepared for the kernels (buffers reused from one product to the next).
#[derive(Default)]
pub struct Input {
    key: Option<InputKey>,
    /// The input rotated per group (only for rotated weights).
    rotated: Vec<f32>,
    prepared: PreparedInput,
}

impl Input {
    /// Forgets what was prepared (the buffers are kept).
    pub fn invalidate(&mut self) {
        self.key = None;
    }
}

impl Linear {
    /// A packed layer `[out_features, in_features]`: `codes` (`out * in / 2` bytes, row-major,
    /// high nibble first), one finite f32 `scales` per block of `block_size` values (which must
    /// divide `in_features`), the codebook, and the activation mode of its products.
    pub fn packed(
        out_features: usize,
        in_features: usize,
        codes: Vec<u8>,
        scales: Vec<f32>,
        codebook: Codebook,
        block_size: usize,
        activations: Activations,
    ) -> Result<Linear> {
        let shape = MatShape::new(out_features, in_features, block_size);
        shape.check(1, codes.len(), scales.len(), in_features, out_features)?;
        crate::blockwise::matvec::check_scales(&scales)?;
        let weight = Weight::Packed(Box::new(Packed {
            codes,
            scales,
            codebook,
            block_size,
            activations,
            rotation: None,
            outliers: None,
        }));
        Ok(Linear {
            out_features,
            in_features,
            weight,
            bias: None,
        })
    }

    /// A dense layer: `weight` holds `out_features * in_features` finite f32 values, row-major.
    pub fn dense(out_features: usize, in_features: usize, weight: Arc<[f32]>) -> Result<Linear> {
        let n = out_features
            .checked_mul(in_features)
            .ok_or_else(|| Error::invalid("weight", "sizes overflow"))?;
        check_len("weight", n, weight.len())?;
        if let Some(i) = weight.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("weight", format!("value {i} is not finite")));
        }
        Ok(Linear {
            out_features,
            in_features,
            weight: Weight::Dense(weight),
            bias: None,
        })
    }

    /// Adds a bias (`out_features` finite values).
    pub fn with_bias(mut self, bias: Vec<f32>) -> Result<Linear> {
        check_len("bias", self.out_features, bias.len())?;
        if let Some(i) = bias.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid("bias", format!("value {i} is not finite")));
        }
        self.bias = Some(bias);
        Ok(self)
    }

    /// Marks a packed weight as stored rotated per group of `group` input values (the codes
    /// encode `hadamard(W)`): the input is rotated the same way before the product.
    pub fn with_rotation(mut self, group: usize) -> Result<Linear> {
        hadamard::check_size(group)?;
        if self.in_features % group != 0 {
            return Err(Error::invalid(
                "rotation",
                format!(
                    "group {group} does not divide in_features={}",
                    self.in_features
                ),
            ));
        }
        self.packed_mut("rotation", "only packed weights are rotated")?
            .rotation = Some(group);
        Ok(self)
    }

    /// Adds OPQ outliers of a packed weight: flat indices `row * in_features + col` (strictly
    /// increasing) and the difference between each outlier's value and its code's decoded value
    /// (in the rotated frame for rotated weights).
    pub fn with_outliers(mut self, indices: &[u64], deltas: &[f32]) -> Result<Linear> {
        check_len("outlier deltas", indices.len(), deltas.len())?;
        let n = (self.out_features * self.in_features) as u64;
        if let Some(k) = indices.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::invalid(
                "outlier indices",
                format!("not strictly increasing at {}", k + 1),
            ));
        }
        if let Some(&last) = indices.last() {
            if last >= n {
                return Err(Error::invalid(
                    "outlier indices",
                    format!("index {last} is outside the {n} weights"),
                ));
            }
        }
        if let Some(i) = deltas.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "outlier deltas",
                format!("value {i} is not finite"),
            ));
        }
        let cols_n = self.in_features as u64;
        let mut starts = vec![0usize; self.out_features + 1];
        for &i in indices {
            starts[(i / cols_n) as usize + 1] += 1;
        }
        for r in 0..self.out_features {
            starts[r + 1] += starts[r];
        }
        let outliers = Outliers {
            starts,
            cols: indices.iter().map(|&i| (i % cols_n) as u32).collect(),
            deltas: deltas.to_vec(),
        };
        self.packed_mut("outliers", "only packed weights have outliers")?
            .outliers = Some(outliers);
        Ok(self)
    }

    /// The packed weight, or an error naming `name` for a dense one.
    fn packed_mut(&mut self, name: &'static str, message: &str) -> Result<&mut Packed> {
        match &mut self.weight {
            Weight::Packed(p) => Ok(p),
            Weight::Dense(_) => Err(Error::invalid(name, message)),
        }
    }

    /// Output features (rows of the weight).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns of the weight).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// What this layer's input is prepared as (layers with equal keys share an [`Input`]).
    pub fn input_key(&self) -> InputKey {
        match &self.weight {
            Weight::Dense(_) => InputKey::Dense,
            Weight::Packed(p) => InputKey::Packed {
                activations: p.activations,
                levels: p.codebook.levels().map(f32::to_bits),
                wide: p.block_size >= 64,
                rotation: p.rotation,
            },
        }
    }

    /// Prepares `batch` rows `x` (`batch * in_features` values) in `input` for this layer (and
    /// every layer of the same [`Linear::input_key`]).
    pub fn prepare(&self, isa: Isa, x: &[f32], batch: usize, input: &mut Input) -> Result<()> {
        let key = self.input_key();
        input.key = None;
        if let Weight::Packed(p) = &self.weight {
            let rows = match p.rotation {
                Some(group) => {
                    input.rotated.clear();
                    input.rotated.extend_from_slice(x);
                    for chunk in input.rotated.chunks_exact_mut(group) {
                        hadamard::transform_one(isa, chunk);
                    }
                    &input.rotated[..]
                }
                None => x,
            };
            input.prepared.prepare(
                preferred_isa(isa, p.activations),
                p.activations,
                &p.codebook,
                p.block_size,
                batch,
                rows,
            )?;
        }
        input.key = Some(key);
        Ok(())
    }

    /// Output rows `rows` of the product with `batch` input rows: `out[(o - rows.start) * batch +
    /// b]` for `o` in `rows` (by output row). `x` is the input as given to [`Linear::prepare`],
    /// `input` what it prepared.
    pub fn rows(
        &self,
        x: &[f32],
        input: &Input,
        batch: usize,
        rows: Range<usize>,
        out: &mut [f32],
        isa: Isa,
    ) -> Result<()> {
        if input.key != Some(self.input_key()) {
            return Err(Error::invalid("input", "not prepared for this layer"));
        }
        let n_in = self.in_features;
        if rows.end > self.out_features || rows.start > rows.end || x.len() != batch * n_in {
            return Err(Error::invalid(
                "rows",
                format!("{rows:?} of {} with {batch} inputs", self.out_features),
            ));
        }
        match &self.weight {
            Weight::Dense(w) => {
                super::dense::rows(
                    isa,
                    &w[rows.start * n_in..rows.end * n_in],
                    n_in,
                    x,
                    batch,
                    out,
                );
            }
            Weight::Packed(p) => {
                let (bytes_per_row, scales_per_row) = (n_in / 2, n_in / p.block_size);
                let part = PackedMatrix {
                    shape: MatShape::new(rows.len(), n_in, p.block_size),
                    codes: &p.codes[rows.start * bytes_per_row..rows.end * bytes_per_row],
                    scales: &p.scales[rows.start * scales_per_row..rows.end * scales_per_row],
                    codebook: &p.codebook,
                };
                matvec_prepared(&part, &input.prepared, out)?;
                if let Some(o) = &p.outliers {
                    let xr = if p.rotation.is_some() {
                        &input.rotated[..]
                    } else {
                        x
                    };
                    for (r, y) in rows.clone().zip(out.chunks_exact_mut(batch)) {
                        for k in o.starts[r]..o.starts[r + 1] {
                            let (c, d) = (o.cols[k] as usize, o.deltas[k]);
                            for (b, yb) in y.iter_mut().enumerate() {
                                *yb += xr[b * n_in + c] * d;
                            }
                        }
                    }
                }
            }
        }
        if let Some(bias) = &self.bias {
            for (y, &bv) in out.chunks_exact_mut(batch).zip(&bias[rows]) {
                for yb in y {
                    *yb += bv;
                }
            }
        }
        Ok(())
    }
}
