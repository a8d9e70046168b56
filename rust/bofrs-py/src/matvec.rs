//! The fused 4-bit matrix-vector product over numpy arrays.

use crate::convert::{
    codebook, contiguous, isa_or_best, with_floats, ElementName, FloatArray, Parsed,
};
use crate::detach::run;
use bofrs_core::blockwise::matvec::{matvec_with_options, Activations, MatShape, PackedMatrix};
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::{Element, Isa};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The product of `weight` with `batch` activation rows `x`, into a new vector.
fn product<X: Element>(
    py: Python<'_>,
    (isa, activations): (Isa, Activations),
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
) -> PyResult<Vec<f32>> {
    // Validate before allocating the output (its size comes from the caller's numbers).
    let n_out = batch
        .checked_mul(weight.shape.out_features)
        .ok_or_else(|| PyValueError::new_err("batch * out_features overflows"))?;
    weight
        .shape
        .check(
            batch,
            weight.codes.len(),
            weight.scales.len(),
            x.len(),
            n_out,
        )
        .map_err(crate::errors::to_py)?;
    run(py, || {
        let mut out = zeroed_vec::<f32>(n_out);
        matvec_with_options(isa, activations, weight, batch, x, &mut out)?;
        Ok(out)
    })
}

/// `y[b, o] = sum_i x[b, i] * W[o, i]` for a weight `[out_features, in_features]` packed
/// row-major (codes, float32 scales per block, 16 levels), without decoding the weight.
///
/// `x` is float32, or uint16 bits of bfloat16 / float16 (named by `element`), `batch` rows of
/// `in_features` values; returns float32 `batch * out_features` values (row-major).
/// `activations`: `"float"` (default: exact f32 products), `"int16"` (activations quantized
/// per 64 values, integer dot products: faster, relative error about 6e-5) or `"int8"` (per 32
/// values: the fastest, relative error about 7e-3).
#[pyfunction]
#[pyo3(signature = (x, element, batch, codes, scales, levels, out_features, in_features, block_size, isa=None, activations=None))]
#[allow(clippy::too_many_arguments)]
fn matvec<'py>(
    py: Python<'py>,
    x: FloatArray<'py>,
    element: ElementName,
    batch: usize,
    codes: PyReadonlyArray1<'py, u8>,
    scales: PyReadonlyArray1<'py, f32>,
    levels: PyReadonlyArray1<'py, f32>,
    out_features: usize,
    in_features: usize,
    block_size: usize,
    isa: Option<Parsed<Isa>>,
    activations: Option<Parsed<Activations>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let codebook = codebook(&levels)?;
    let mode = (
        isa_or_best(isa),
        activations.map_or(Activations::Float, |a| a.0),
    );
    let weight = PackedMatrix {
        shape: MatShape {
            out_features,
            in_features,
            block_size,
        },
        codes: contiguous(&codes, "codes")?,
        scales: contiguous(&scales, "scales")?,
        codebook: &codebook,
    };
    let out = with_floats!(x.view(element, "x")?, |x| product(
        py, mode, &weight, batch, x
    ))?;
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(matvec, m)?)?;
    Ok(())
}
