//! `pack` / `unpack` over numpy arrays.

use crate::detach::run;
use crate::runtime::parse_isa;
use bofrs_core::buffer::zeroed_vec;
use bofrs_core::decode::{unpack_with_isa, Output};
use bofrs_core::encode::{pack_with_isa, EncodeOptions};
use bofrs_core::{Bf16, BlockLayout, Codebook, Element, Normalization, ScaleDType, F16};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

type Packed<'py> = (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>);

pub(crate) fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous 1-D array")))
}

fn codebook_from(levels: &PyReadonlyArray1<'_, f32>) -> PyResult<Codebook> {
    Codebook::new(contiguous(levels, "levels")?).map_err(crate::errors::to_py)
}

/// Views raw u16 bits as a 16-bit float element type (both are `repr(transparent)` over u16).
pub(crate) fn as_halfs<T>(bits: &[u16]) -> &[T] {
    debug_assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: T is Bf16 or F16, `repr(transparent)` wrappers of u16 with the same layout.
    unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const T, bits.len()) }
}

fn as_halfs_mut<T>(bits: &mut [u16]) -> &mut [T] {
    debug_assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: as in `as_halfs`.
    unsafe { std::slice::from_raw_parts_mut(bits.as_mut_ptr() as *mut T, bits.len()) }
}

fn pack_slice<'py, E: Element>(
    py: Python<'py>,
    data: &[E],
    options: EncodeOptions<'_>,
    isa: bofrs_core::Isa,
) -> PyResult<Packed<'py>> {
    let layout = BlockLayout::new(data.len(), options.block_size).map_err(crate::errors::to_py)?;
    let (codes, scales) = run(py, || {
        let mut codes = zeroed_vec::<u8>(layout.code_bytes());
        let mut scales = vec![0f32; layout.num_blocks()];
        pack_with_isa(isa, data, &options, &mut codes, &mut scales)?;
        Ok((codes, scales))
    })?;
    Ok((codes.into_pyarray(py), scales.into_pyarray(py)))
}

/// Packs a flat float array into 4-bit codes and per-block scales.
///
/// `data` is float32, or uint16 bits of bfloat16 / float16 (named by `element`). Returns
/// `(codes, scales)`: `ceil(n/2)` bytes and one float32 scale per block, already rounded to
/// `scale_dtype`.
#[pyfunction]
#[pyo3(signature = (data, element, levels, block_size, normalization, scale_dtype, isa=None))]
#[allow(clippy::too_many_arguments)]
fn pack<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    element: &str,
    levels: PyReadonlyArray1<'py, f32>,
    block_size: usize,
    normalization: &str,
    scale_dtype: &str,
    isa: Option<&str>,
) -> PyResult<Packed<'py>> {
    let codebook = codebook_from(&levels)?;
    let options = EncodeOptions {
        codebook: &codebook,
        block_size,
        normalization: Normalization::parse(normalization).map_err(crate::errors::to_py)?,
        scale_dtype: ScaleDType::parse(scale_dtype).map_err(crate::errors::to_py)?,
    };
    let isa = parse_isa(isa)?;
    match element {
        "float32" => {
            let arr: PyReadonlyArray1<'py, f32> = data.extract()?;
            pack_slice(py, contiguous(&arr, "data")?, options, isa)
        }
        "bfloat16" | "float16" => {
            let arr: PyReadonlyArray1<'py, u16> = data.extract()?;
            let bits = contiguous(&arr, "data")?;
            if element == "bfloat16" {
                pack_slice(py, as_halfs::<Bf16>(bits), options, isa)
            } else {
                pack_slice(py, as_halfs::<F16>(bits), options, isa)
            }
        }
        other => Err(PyTypeError::new_err(format!(
            "element must be 'float32', 'bfloat16' or 'float16', got {other:?}"
        ))),
    }
}

fn unpack_into<O: Output>(
    py: Python<'_>,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    block_size: usize,
    out: &mut [O],
    isa: bofrs_core::Isa,
) -> PyResult<()> {
    run(py, || {
        unpack_with_isa(isa, codes, scales, codebook, block_size, out)
    })
}

/// Decodes codes and scales back to `numel` values: float32, or uint16 bits of bfloat16 /
/// float16 (named by `out_dtype`).
#[pyfunction]
#[pyo3(signature = (codes, scales, levels, block_size, numel, out_dtype, isa=None))]
#[allow(clippy::too_many_arguments)]
fn unpack<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    scales: PyReadonlyArray1<'py, f32>,
    levels: PyReadonlyArray1<'py, f32>,
    block_size: usize,
    numel: usize,
    out_dtype: &str,
    isa: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let codebook = codebook_from(&levels)?;
    let isa = parse_isa(isa)?;
    let (c, s) = (contiguous(&codes, "codes")?, contiguous(&scales, "scales")?);
    match out_dtype {
        "float32" => {
            let mut out = zeroed_vec::<f32>(numel);
            unpack_into(py, c, s, &codebook, block_size, &mut out, isa)?;
            Ok(out.into_pyarray(py).into_any())
        }
        "bfloat16" | "float16" => {
            let mut out = zeroed_vec::<u16>(numel);
            if out_dtype == "bfloat16" {
                unpack_into(
                    py,
                    c,
                    s,
                    &codebook,
                    block_size,
                    as_halfs_mut::<Bf16>(&mut out),
                    isa,
                )?;
            } else {
                unpack_into(
                    py,
                    c,
                    s,
                    &codebook,
                    block_size,
                    as_halfs_mut::<F16>(&mut out),
                    isa,
                )?;
            }
            Ok(out.into_pyarray(py).into_any())
        }
        other => Err(PyTypeError::new_err(format!(
            "out_dtype must be 'float32', 'bfloat16' or 'float16', got {other:?}"
        ))),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    Ok(())
}
