//! The fused 4-bit matrix-vector product over numpy arrays.

use crate::detach::run;
use crate::runtime::parse_isa;
use bofrs_core::blockwise::matvec::{matvec_with_options, Activation, Activations, MatShape};
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::{Bf16, Codebook, Isa, F16};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous 1-D array")))
}

/// Views raw u16 bits as a 16-bit float element type (both are `repr(transparent)` over u16).
fn as_halfs<T>(bits: &[u16]) -> &[T] {
    debug_assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: T is Bf16 or F16, `repr(transparent)` wrappers of u16 with the same layout.
    unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const T, bits.len()) }
}

#[allow(clippy::too_many_arguments)]
fn product<X: Activation>(
    py: Python<'_>,
    isa: Isa,
    activations: Activations,
    shape: MatShape,
    batch: usize,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    x: &[X],
) -> PyResult<Vec<f32>> {
    // Validate before allocating the output (its size comes from the caller's numbers).
    let n_out = batch
        .checked_mul(shape.out_features)
        .ok_or_else(|| PyValueError::new_err("batch * out_features overflows"))?;
    shape
        .check(batch, codes.len(), scales.len(), x.len(), n_out)
        .map_err(crate::errors::to_py)?;
    run(py, || {
        let mut out = zeroed_vec::<f32>(n_out);
        matvec_with_options(
            isa,
            activations,
            shape,
            batch,
            codes,
            scales,
            codebook,
            x,
            &mut out,
        )?;
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
    x: &Bound<'py, PyAny>,
    element: &str,
    batch: usize,
    codes: PyReadonlyArray1<'py, u8>,
    scales: PyReadonlyArray1<'py, f32>,
    levels: PyReadonlyArray1<'py, f32>,
    out_features: usize,
    in_features: usize,
    block_size: usize,
    isa: Option<&str>,
    activations: Option<&str>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let codebook = Codebook::new(contiguous(&levels, "levels")?).map_err(crate::errors::to_py)?;
    let isa = parse_isa(isa)?;
    let activations = match activations {
        None => Activations::Float,
        Some(name) => Activations::parse(name).ok_or_else(|| {
            let names: Vec<String> = Activations::ALL
                .iter()
                .map(|a| format!("'{}'", a.name()))
                .collect();
            PyValueError::new_err(format!(
                "activations must be one of {}, got {name:?}",
                names.join(", ")
            ))
        })?,
    };
    let shape = MatShape {
        out_features,
        in_features,
        block_size,
    };
    let (c, s) = (contiguous(&codes, "codes")?, contiguous(&scales, "scales")?);
    let out = match element {
        "float32" => {
            let arr: PyReadonlyArray1<'py, f32> = x.extract()?;
            product(
                py,
                isa,
                activations,
                shape,
                batch,
                c,
                s,
                &codebook,
                contiguous(&arr, "x")?,
            )?
        }
        "bfloat16" | "float16" => {
            let arr: PyReadonlyArray1<'py, u16> = x.extract()?;
            let bits = contiguous(&arr, "x")?;
            if element == "bfloat16" {
                product(
                    py,
                    isa,
                    activations,
                    shape,
                    batch,
                    c,
                    s,
                    &codebook,
                    as_halfs::<Bf16>(bits),
                )?
            } else {
                product(
                    py,
                    isa,
                    activations,
                    shape,
                    batch,
                    c,
                    s,
                    &codebook,
                    as_halfs::<F16>(bits),
                )?
            }
        }
        other => {
            return Err(PyTypeError::new_err(format!(
                "element must be 'float32', 'bfloat16' or 'float16', got {other:?}"
            )))
        }
    };
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(matvec, m)?)?;
    Ok(())
}
