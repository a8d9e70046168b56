//! The instruction sets the kernels are compiled for, and runtime detection.
//!
//! Every layer has a portable kernel (plain Rust: it runs anywhere and defines the results) and
//! may have an x86 twin beside it. Variants are ordered weakest first and each one's CPU
//! requirements include the previous one's, so a layer dispatches with `isa >= Isa::Avx2`:
//! a stronger variant runs the strongest kernels a layer has for it.
//!
//! Layers choose their kernel with `dispatch!`. A kernel set is a variant here ([`Isa::ALL`],
//! [`Isa::name`], the detection in [`Isa::is_supported`]), an arm of `dispatch!`, and the kernels
//! in the layers that have them; every other layer runs its AVX2 kernels for a stronger variant
//! unchanged. [`Isa::Avx512`] has kernels only in the fused matvec
//! ([`crate::blockwise::matvec`]); encode, decode and the Hadamard transform run their AVX2
//! kernels for it.

use std::sync::OnceLock;

/// A kernel variant. `Portable` runs anywhere and defines the results; the others must match it
/// bit for bit (the fused float matvec: to float tolerance, see [`crate::blockwise::matvec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust.
    Portable,
    /// AVX2 with FMA, F16C, BMI1/2, POPCNT and LZCNT (hand-written intrinsics).
    Avx2,
    /// [`Isa::Avx2`] plus AVX-512 F, BW, VL, VNNI and VBMI (512-bit table lookups and integer
    /// dot products; Intel Ice Lake and later, AMD Zen 4 and later).
    Avx512,
}

impl Isa {
    /// Every variant, weakest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Name used by the Python API and the benches.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a name from [`Isa::name`].
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this CPU can run the variant.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // Every AVX2 CPU also has the bit-manipulation sets the encoder uses.
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                    && is_x86_feature_detected!("bmi1")
                    && is_x86_feature_detected!("bmi2")
                    && is_x86_feature_detected!("popcnt")
                    && is_x86_feature_detected!("lzcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vbmi")
            }
            // The x86 kernels are compiled only for x86-64.
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// An error naming the variant when this CPU cannot run it.
    pub fn ensure_supported(self) -> crate::Result<()> {
        if self.is_supported() {
            Ok(())
        } else {
            Err(crate::Error::invalid(
                "isa",
                format!("{} is not supported by this CPU", self.name()),
            ))
        }
    }

    /// Every variant this CPU supports, portable first, best last.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best supported variant (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::supported().last().copied().unwrap_or(Isa::Portable))
    }
}

/// Evaluates the x86 kernel expression where the variant `$isa` runs AVX2 kernels (x86-64 only),
/// else the portable one: `dispatch!(isa, avx2 => unsafe { x86::f(..) }, portable => f(..))`;
/// with an `avx512 => ..` arm first, that one for [`Isa::Avx512`]. The caller guarantees that
/// `$isa` is supported by this CPU (the safety condition of the x86 kernels).
macro_rules! dispatch {
    ($isa:expr, avx512 => $avx512:expr, avx2 => $avx2:expr, portable => $portable:expr $(,)?) => {{
        let isa: $crate::isa::Isa = $isa;
        #[cfg(target_arch = "x86_64")]
        let kernels = if isa >= $crate::isa::Isa::Avx512 {
            $avx512
        } else if isa >= $crate::isa::Isa::Avx2 {
            $avx2
        } else {
            $portable
        };
        #[cfg(not(target_arch = "x86_64"))]
        let kernels = {
            let _ = isa;
            $portable
        };
        kernels
    }};
    ($isa:expr, avx2 => $avx2:expr, portable => $portable:expr $(,)?) => {
        $crate::isa::dispatch!($isa, avx512 => $avx2, avx2 => $avx2, portable => $portable)
    };
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_best_is_supported() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("avx512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("avx512f"), None);
        assert_eq!(Isa::supported().first(), Some(&Isa::Portable));
        assert!(Isa::best().is_supported());
        assert_eq!(Isa::supported().last(), Some(&Isa::best()));
    }
}
