//! Which SIMD instruction set the kernels use, detected once.

use std::sync::OnceLock;

/// The instruction sets the inner loops are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C (f16 conversion).
    Avx2,
    /// AVX-512F (includes f16 conversion and FMA).
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU has, or `LADIMO_KERNEL_ISA` (`scalar`, `avx2`,
    /// `avx512`) when set; a requested set the CPU lacks falls back to the best it has.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::detect();
            match std::env::var("LADIMO_KERNEL_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") if best != Isa::Scalar => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// The best instruction set of this CPU.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every instruction set this CPU can run (for tests comparing them).
    pub fn available() -> Vec<Isa> {
        match Self::detect() {
            Isa::Avx512 => vec![Isa::Scalar, Isa::Avx2, Isa::Avx512],
            Isa::Avx2 => vec![Isa::Scalar, Isa::Avx2],
            Isa::Scalar => vec![Isa::Scalar],
        }
    }
}
