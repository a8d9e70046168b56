//! Instruction-set selection. Every kernel has a portable body; the AVX2 and AVX-512 variants
//! compile the same body (or hand-written intrinsics with the same arithmetic) with those
//! features enabled, so all variants give bit-identical results.

use std::sync::OnceLock;

pub use crate::isa::Isa;

static DETECTED: OnceLock<Isa> = OnceLock::new();

/// The best instruction set this CPU supports (detected once).
pub fn detected() -> Isa {
    *DETECTED.get_or_init(|| {
        let all = Isa::supported();
        all.last().copied().unwrap_or(Isa::Portable)
    })
}
