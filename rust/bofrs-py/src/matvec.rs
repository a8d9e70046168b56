//! The fused 4-bit matrix-vector product: over numpy arrays (`matvec`), and over a weight
//! prepared once with DLPack activations (`PreparedMatvec`).

use crate::convert::{
    codebook, contiguous, matvec_isa, with_floats, ElementName, FloatArray, Floats, Parsed,
};
use crate::detach::run;
use bofrs_core::blockwise::matvec::{matvec_with_options, Activations, MatShape, PackedMatrix};
use bofrs_core::numeric::element::Half;
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::{Bf16, Codebook, Element, Isa, F16};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The product of `weight` with `batch` activation rows `x`, into a new vector.
fn product<X: Element>(
    py: Python<'_>,
    mode: (Isa, Activations),
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
) -> PyResult<Vec<f32>> {
    product_then(py, mode, weight, batch, x, |y| y)
}

/// [`product`], then `finish` on the result (both without the interpreter).
fn product_then<X: Element, T: Send>(
    py: Python<'_>,
    (isa, activations): (Isa, Activations),
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
    finish: impl FnOnce(Vec<f32>) -> T + Send,
) -> PyResult<T> {
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
        Ok(finish(out))
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
    let activations = activations.map_or(Activations::Float, |a| a.0);
    let mode = (matvec_isa(isa.map(|i| i.0), activations), activations);
    let weight = PackedMatrix {
        shape: MatShape::new(out_features, in_features, block_size),
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
    m.add_class::<PreparedMatvec>()?;
    Ok(())
}

/// A packed 2-D weight prepared once for repeated fused products: the codes (held, not copied),
/// float32 block scales (copied and checked), the codebook and the kernel variant converted to
/// core types. `apply` reads activations from a DLPack capsule (no numpy round trip) and
/// returns the output in the activations' dtype, so a decode step pays one native call per
/// product.
#[pyclass(frozen, module = "bofrs._native")]
pub struct PreparedMatvec {
    codes: Py<PyArray1<u8>>,
    scales: Vec<f32>,
    codebook: Codebook,
    shape: MatShape,
    /// The variant named at construction; `None`: [`default_isa`](bofrs_core::blockwise::matvec::default_isa) per mode.
    isa: Option<Isa>,
}

#[pymethods]
impl PreparedMatvec {
    /// Validates and keeps the operands of a weight `[out_features, in_features]`: `codes`
    /// (uint8, `out * in / 2`, contiguous; kept by reference, so later in-place changes are
    /// seen), `scales` (float32 per block, finite; copied), `levels` (16 float32) and the
    /// kernel variant `isa` (default: the fastest for each activation mode).
    #[new]
    #[pyo3(signature = (codes, scales, levels, out_features, in_features, block_size, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        codes: Bound<'_, PyArray1<u8>>,
        scales: PyReadonlyArray1<'_, f32>,
        levels: PyReadonlyArray1<'_, f32>,
        out_features: usize,
        in_features: usize,
        block_size: usize,
        isa: Option<Parsed<Isa>>,
    ) -> PyResult<Self> {
        let isa = isa.map(|i| i.0);
        if let Some(isa) = isa {
            isa.ensure_supported().map_err(crate::errors::to_py)?;
        }
        let shape = MatShape::new(out_features, in_features, block_size);
        let scales = contiguous(&scales, "scales")?.to_vec();
        {
            let readonly = read_codes(&codes)?;
            let code_bytes = contiguous(&readonly, "codes")?;
            shape
                .check(0, code_bytes.len(), scales.len(), 0, 0)
                .map_err(crate::errors::to_py)?;
        }
        if let Some(b) = scales.iter().position(|s| !s.is_finite()) {
            return Err(PyValueError::new_err(format!(
                "scales: scale of block {b} is not finite"
            )));
        }
        Ok(Self {
            codes: codes.unbind(),
            scales,
            codebook: codebook(&levels)?,
            shape,
            isa,
        })
    }

    /// Output features of the weight.
    #[getter]
    fn out_features(&self) -> usize {
        self.shape.out_features
    }

    /// Input features of the weight.
    #[getter]
    fn in_features(&self) -> usize {
        self.shape.in_features
    }

    /// Values per block.
    #[getter]
    fn block_size(&self) -> usize {
        self.shape.block_size
    }

    /// The kernel variant named at construction (None: the default of each mode, the best
    /// variant of this CPU for the float path).
    #[getter]
    fn isa(&self) -> Option<&'static str> {
        self.isa.map(Isa::name)
    }

    /// `x @ W.T` for `x` a DLPack capsule of a C-contiguous CPU tensor `[tokens, in_features]`
    /// (float32, bfloat16 or float16): a new `[tokens, out_features]` numpy array, float32 when
    /// `float32_out` or the input is float32, else the uint16 bits of the input's dtype (rounded
    /// to nearest even from the float32 sums). `activations` as for [`matvec`].
    #[pyo3(signature = (x, activations=None, float32_out=false))]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        activations: Option<Parsed<Activations>>,
        float32_out: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input = crate::dlpack::matrix(x, "x")?;
        if input.cols != self.shape.in_features {
            return Err(PyValueError::new_err(format!(
                "x must have shape [tokens, {}], got [{}, {}]",
                self.shape.in_features, input.rows, input.cols
            )));
        }
        let codes = read_codes(self.codes.bind(py))?;
        let weight = PackedMatrix {
            shape: self.shape,
            codes: contiguous(&codes, "codes")?,
            scales: &self.scales,
            codebook: &self.codebook,
        };
        let activations = activations.map_or(Activations::Float, |a| a.0);
        let mode = (matvec_isa(self.isa, activations), activations);
        let (tokens, n_out) = (input.rows, self.shape.out_features);
        let dims = (tokens, n_out);
        let array = |v: Vec<f32>| Array2::from_shape_vec(dims, v).map(|a| a.into_pyarray(py));
        let bits = |v: Vec<u16>| Array2::from_shape_vec(dims, v).map(|a| a.into_pyarray(py));
        let shape_error = |e: numpy::ndarray::ShapeError| PyValueError::new_err(e.to_string());
        Ok(match input.values {
            Floats::F32(x) => array(product(py, mode, &weight, tokens, x)?)
                .map_err(shape_error)?
                .into_any(),
            Floats::Bf16(x) if !float32_out => {
                bits(product_as::<Bf16, _>(py, mode, &weight, tokens, x)?)
                    .map_err(shape_error)?
                    .into_any()
            }
            Floats::F16(x) if !float32_out => {
                bits(product_as::<F16, _>(py, mode, &weight, tokens, x)?)
                    .map_err(shape_error)?
                    .into_any()
            }
            Floats::Bf16(x) => array(product(py, mode, &weight, tokens, x)?)
                .map_err(shape_error)?
                .into_any(),
            Floats::F16(x) => array(product(py, mode, &weight, tokens, x)?)
                .map_err(shape_error)?
                .into_any(),
        })
    }
}

/// A shared borrow of the codes (an error, not a panic, if Rust code holds them mutably).
fn read_codes<'py>(codes: &Bound<'py, PyArray1<u8>>) -> PyResult<PyReadonlyArray1<'py, u8>> {
    codes
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("codes: {e}")))
}

/// [`product`] rounded to the 16-bit type `H` (nearest even), as its bits.
fn product_as<H: Half, X: Element>(
    py: Python<'_>,
    mode: (Isa, Activations),
    weight: &PackedMatrix<'_>,
    batch: usize,
    x: &[X],
) -> PyResult<Vec<u16>> {
    product_then(py, mode, weight, batch, x, |y| {
        let mut bits = vec![0u16; y.len()];
        for (h, &v) in H::from_bits_slice_mut(&mut bits).iter_mut().zip(&y) {
            *h = H::from_f32(v);
        }
        bits
    })
}
