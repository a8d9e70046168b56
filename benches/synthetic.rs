//! Deterministic synthetic inputs for the Criterion benches and the timing examples
//! (`rust/bofrs-core/examples`, which include this file by path): a xorshift64 generator.
//! Timing data only; the unit tests draw theirs from the crate's own `testing` module.

// Each includer uses a part of it.
#![allow(dead_code)]

/// A xorshift64 generator (shifts 13, 7, 17).
pub struct XorShift(u64);

impl XorShift {
    /// The generator every bench and example starts from.
    pub fn new() -> Self {
        Self(0x9E37_79B9_7F4A_7C15)
    }

    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in (0, 1), 53 bits.
    pub fn open_unit_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// The sum of four uniforms in [-0.5, 0.5): about N(0, 1/3), close enough to Gaussian
    /// weights for timing.
    pub fn bell(&mut self) -> f32 {
        let mut acc = 0f32;
        for _ in 0..4 {
            acc += self.unit() - 0.5;
        }
        acc
    }
}
