//! `pack_ext` / `unpack` over numpy arrays.

use crate::convert::{
    codebook, contiguous, isa_or_best, with_floats, ElementName, FloatArray, IndexArray, OutDType,
    Parsed, ScaleArray, ScaleFormat,
};
use crate::detach::run;
use bofrs_core::blockwise::decode::{unpack_with_isa, OutlierView, Packed};
use bofrs_core::blockwise::dq::decode_scales as dq_decode_scales;
use bofrs_core::blockwise::encode::{
    pack_ext_parts_with_isa, split_outliers, EncodeOptions, PackExtras, PackOutput,
};
use bofrs_core::blockwise::opq::{OpqOptions, OutlierDType};
use bofrs_core::blockwise::scale::storage_bits;
use bofrs_core::numeric::element::{Half, Kind};
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::{Bf16, BlockLayout, Element, Isa, Normalization, ScaleDType, F16};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// What `pack_ext` returns: codes, scales (uint16 bits for bfloat16 / float16 scales, else
/// decoded float32), dq8 scale bytes and group parameters (`None` without double
/// quantization), outlier indices (uint16 / uint32 / uint64 array, see [`Indices`]) and values
/// (u16 bits).
type PackedExt<'py> = (
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyArray1<u8>>>,
    Option<Bound<'py, PyArray1<f32>>>,
    Bound<'py, PyAny>,
    Bound<'py, PyArray1<u16>>,
);

/// Outlier flat indices in the smallest unsigned type that holds every index of `numel`
/// values (the type `bofrs._outliers.index_dtype` names).
enum Indices {
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

impl Indices {
    /// Splits `(index, value)` parts (in flat order, see `pack_ext_parts_with_isa`) into
    /// indices of the type for `numel` values and values, in parallel.
    fn split(parts: &[Vec<bofrs_core::blockwise::opq::Outlier>], numel: usize) -> (Self, Vec<u16>) {
        let total = parts.iter().map(Vec::len).sum();
        let mut values = zeroed_vec::<u16>(total);
        // Every index is below `numel`, so the narrowing casts are exact.
        let indices = if numel <= 1 << 16 {
            let mut i = zeroed_vec::<u16>(total);
            split_outliers(parts, |x| x as u16, &mut i, &mut values);
            Self::U16(i)
        } else if numel as u64 <= 1 << 32 {
            let mut i = zeroed_vec::<u32>(total);
            split_outliers(parts, |x| x as u32, &mut i, &mut values);
            Self::U32(i)
        } else {
            let mut i = zeroed_vec::<u64>(total);
            split_outliers(parts, |x| x, &mut i, &mut values);
            Self::U64(i)
        };
        (indices, values)
    }

    fn into_py(self, py: Python<'_>) -> Bound<'_, PyAny> {
        match self {
            Self::U16(v) => v.into_pyarray(py).into_any(),
            Self::U32(v) => v.into_pyarray(py).into_any(),
            Self::U64(v) => v.into_pyarray(py).into_any(),
        }
    }
}

/// Scales as `pack_ext` returns them.
enum Scales {
    Bits(Vec<u16>),
    Float(Vec<f32>),
}

fn pack_ext_slice<'py, E: Element>(
    py: Python<'py>,
    data: &[E],
    options: EncodeOptions<'_>,
    extras: PackExtras,
    isa: Isa,
) -> PyResult<PackedExt<'py>> {
    let layout = BlockLayout::new(data.len(), options.block_size).map_err(crate::errors::to_py)?;
    let dq = extras.double_quant;
    let (codes, scales, scale_codes, params, outliers) = run(py, || {
        let mut out = PackOutput::new(&layout, dq);
        let outliers = pack_ext_parts_with_isa(isa, data, &options, &extras, out.buffers())?;
        let PackOutput {
            codes,
            scales,
            scale_codes,
            scale_params: params,
        } = out;
        // 16-bit scales as their bits: the caller holds them without converting again.
        let scales = if !dq && options.scale_dtype.bits() == 16 {
            let mut bits = zeroed_vec::<u16>(scales.len());
            storage_bits(&scales, options.scale_dtype, &mut bits);
            Scales::Bits(bits)
        } else {
            Scales::Float(scales)
        };
        Ok((
            codes,
            scales,
            scale_codes,
            params,
            Indices::split(&outliers, data.len()),
        ))
    })?;
    let (indices, values) = outliers;
    Ok((
        codes.into_pyarray(py),
        match scales {
            Scales::Bits(v) => v.into_pyarray(py).into_any(),
            Scales::Float(v) => v.into_pyarray(py).into_any(),
        },
        dq.then(|| scale_codes.into_pyarray(py)),
        dq.then(|| params.into_pyarray(py)),
        indices.into_py(py),
        values.into_pyarray(py),
    ))
}

