//! HIGGS (Malinovskii et al. 2024): Hadamard-rotated weights quantized to Gaussian MSE-optimal
//! grids, data-free.

pub mod grid;
pub mod matvec;
pub mod quantize;
pub mod search;

pub use grid::{gaussian_grid, Grid, GRID_SIZES};
pub use matvec::higgs_matvec;
pub use quantize::{higgs_pack, higgs_unpack, HiggsLayout};
pub use search::GridSearch;
