//! The BOF4 codebook optimizer: Gaussian (theoretical) and histogram (data-driven) targets.

use crate::detach::run;
use crate::errors::to_py;
use crate::packing::{as_halfs, contiguous};
use bofrs_core::blockwise::codebook::bof4::{
    self, Metric, OptimizeOptions, Optimized, Target, WeightHistogram,
};
use bofrs_core::{Bf16, Normalization, F16};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
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

fn parse(metric: &str, normalization: &str) -> PyResult<(Metric, Normalization)> {
    Ok((
        Metric::parse(metric).map_err(to_py)?,
        Normalization::parse(normalization).map_err(to_py)?,
    ))
}

/// Lloyd-optimal levels for blocks of i.i.d. N(0, 1) weights (the theoretical mode).
#[pyfunction]
#[pyo3(signature = (block_size, metric, normalization, bits, pinned, init, tolerance, max_iterations))]
#[allow(clippy::too_many_arguments)]
fn optimize_gaussian<'py>(
    py: Python<'py>,
    block_size: usize,
    metric: &str,
    normalization: &str,
    bits: u32,
    pinned: Vec<f64>,
    init: Option<Vec<f64>>,
    tolerance: f64,
    max_iterations: usize,
) -> PyResult<Solution<'py>> {
    let (metric, normalization) = parse(metric, normalization)?;
    let options = options(bits, pinned, init, tolerance, max_iterations);
    let solved = run(py, move || {
        let target = bof4::GaussianTarget::new(block_size, normalization, metric)?;
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
    metric: &str,
    normalization: &str,
) -> PyResult<f64> {
    let (metric, normalization) = parse(metric, normalization)?;
    run(py, move || {
        bof4::expected_error(&levels, block_size, metric, normalization)
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
        metric: &str,
        normalization: &str,
        sample: f64,
        seed: u64,
    ) -> PyResult<Self> {
        let (metric, normalization) = parse(metric, normalization)?;
        let inner =
            WeightHistogram::new(block_size, normalization, metric, sample, seed).map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Adds the blocks of one flat tensor: float32, or uint16 bits of bfloat16 / float16.
    fn add(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>, element: &str) -> PyResult<()> {
        let inner = &mut self.inner;
        match element {
            "float32" => {
                let arr: PyReadonlyArray1<'_, f32> = data.extract()?;
                let values = contiguous(&arr, "data")?;
                run(py, || inner.add(values))
            }
            "bfloat16" | "float16" => {
                let arr: PyReadonlyArray1<'_, u16> = data.extract()?;
                let bits = contiguous(&arr, "data")?;
                if element == "bfloat16" {
                    run(py, || inner.add(as_halfs::<Bf16>(bits)))
                } else {
                    run(py, || inner.add(as_halfs::<F16>(bits)))
                }
            }
            other => Err(PyTypeError::new_err(format!(
                "element must be 'float32', 'bfloat16' or 'float16', got {other:?}"
            ))),
        }
    }

    /// Values added so far (sampled blocks only).
    #[getter]
    fn values(&self) -> u64 {
        self.inner.values()
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

    /// The weighted error per weight of `levels` on the values added so far.
    fn error(&self, py: Python<'_>, levels: Vec<f64>) -> PyResult<f64> {
        let inner = &self.inner;
        run(py, move || {
            bof4::check_levels(&levels, "levels")?;
            Ok(inner.error(&levels))
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(optimize_gaussian, m)?)?;
    m.add_function(wrap_pyfunction!(expected_error, m)?)?;
    m.add_class::<WeightHistogramBuilder>()?;
    Ok(())
}
