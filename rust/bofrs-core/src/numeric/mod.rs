//! Numbers every layer uses: the input element types and their exact conversions, the normal
//! distribution and quadrature (codebook construction, OPQ thresholds, grids), the Hadamard
//! transform (rotation, HIGGS) and the CRC-32 of stored buffers.

pub mod checksum;
pub mod element;
pub mod gauss;
pub mod hadamard;
