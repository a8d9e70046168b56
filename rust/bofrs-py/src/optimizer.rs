//! The BOF4 codebook optimizer: Gaussian (theoretical) and histogram (data-driven) targets.

use crate::convert::{with_floats, ElementName, FloatArray, Parsed};
use crate::detach::run;
use crate::errors::to_py;
use bofrs_core::blockwise::codebook::bof4::{
    self, Metric, OptimizeOptions, Optimized, WeightHistogram,
};
use bofrs_core::Normalization;
use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `(levels, iterations, converged, error)` as Python sees an optimization result.
type Solution<'py> = (Bound<'py, PyArray1<f64>>, usize, bool, f64);

fn solution<'py>(py: Python<'py>, solved: Optimized) -> Solution<'py> {
    (
        solved.levels.into_pyarray(py),
        solved.iterations,
        solved.converged,
        solved.error,
    )
}

fn options(
    bits: u32,
    pinned: Vec<f64>,
    init: Option<Vec<f64>>,
    tolerance: f64,
    max_iterations: usize,
) -> OptimizeOptions {
    OptimizeOptions {
        bits,
        pinned,
        init,
        tolerance,
        max_iterations,
    }
}

/// Lloyd-optimal levels for blocks of i.i.d. N(0, 1) weights (the theoretical mode).
#[pyfunction]
#[pyo3(signature = (block_size, metric, normalization, bits, pinned, init, tolerance, max_iterations))]
#[allow(clippy::too_many_arguments)]
fn optimize_gaussian<'py>(
    py: Python<'py>,
    block_size: usize,
    metric: Parsed<Metric>,
    normalization: Parsed<Normalization>,
    bits: u32,
    pinned: Vec<f64>,
    init: Option<Vec<f64>>,
    tolerance: f64,
    max_iterations: usize,
) -> PyResult<Solution<'py>> {
    let options = options(bits, pinned, init, tolerance, max_iterations);
    let solved = run(py, move || {
        let target = bof4::GaussianTarget::new(block_size, normalization.0, metric.0)?;
        bof4::optimize(&target, &options)
    })?;
    Ok(solution(py, solved))
}

/// Expected error per weight of a codebook on i.i.d. N(0, 1) weights (exact integration).
#[pyfunction]
fn expected_error(
    py: Python<'_>,
    levels: Vec<f64>,
    block_size: usize,
    metric: Parsed<Metric>,
    normalization: Parsed<Normalization>,
) -> PyResult<f64> {
    run(py, move || {
        bof4::expected_error(&levels, block_size, metric.0, normalization.0)
    })
}

/// A streaming weighted histogram of block-normalized values (the data-driven mode).
#[pyclass(module = "bofrs._native")]
struct WeightHistogramBuilder {
    inner: WeightHistogram,
}

#[pymethods]
impl WeightHistogramBuilder {
    #[new]
    #[pyo3(signature = (block_size, metric, normalization, sample=1.0, seed=0))]
    fn new(
        block_size: usize,
        metric: Parsed<Metric>,
        normalization: Parsed<Normalization>,
        sample: f64,
        seed: u64,
    ) -> PyResult<Self> {
        let inner = WeightHistogram::new(block_size, normalization.0, metric.0, sample, seed)
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Adds the blocks of one flat tensor: float32, or uint16 bits of bfloat16 / float16.
    fn add(&mut self, py: Python<'_>, data: FloatArray<'_>, element: ElementName) -> PyResult<()> {
        let inner = &mut self.inner;
        with_floats!(data.view(element, "data")?, |x| run(py, || inner.add(x)))
    }

    /// Lloyd-optimal levels for the values added so far.
    #[pyo3(signature = (bits, pinned, init, tolerance, max_iterations))]
    fn optimize<'py>(
        &self,
        py: Python<'py>,
        bits: u32,
        pinned: Vec<f64>,
        init: Option<Vec<f64>>,
        tolerance: f64,
        max_iterations: usize,
    ) -> PyResult<Solution<'py>> {
        if self.inner.values() == 0 || self.inner.total_weight() <= 0.0 {
            return Err(PyValueError::new_err(
                "data: no nonzero block to optimize on (empty data, all zeros, or sample too small)",
            ));
        }
        let options = options(bits, pinned, init, tolerance, max_iterations);
        let inner = &self.inner;
        let solved = run(py, move || bof4::optimize(inner, &options))?;
        Ok(solution(py, solved))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(optimize_gaussian, m)?)?;
    m.add_function(wrap_pyfunction!(expected_error, m)?)?;
    m.add_class::<WeightHistogramBuilder>()?;
    Ok(())
}
