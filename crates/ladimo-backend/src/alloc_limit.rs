//! A per-thread limit on the size of one allocation (feature `alloc-limit`), for the fuzz tests:
//! a parser that sizes a buffer from a length or count read from a file must not ask for more
//! memory than the file could justify. The process has one global allocator and this crate
//! chooses it, so the limit lives here, wrapped around mimalloc (`fast-alloc`) or the system
//! allocator.
//!
//! A thread sets a limit with [`set`]; every allocation or reallocation on that thread larger
//! than the limit is recorded ([`take_violation`] returns the largest) and still served, so the
//! caller can report it and go on. One larger than [`REFUSE_FACTOR`] times the limit is refused
//! after a one-line message on standard error naming the size, the limit and the caller's tag
//! (the process then aborts, as Rust does on any failed allocation): serving it could exhaust the
//! machine. Threads that set no limit are not affected.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

/// Allocations over this many times the limit are refused rather than served.
pub const REFUSE_FACTOR: usize = 4;

thread_local! {
    /// The limit in bytes (`usize::MAX`: none), the caller's tag, and the largest allocation
    /// seen over the limit since the last [`take_violation`] (0: none).
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    static TAG: Cell<u64> = const { Cell::new(0) };
    static WORST: Cell<usize> = const { Cell::new(0) };
}

/// Limit one allocation on this thread to `bytes` (`None`: no limit). `tag` (a seed, a case
/// number) is printed if an allocation is refused, so the case can be rerun.
pub fn set(bytes: Option<usize>, tag: u64) {
    LIMIT.with(|l| l.set(bytes.unwrap_or(usize::MAX)));
    TAG.with(|t| t.set(tag));
    WORST.with(|w| w.set(0));
}

/// The largest allocation over the limit on this thread since the last call (or [`set`]), if any.
pub fn take_violation() -> Option<usize> {
    let w = WORST.with(|w| w.replace(0));
    (w > 0).then_some(w)
}

/// Wraps the process's allocator `A` with the per-thread limit.
pub struct Limited<A>(pub A);

impl<A> Limited<A> {
    /// Whether an allocation of `size` bytes may be served (recording it when over the limit).
    fn admit(size: usize) -> bool {
        // `try_with`: during thread teardown the slots may be gone; no limit then.
        let limit = LIMIT.try_with(Cell::get).unwrap_or(usize::MAX);
        if size <= limit {
            return true;
        }
        let _ = WORST.try_with(|w| w.set(w.get().max(size)));
        if size / REFUSE_FACTOR <= limit {
            return true;
        }
        let tag = TAG.try_with(Cell::get).unwrap_or(0);
        refuse_message(size, limit, tag);
        false
    }
}

/// Writes "refused an allocation of N bytes (limit L; tag T)" to standard error without
/// allocating (the allocator cannot call itself).
fn refuse_message(size: usize, limit: usize, tag: u64) {
    use std::io::Write;
    let mut buf = [0u8; 160];
    let mut w = &mut buf[..];
    let _ = writeln!(
        w,
        "ladimo-backend alloc-limit: refused an allocation of {size} bytes (limit {limit}; tag {tag})"
    );
    let left = w.len();
    let n = buf.len() - left;
    let _ = std::io::stderr().write_all(&buf[..n]);
}

// SAFETY: every call is forwarded unchanged to `A`, or answered with null (a refused
// allocation), which `GlobalAlloc` allows.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Limited<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::admit(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}
