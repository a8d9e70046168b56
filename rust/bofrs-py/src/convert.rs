//! Everything that crosses the boundary, converted once: float arrays of the three element
//! types, and the option strings (element, normalization, scale and outlier dtypes, metric,
//! activation mode, kernel variant) as core enums, each by its `FromPyObject`.
//!
//! bfloat16 and float16 data arrive as `uint16` arrays with an element name beside them;
//! [`FloatArray::view`] pairs the two into a typed slice ([`Floats`]), which [`with_floats!`]
//! hands to a generic core call.

use bofrs_core::blockwise::codebook::bof4::Metric;
use bofrs_core::blockwise::decode::{OutlierIndices, StoredScales};
use bofrs_core::blockwise::matvec::Activations;
use bofrs_core::blockwise::opq::OutlierDType;
use bofrs_core::numeric::element::{Half, Kind};
use bofrs_core::{Bf16, Codebook, Isa, Normalization, ScaleDType, F16};
use numpy::{PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A contiguous 1-D array as a slice; `name` is the argument's, for the error.
pub fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous 1-D array")))
}

/// A float array as Python passes it: float32 values, or the uint16 bits of bfloat16 / float16
/// values (the element type named by a separate argument).
#[derive(FromPyObject)]
pub enum FloatArray<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    Bits(PyReadonlyArray1<'py, u16>),
}

/// Block scales as Python passes them to the decoder: float32 values, the uint16 bits of
/// bfloat16 / float16 scales, or dq8 bytes (the storage named by `scale_dtype`).
#[derive(FromPyObject)]
pub enum ScaleArray<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    Bits(PyReadonlyArray1<'py, u16>),
    Bytes(PyReadonlyArray1<'py, u8>),
}

impl ScaleArray<'_> {
    /// The scales as stored: `format` names their storage, `params` are the dq8 group
    /// parameters, `signed` marks signed-absmax dq8 bytes.
    pub fn view<'a>(
        &'a self,
        format: ScaleFormat,
        params: Option<&'a [f32]>,
        signed: bool,
    ) -> PyResult<StoredScales<'a>> {
        let mismatch = |want: &str| {
            PyTypeError::new_err(format!(
                "scales must be a {want} array for scale_dtype {:?}",
                match format {
                    ScaleFormat::Plain(d) => d.name(),
                    ScaleFormat::DoubleQuant => "dq8",
                }
            ))
        };
        match (self, format) {
            (Self::F32(a), ScaleFormat::Plain(ScaleDType::Float32)) => {
                Ok(StoredScales::F32(contiguous(a, "scales")?))
            }
            (Self::Bits(a), ScaleFormat::Plain(ScaleDType::BFloat16)) => {
                Ok(StoredScales::Bf16(Bf16::from_bits_slice(contiguous(a, "scales")?)))
            }
            (Self::Bits(a), ScaleFormat::Plain(ScaleDType::Float16)) => {
                Ok(StoredScales::F16(F16::from_bits_slice(contiguous(a, "scales")?)))
            }
            (Self::Bytes(a), ScaleFormat::DoubleQuant) => Ok(StoredScales::Dq8 {
                codes: contiguous(a, "scales")?,
                params: params.ok_or_else(|| {
                    PyValueError::new_err("dq8 scales need scale_params ([lo, step] per group)")
                })?,
                signed,
            }),
            (_, ScaleFormat::Plain(ScaleDType::Float32)) => Err(mismatch("float32")),
            (_, ScaleFormat::Plain(_)) => Err(mismatch("uint16 (the bits of the 16-bit scales)")),
            (_, ScaleFormat::DoubleQuant) => Err(mismatch("uint8")),
        }
    }
}

/// OPQ outlier indices in their stored index type.
#[derive(FromPyObject)]
pub enum IndexArray<'py> {
    U16(PyReadonlyArray1<'py, u16>),
    U32(PyReadonlyArray1<'py, u32>),
    U64(PyReadonlyArray1<'py, u64>),
}

impl IndexArray<'_> {
    /// The indices as a slice of their type (contiguous).
    pub fn view(&self) -> PyResult<OutlierIndices<'_>> {
        Ok(match self {
            Self::U16(a) => OutlierIndices::U16(contiguous(a, "outlier_indices")?),
            Self::U32(a) => OutlierIndices::U32(contiguous(a, "outlier_indices")?),
            Self::U64(a) => OutlierIndices::U64(contiguous(a, "outlier_indices")?),
        })
    }
}

/// A float array viewed as its element type.
pub enum Floats<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16]),
    F16(&'a [F16]),
}

