//! Which instruction set the kernels use, detected once per process.

use std::sync::OnceLock;

/// A kernel implementation family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; the reference the SIMD kernels are tested against.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

impl Isa {
    /// The best implementation this CPU supports (detected on first use, then cached).
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// `self` if this CPU supports it, otherwise the scalar fallback, so asking for an
    /// implementation the CPU lacks can never execute unsupported instructions.
    pub fn or_supported(self) -> Isa {
        match self {
            Isa::Scalar => Isa::Scalar,
            Isa::Avx2 if Isa::detected() == Isa::Avx2 => Isa::Avx2,
            Isa::Avx2 => Isa::Scalar,
        }
    }

    /// Every implementation usable on this CPU (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if Isa::detected() != Isa::Scalar {
            v.push(Isa::detected());
        }
        v
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}
