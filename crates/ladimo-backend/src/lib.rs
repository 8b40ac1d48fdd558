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
//! ones back to the OS and page-faults them in again, which made ops 2-4x slower here). mimalloc
//! does the same a second after a buffer is freed (its `purge_delay`), which still cost a third
//! of a polish step in page zeroing: the first [`device_named`] call therefore tells it to keep
//! freed memory (the process stays at its peak, as torch's caching allocator does). The
//! environment variable `MIMALLOC_PURGE_DELAY` (milliseconds; -1 never) overrides that.
//!
//! The feature `alloc-limit` (the fuzz tests' crate, ladimo-fuzz, turns it on) wraps the global
//! allocator with a per-thread limit on one allocation's size ([`alloc_limit`]); a thread that
//! sets no limit sees no difference.
//!
//! [`device`] returns the preferred compiled backend: cuda, then wgpu, then cpu, then ndarray.
//! The environment variable `LADIMO_BACKEND` (`cpu`, `ndarray`, `wgpu`, `cuda`) picks another one
//! among those compiled in.

pub use burn::tensor::Device;

#[cfg(feature = "alloc-limit")]
pub mod alloc_limit;

#[cfg(all(feature = "fast-alloc", not(feature = "alloc-limit")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "fast-alloc", feature = "alloc-limit"))]
#[global_allocator]
static GLOBAL: alloc_limit::Limited<mimalloc::MiMalloc> = alloc_limit::Limited(mimalloc::MiMalloc);

#[cfg(all(not(feature = "fast-alloc"), feature = "alloc-limit"))]
#[global_allocator]
static GLOBAL: alloc_limit::Limited<std::alloc::System> = alloc_limit::Limited(std::alloc::System);

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
    #[cfg(feature = "fast-alloc")]
    keep_freed_memory();
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

/// mimalloc's option index of `purge_delay` (`mi_option_e` in the v3 `mimalloc.h` that
/// libmimalloc-sys 0.1.49 builds; the crate's Rust bindings do not name it). The workspace pins
/// that version, and a test checks that the option does what we set it for.
#[cfg(feature = "fast-alloc")]
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

#[cfg(feature = "fast-alloc")]
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// Never hand freed memory back to the OS (unless `MIMALLOC_PURGE_DELAY` says otherwise): a
/// polish step of SmolLM2 spent 26-37% of its time zeroing pages that mimalloc had purged a
/// second earlier, and runs 1.86x faster without (31.9 -> 17.1 s per step, side by side;
/// docs/reports/expert-granularity.md, section 6). Inference speed did not change measurably.
#[cfg(feature = "fast-alloc")]
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            set_purge_delay_ms(-1);
        }
    });
}

/// Set mimalloc's purge delay in milliseconds (0: hand freed memory back at once; -1: never).
#[cfg(feature = "fast-alloc")]
pub fn set_purge_delay_ms(ms: i64) {
    // SAFETY: a plain setter of a mimalloc global option.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms as std::ffi::c_long) };
}

/// mimalloc's current purge delay in milliseconds (-1: freed memory is kept).
#[cfg(feature = "fast-alloc")]
pub fn purge_delay_ms() -> i64 {
    // SAFETY: a plain getter of a mimalloc global option.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
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