impl FloatArray<'_> {
    /// The array as values of `element` (contiguous; its dtype must be the element's carrier:
    /// float32 for float32, uint16 for the 16-bit types); `name` is the argument's.
    pub fn view(&self, element: ElementName, name: &str) -> PyResult<Floats<'_>> {
        match (self, element.0) {
            (Self::F32(a), Kind::Float32) => Ok(Floats::F32(contiguous(a, name)?)),
            (Self::Bits(a), Kind::BFloat16) => {
                Ok(Floats::Bf16(Bf16::from_bits_slice(contiguous(a, name)?)))
            }
            (Self::Bits(a), Kind::Float16) => {
                Ok(Floats::F16(F16::from_bits_slice(contiguous(a, name)?)))
            }
            (array, kind) => {
                let (got, want) = match array {
                    Self::F32(a) => (a.dtype(), "uint16 (the bits of the 16-bit values)"),
                    Self::Bits(a) => (a.dtype(), "float32"),
                };
                Err(PyTypeError::new_err(format!(
                    "{name} must be a {want} array for element {:?}, got {got}",
                    element_name(kind)
                )))
            }
        }
    }
}

/// Runs `$body` with `$x` bound to the typed slice of a [`Floats`] (one monomorphized body
/// per element type).
macro_rules! with_floats {
    ($floats:expr, |$x:ident| $body:expr) => {
        match $floats {
            $crate::convert::Floats::F32($x) => $body,
            $crate::convert::Floats::Bf16($x) => $body,
            $crate::convert::Floats::F16($x) => $body,
        }
    };
}
pub(crate) use with_floats;

/// The name Python uses for an element type.
fn element_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float32 => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Float16 => "float16",
    }
}

macro_rules! element_names {
    ($($(#[$doc:meta])* $t:ident = $arg:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $t(pub Kind);

        impl<'a, 'py> FromPyObject<'a, 'py> for $t {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                let name: &str = obj.extract()?;
                [Kind::Float32, Kind::BFloat16, Kind::Float16]
                    .into_iter()
                    .find(|&k| element_name(k) == name)
                    .map($t)
                    .ok_or_else(|| {
                        PyTypeError::new_err(format!(
                            "{} must be 'float32', 'bfloat16' or 'float16', got {name:?}",
                            $arg
                        ))
                    })
            }
        }
    )*};
}
element_names! {
    /// The element type of an input array (`element`): "float32", "bfloat16" or "float16";
    /// anything else is a TypeError.
    ElementName = "element";
    /// The element type of an output array (`out_dtype`), as [`ElementName`].
    OutDType = "out_dtype";
}

/// A core enum parsed from its name by its own `parse` (its error names the argument).
#[derive(Debug, Clone, Copy)]
pub struct Parsed<T>(pub T);

macro_rules! parsed_by_core {
    ($($t:ty),*) => {$(
        impl<'a, 'py> FromPyObject<'a, 'py> for Parsed<$t> {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                let name: &str = obj.extract()?;
                <$t>::parse(name).map(Parsed).map_err(crate::errors::to_py)
            }
        }
    )*};
}
parsed_by_core!(Normalization, ScaleDType, OutlierDType, Metric);

/// A scale storage format of `pack_ext`: a [`ScaleDType`], or "dq8" (double quantization).
#[derive(Debug, Clone, Copy)]
pub enum ScaleFormat {
    Plain(ScaleDType),
    DoubleQuant,
}

impl<'a, 'py> FromPyObject<'a, 'py> for ScaleFormat {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let name: &str = obj.extract()?;
        if name == "dq8" {
            return Ok(Self::DoubleQuant);
        }
        ScaleDType::parse(name)
            .map(Self::Plain)
            .map_err(crate::errors::to_py)
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for Parsed<Isa> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let name: &str = obj.extract()?;
        Isa::parse(name).map(Parsed).ok_or_else(|| {
            let names: Vec<String> = Isa::ALL.iter().map(|i| format!("'{}'", i.name())).collect();
            let hint = if name.starts_with("avx512") {
                " (bofrs has no AVX-512 kernels: AVX-512 CPUs run 'avx2')"
            } else {
                ""
            };
            PyValueError::new_err(format!(
                "isa must be one of {}{hint}, got {name:?}",
                names.join(", ")
            ))
        })
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for Parsed<Activations> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let name: &str = obj.extract()?;
        Activations::parse(name).map(Parsed).ok_or_else(|| {
            let names: Vec<String> = Activations::ALL
                .iter()
                .map(|a| format!("'{}'", a.name()))
                .collect();
            PyValueError::new_err(format!(
                "activations must be one of {}, got {name:?}",
                names.join(", ")
            ))
        })
    }
}

/// The kernel variant of an optional `isa` argument: the best of this CPU when absent.
pub fn isa_or_best(isa: Option<Parsed<Isa>>) -> Isa {
    isa.map_or_else(Isa::best, |i| i.0)
}

/// A codebook from its 16 levels (a contiguous float32 array).
pub fn codebook(levels: &PyReadonlyArray1<'_, f32>) -> PyResult<Codebook> {
    Codebook::new(contiguous(levels, "levels")?).map_err(crate::errors::to_py)
}
