//! The instruction sets the kernels are compiled for, and runtime detection.

/// A kernel variant. `Portable` runs anywhere and defines the results; the others must match it
/// bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
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
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|i| i.name() == name)
    }

    /// Whether this CPU can run the variant.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
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
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
            _ => false,
        }
    }

    /// An error naming the variant when this CPU cannot run it.
    pub fn ensure_supported(self) -> crate::Result<()> {
        if self.is_supported() {
            Ok(())
        } else {
            Err(crate::Error::InvalidArgument {
                name: "isa",
                message: format!("{} is not supported by this CPU", self.name()),
            })
        }
    }

    /// Every variant this CPU supports, portable first, best last.
    pub fn supported() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_supported())
            .collect()
    }

    /// The best supported variant (detected once).
    pub fn best() -> Isa {
        crate::simd::detected()
    }
}
