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
