//! Core errors as Python exceptions: everything the caller got wrong is a `ValueError`.

use bofrs_core::Error;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// Converts a core error into the Python exception that names the culprit.
pub fn to_py(err: Error) -> PyErr {
    match err {
        Error::InvalidArgument { .. }
        | Error::InvalidBlockSize(_)
        | Error::InvalidCodebook(_)
        | Error::NonFinite { .. }
        | Error::ScaleOverflow { .. }
        | Error::LengthMismatch { .. } => PyValueError::new_err(err.to_string()),
    }
}

/// A Rust panic caught at the boundary: a bug in bofrs, never the caller's fault.
pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    PyRuntimeError::new_err(format!("internal error in bofrs (please report): {detail}"))
}
