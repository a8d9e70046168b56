//! Helpers of the unit tests: deterministic pseudo-random inputs (a 64-bit LCG with Knuth's
//! MMIX constants).

/// Advances the generator and returns its new state.
pub(crate) fn step(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state
}

/// A uniform value in [0, 1) (the top 53 bits of the next state).
pub(crate) fn uniform(state: &mut u64) -> f64 {
    (step(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` values uniform in [-2, 2) (24 bits each) from `seed`.
pub(crate) fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| ((step(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0)
        .collect()
}

/// A HIGGS test weight: `data` (`rows x cols`) packed in groups of `group_size` on `grid`
/// with float32 scales, and the search and layout it was packed with.
pub(crate) struct HiggsPacked {
    pub(crate) search: crate::higgs::search::GridSearch,
    pub(crate) layout: crate::higgs::quantize::HiggsLayout,
    pub(crate) codes: Vec<u8>,
    pub(crate) scales: Vec<f32>,
}

/// Packs `data` for a HIGGS test (see [`HiggsPacked`]).
pub(crate) fn higgs_packed(
    data: &[f32],
    (rows, cols): (usize, usize),
    group_size: usize,
    grid: &crate::higgs::Grid,
) -> HiggsPacked {
    use crate::higgs::quantize::{higgs_pack, HiggsLayout};
    let points: Vec<f32> = grid.points.iter().map(|&v| v as f32).collect();
    let search = crate::higgs::search::GridSearch::new(grid.dim, &points).unwrap();
    let layout = HiggsLayout::new(rows, cols, group_size, &search).unwrap();
    let mut codes = vec![0u8; layout.code_bytes()];
    let mut scales = vec![0f32; layout.num_groups()];
    let f32_scales = crate::blockwise::scale::ScaleDType::Float32;
    higgs_pack(data, &layout, &search, f32_scales, &mut codes, &mut scales).unwrap();
    HiggsPacked {
        search,
        layout,
        codes,
        scales,
    }
}
