//! The one way heavy work runs: without the interpreter, with panics caught.

use crate::errors::{from_panic, to_py};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `work` with the interpreter released; core errors and panics become Python exceptions.
pub fn run<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> bofrs_core::Result<T> + Send,
{
    py.detach(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(from_panic)?
        .map_err(to_py)
}
