//! Runtime facts: thread pool size, instruction sets, checksums.

use crate::convert::contiguous;
use crate::detach::run;
use bofrs_core::numeric::checksum;
use bofrs_core::runtime::pool;
use bofrs_core::Isa;
use numpy::PyReadonlyArray1;
use pyo3::prelude::*;

/// Threads of the pool the heavy calls use (set by BOFRS_NUM_THREADS before first use).
#[pyfunction]
fn num_threads(py: Python<'_>) -> PyResult<usize> {
    run(py, || Ok(pool::num_threads()))
}

/// Kernel variants this CPU runs, portable first, the default last.
#[pyfunction]
fn supported_isas() -> Vec<&'static str> {
    Isa::supported().into_iter().map(Isa::name).collect()
}

/// CRC-32 (zlib's) of a contiguous uint8 array.
#[pyfunction]
fn crc32(py: Python<'_>, data: PyReadonlyArray1<'_, u8>) -> PyResult<u32> {
    let bytes = contiguous(&data, "data")?;
    run(py, || Ok(checksum::crc32(bytes)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(supported_isas, m)?)?;
    m.add_function(wrap_pyfunction!(crc32, m)?)?;
    Ok(())
}