/// Packs a flat float array (float32, or uint16 bits of bfloat16 / float16, named by
/// `element`) with OPQ outliers (`opq`: the quantile q, or None) and double-quantized scales
/// (`scale_dtype="dq8"`). Returns `(codes, scales, scale_codes, scale_scales, outlier_indices,
/// outlier_values)`: `ceil(n/2)` code bytes; scales are the uint16 bits of bfloat16 / float16
/// scales, else the decoded float32 values; `scale_codes` (uint8 per block) and
/// `scale_scales` (float32 `[lo, step]` per group of 256) are None without dq8; outlier
/// indices are ascending, in the smallest of uint16 / uint32 / uint64 that holds every flat
/// index, values the uint16 bits of `outlier_dtype`.
#[pyfunction]
#[pyo3(
    signature = (data, element, levels, block_size, normalization, scale_dtype, opq=None, outlier_dtype=Parsed(OutlierDType::BFloat16), isa=None),
    text_signature = "(data, element, levels, block_size, normalization, scale_dtype, opq=None, outlier_dtype='bfloat16', isa=None)"
)]
#[allow(clippy::too_many_arguments)]
fn pack_ext<'py>(
    py: Python<'py>,
    data: FloatArray<'py>,
    element: ElementName,
    levels: PyReadonlyArray1<'py, f32>,
    block_size: usize,
    normalization: Parsed<Normalization>,
    scale_dtype: ScaleFormat,
    opq: Option<f64>,
    outlier_dtype: Parsed<OutlierDType>,
    isa: Option<Parsed<Isa>>,
) -> PyResult<PackedExt<'py>> {
    let codebook = codebook(&levels)?;
    let (scale_dtype, double_quant) = match scale_dtype {
        ScaleFormat::Plain(dtype) => (dtype, false),
        ScaleFormat::DoubleQuant => (ScaleDType::Float32, true),
    };
    let options = EncodeOptions {
        codebook: &codebook,
        block_size,
        normalization: normalization.0,
        scale_dtype,
    };
    let extras = PackExtras {
        opq: opq
            .map(|q| OpqOptions::new(q, outlier_dtype.0))
            .transpose()
            .map_err(crate::errors::to_py)?,
        double_quant,
    };
    let isa = isa_or_best(isa);
    with_floats!(data.view(element, "data")?, |x| pack_ext_slice(
        py, x, options, extras, isa
    ))
}

/// OPQ threshold factor t(n, q) = Phi^-1((q^(1/n) + 1) / 2) for a block of n values.
#[pyfunction]
fn opq_threshold(n: usize, q: f64) -> PyResult<f64> {
    OpqOptions::new(q, OutlierDType::BFloat16).map_err(crate::errors::to_py)?;
    if n == 0 {
        return Err(PyValueError::new_err("n must be at least 1"));
    }
    Ok(bofrs_core::blockwise::opq::threshold(n, q))
}

/// Decodes dq8 scale bytes with their group parameters (`[lo, step]` per 256 scales) to
/// float32; `signed`: the bytes carry a sign bit (signed_absmax codebooks).
#[pyfunction]
fn decode_scales<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    params: PyReadonlyArray1<'py, f32>,
    signed: bool,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (c, p) = (contiguous(&codes, "codes")?, contiguous(&params, "params")?);
    let out = run(py, || {
        let mut out = vec![0f32; c.len()];
        dq_decode_scales(c, p, signed, &mut out)?;
        Ok(out)
    })?;
    Ok(out.into_pyarray(py))
}

