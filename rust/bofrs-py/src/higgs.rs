//! HIGGS: the Hadamard transform, Gaussian grids, group-wise pack/unpack; and the knapsack
//! allocation of the linearity theorem.

use crate::convert::{contiguous, isa_or_best, with_floats, ElementName, FloatArray, Parsed};
use crate::detach::run;
use crate::errors::to_py;
use bofrs_core::higgs::{
    gaussian_grid, higgs_matvec, higgs_pack, higgs_unpack, GridSearch, HiggsLayout,
};
use bofrs_core::numeric::hadamard::hadamard_rows_with_isa;
use bofrs_core::runtime::buffer::zeroed_vec;
use bofrs_core::{allocate, Element, Isa, ScaleDType};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

/// Codes and scales of a packed weight.
type Packed<'py> = (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>);

/// The orthonormal Walsh-Hadamard transform of every run of `size` values (a new array).
#[pyfunction]
#[pyo3(signature = (data, size, isa=None))]
fn hadamard<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, f32>,
    size: usize,
    isa: Option<Parsed<Isa>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let isa = isa_or_best(isa);
    let values = contiguous(&data, "data")?;
    let out = run(py, || {
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(bofrs_core::Error::NonFinite { index });
        }
        let mut out = values.to_vec();
        hadamard_rows_with_isa(isa, &mut out, size)?;
        Ok(out)
    })?;
    Ok(out.into_pyarray(py))
}

/// An MSE-optimal grid for N(0, I_p): `(points, mse per coordinate)`.
#[pyfunction]
#[pyo3(signature = (p, n, seed=0))]
fn generate_grid<'py>(
    py: Python<'py>,
    p: usize,
    n: usize,
    seed: u64,
) -> PyResult<(Bound<'py, PyArray1<f64>>, f64)> {
    let grid = run(py, move || gaussian_grid(p, n, seed))?;
    Ok((grid.points.into_pyarray(py), grid.mse))
}

fn search(p: usize, points: &PyReadonlyArray1<'_, f32>) -> PyResult<GridSearch> {
    GridSearch::new(p, contiguous(points, "points")?).map_err(to_py)
}

fn pack_typed<'py, E: Element>(
    py: Python<'py>,
    data: &[E],
    layout: HiggsLayout,
    grid: &GridSearch,
    scale_dtype: ScaleDType,
) -> PyResult<Packed<'py>> {
    let (codes, scales) = run(py, || {
        let mut codes = zeroed_vec::<u8>(layout.code_bytes());
        let mut scales = vec![0f32; layout.num_groups()];
        higgs_pack(data, &layout, grid, scale_dtype, &mut codes, &mut scales)?;
        Ok((codes, scales))
    })?;
    Ok((codes.into_pyarray(py), scales.into_pyarray(py)))
}

/// Packs a `rows x cols` weight (float32, or uint16 bits of bfloat16 / float16).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn pack_higgs<'py>(
    py: Python<'py>,
    data: FloatArray<'py>,
    element: ElementName,
    rows: usize,
    cols: usize,
    group_size: usize,
    p: usize,
    points: PyReadonlyArray1<'py, f32>,
    scale_dtype: Parsed<ScaleDType>,
) -> PyResult<Packed<'py>> {
    let grid = search(p, &points)?;
    let layout = HiggsLayout::new(rows, cols, group_size, &grid).map_err(to_py)?;
    with_floats!(data.view(element, "data")?, |x| pack_typed(
        py,
        x,
        layout,
        &grid,
        scale_dtype.0
    ))
}

/// Decodes HIGGS codes to float32: `rows x cols` in the original basis, or
/// `rows x padded_cols` in the rotated basis when `rotated`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn unpack_higgs<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    scales: PyReadonlyArray1<'py, f32>,
    rows: usize,
    cols: usize,
    group_size: usize,
    p: usize,
    points: PyReadonlyArray1<'py, f32>,
    rotated: bool,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let grid = search(p, &points)?;
    let layout = HiggsLayout::new(rows, cols, group_size, &grid).map_err(to_py)?;
    let width = if rotated { layout.padded_cols() } else { cols };
    let (c, s) = (contiguous(&codes, "codes")?, contiguous(&scales, "scales")?);
    let out = run(py, || {
        let mut out = zeroed_vec::<f32>(rows * width);
        higgs_unpack(c, s, &layout, &grid, rotated, &mut out)?;
        Ok(out)
    })?;
    Ok(out.into_pyarray(py))
}

/// `x_rot @ W_rot.T` for `tokens` rows of rotated, padded float32 activations (fused).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn matvec_higgs<'py>(
    py: Python<'py>,
    x_rot: PyReadonlyArray1<'py, f32>,
    tokens: usize,
    codes: PyReadonlyArray1<'py, u8>,
    scales: PyReadonlyArray1<'py, f32>,
    rows: usize,
    cols: usize,
    group_size: usize,
    p: usize,
    points: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let grid = search(p, &points)?;
    let layout = HiggsLayout::new(rows, cols, group_size, &grid).map_err(to_py)?;
    let (x, c, s) = (
        contiguous(&x_rot, "x_rot")?,
        contiguous(&codes, "codes")?,
        contiguous(&scales, "scales")?,
    );
    let out = run(py, || {
        let mut out = zeroed_vec::<f32>(tokens * rows);
        higgs_matvec(x, tokens, c, s, &layout, &grid, &mut out)?;
        Ok(out)
    })?;
    Ok(out.into_pyarray(py))
}

/// Exact multiple-choice knapsack: `(choices, loss, cost)`.
#[pyfunction(name = "allocate")]
fn allocate_py(
    py: Python<'_>,
    costs: Vec<u64>,
    losses: Vec<f64>,
    options: usize,
    capacity: u64,
) -> PyResult<(Vec<usize>, f64, u64)> {
    let a = run(py, move || {
        allocate::allocate(&costs, &losses, options, capacity)
    })?;
    Ok((a.choices, a.loss, a.cost))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hadamard, m)?)?;
    m.add_function(wrap_pyfunction!(generate_grid, m)?)?;
    m.add_function(wrap_pyfunction!(pack_higgs, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_higgs, m)?)?;
    m.add_function(wrap_pyfunction!(allocate_py, m)?)?;
    m.add_function(wrap_pyfunction!(matvec_higgs, m)?)?;
    Ok(())
}
