//! Picks the burn [`Device`] that ladimo runs on, at compile time, from cargo features.
//!
//! burn 0.22 has no backend type parameter: tensors and modules are backend-agnostic and a
//! [`Device`] decides where they live. Cargo features decide which backends are compiled in:
//! - `cpu` (default): burn's Flex backend with AVX-512 GEMM kernels (`x86-v4`, chosen at run time
//!   when the processor has them). The fastest CPU backend measured on our shapes (see
//!   docs/ARCHITECTURE.md).
//! - `ndarray`: burn's NdArray backend (deprecated upstream; kept for comparison benchmarks).
//! - `wgpu`: WGPU (Vulkan, Metal, DX12; on a machine without a GPU, Mesa's lavapipe).
//! - `cuda`: CUDA.
//!
//! With the default feature `fast-alloc`, linking this crate also makes mimalloc the global
//! allocator (eager CPU backends allocate a fresh buffer per op; the system allocator hands large
//! ones back to the OS and page-faults them in again, which made ops 2-4x slower here).
//!
//! [`device`] returns the preferred compiled backend: cuda, then wgpu, then cpu, then ndarray.
//! The environment variable `LADIMO_BACKEND` (`cpu`, `ndarray`, `wgpu`, `cuda`) picks another one
//! among those compiled in.

pub use burn::tensor::Device;

#[cfg(feature = "fast-alloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every backend compiled into this binary, preferred first.
pub fn compiled() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "cpu") {
        v.push("cpu");
    }
    if cfg!(feature = "ndarray") {
        v.push("ndarray");
    }
    v
}

/// The device of a backend by name, if that backend is compiled in.
pub fn device_named(name: &str) -> Option<Device> {
    match name {
        #[cfg(feature = "cuda")]
        "cuda" => Some(Device::cuda(0)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cpu")]
        "cpu" => Some(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Some(Device::ndarray()),
        _ => None,
    }
}

/// The name of the backend [`device`] returns.
pub fn name() -> &'static str {
    let compiled = compiled();
    if let Ok(want) = std::env::var("LADIMO_BACKEND")
        && let Some(n) = compiled.iter().find(|n| **n == want)
    {
        return n;
    }
    compiled
        .first()
        .copied()
        .expect("no backend compiled in: enable one of the features cpu, ndarray, wgpu, cuda")
}

/// The device to run on.
pub fn device() -> Device {
    device_named(name()).expect("backend is compiled in")
}
