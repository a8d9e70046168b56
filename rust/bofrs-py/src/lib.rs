//! `bofrs._native`: the thin PyO3 layer over `bofrs-core`.
//!
//! Every heavy call goes through [`detach::run`], which releases the interpreter, catches Rust
//! panics and maps core errors to Python exceptions. Arrays come in as 1-D contiguous numpy
//! arrays (bf16 / f16 as their `uint16` bits) and go out as numpy arrays without copies.

mod codebooks;
mod convert;
mod detach;
mod errors;
mod higgs;
mod matvec;
mod optimizer;
mod packing;
mod runtime;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    packing::register(m)?;
    codebooks::register(m)?;
    optimizer::register(m)?;
    higgs::register(m)?;
    runtime::register(m)?;
    matvec::register(m)?;
    Ok(())
}
