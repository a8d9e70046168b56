//! How the heavy work runs: the dedicated rayon pool, OS-zeroed (huge-page) output buffers, and
//! the outlier vectors kept from one pack to the next.

pub mod buffer;
pub mod pool;
pub mod recycle;
