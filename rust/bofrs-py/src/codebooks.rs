//! Built-in codebook tables.

use crate::detach::run;
use bofrs_core::blockwise::codebook::{af4, bof4};
use bofrs_core::blockwise::codebook::{int4_levels, FP4, NF4};
use bofrs_core::Error;
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;

/// Levels of a built-in codebook ("nf4", "fp4", "int4", "af4", "bof4", "bof4-mae", "bof4s",
/// "bof4s-mae"); af4 and the bof4 family depend on block_size.
#[pyfunction]
#[pyo3(signature = (name, block_size=64))]
fn builtin_levels<'py>(
    py: Python<'py>,
    name: &str,
    block_size: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let name = name.to_owned();
    let levels = run(py, move || match name.as_str() {
        "nf4" => Ok(NF4),
        "fp4" => Ok(FP4),
        "int4" => Ok(int4_levels()),
        "af4" => af4::af4_levels(block_size),
        other if bof4::builtin::variant(other).is_some() => bof4::bof4_levels(other, block_size),
        other => Err(Error::InvalidArgument {
            name: "codebook",
            message: format!("unknown built-in codebook {other:?}"),
        }),
    })?;
    Ok(levels.to_vec().into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(builtin_levels, m)?)?;
    Ok(())
}