/// Decodes `packed` into `out` with the interpreter released.
fn unpack_into<E: Element>(
    py: Python<'_>,
    isa: Isa,
    packed: &Packed<'_>,
    out: &mut [E],
) -> PyResult<()> {
    run(py, || unpack_with_isa(isa, packed, out))
}

/// Decodes codes and scales back to `numel` values: float32, or uint16 bits of bfloat16 /
/// float16 (named by `out_dtype`). Scales come as stored (`scale_dtype`: float32 values, the
/// uint16 bits of bfloat16 / float16, or dq8 bytes with `scale_params` and `signed`). With
/// `outlier_indices` (uint16 / uint32 / uint64, ascending) and `outlier_values` (uint16 bits
/// of `outlier_dtype`), writes the OPQ outliers back.
#[pyfunction]
#[pyo3(
    signature = (codes, scales, levels, block_size, numel, out_dtype, isa=None, outlier_indices=None, outlier_values=None, outlier_dtype=Parsed(OutlierDType::BFloat16), scale_dtype=ScaleFormat::Plain(ScaleDType::Float32), scale_params=None, signed=false),
    text_signature = "(codes, scales, levels, block_size, numel, out_dtype, isa=None, outlier_indices=None, outlier_values=None, outlier_dtype='bfloat16', scale_dtype='float32', scale_params=None, signed=False)"
)]
#[allow(clippy::too_many_arguments)]
fn unpack<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    scales: ScaleArray<'py>,
    levels: PyReadonlyArray1<'py, f32>,
    block_size: usize,
    numel: usize,
    out_dtype: OutDType,
    isa: Option<Parsed<Isa>>,
    outlier_indices: Option<IndexArray<'py>>,
    outlier_values: Option<PyReadonlyArray1<'py, u16>>,
    outlier_dtype: Parsed<OutlierDType>,
    scale_dtype: ScaleFormat,
    scale_params: Option<PyReadonlyArray1<'py, f32>>,
    signed: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let codebook = codebook(&levels)?;
    let isa = isa_or_best(isa);
    let outliers = match (&outlier_indices, &outlier_values) {
        (None, None) => None,
        (Some(i), Some(v)) => Some(OutlierView {
            indices: i.view()?,
            values: contiguous(v, "outlier_values")?,
            dtype: outlier_dtype.0,
        }),
        _ => {
            return Err(PyValueError::new_err(
                "outlier_indices and outlier_values must be given together",
            ))
        }
    };
    let params = match &scale_params {
        Some(p) => Some(contiguous(p, "scale_params")?),
        None => None,
    };
    let packed = Packed {
        codes: contiguous(&codes, "codes")?,
        scales: scales.view(scale_dtype, params, signed)?,
        codebook: &codebook,
        block_size,
        outliers,
    };
    // 16-bit values go out as their bits.
    Ok(match out_dtype.0 {
        Kind::Float32 => {
            let mut out = zeroed_vec::<f32>(numel);
            unpack_into(py, isa, &packed, &mut out)?;
            out.into_pyarray(py).into_any()
        }
        Kind::BFloat16 => {
            let mut out = zeroed_vec::<u16>(numel);
            unpack_into(py, isa, &packed, Bf16::from_bits_slice_mut(&mut out))?;
            out.into_pyarray(py).into_any()
        }
        Kind::Float16 => {
            let mut out = zeroed_vec::<u16>(numel);
            unpack_into(py, isa, &packed, F16::from_bits_slice_mut(&mut out))?;
            out.into_pyarray(py).into_any()
        }
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(pack_ext, m)?)?;
    m.add_function(wrap_pyfunction!(decode_scales, m)?)?;
    m.add_function(wrap_pyfunction!(opq_threshold, m)?)?;
    Ok(())
}
