//! Software prefetch of the weight stream in the batch-1 kernels.
//!
//! A decode step runs many small GEMVs (SmolLM2: 121 of 0.2-1.8 MB per token), each split over
//! the threads in short runs of rows, so the hardware prefetcher spends much of each run
//! ramping up. The kernels therefore ask for the line [`PREFETCH_AHEAD`] bytes ahead of the one
//! they read. Interleaved same-process A/B (`cargo run --release -p q4 --example ab_prefetch`,
//! BENCHMARKS.md): 3-13% less time per cache-cold call on SmolLM2's shapes.

use std::sync::atomic::{AtomicBool, Ordering};

/// Distance ahead of the read position, in bytes of 4-bit codes (4096 weights); int8 and bf16
/// streams scale it to the same number of weights. 2-8 KiB measured alike; 0.5-1 KiB less.
pub const PREFETCH_AHEAD: usize = 2048;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the prefetch on or off for the whole process (for same-process A/B measurements).
#[doc(hidden)]
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the kernels prefetch (read once per kernel call).
#[inline(always)]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

static L2: super::switch::Switch = super::switch::Switch::new("Q4_GEMV_L2_PREFETCH");

/// Whether the GEMV kernels also prefetch their weight stream into L2 ([`prefetch_l2`]) further
/// ahead than the L1 prefetch: default on, off with `Q4_GEMV_L2_PREFETCH=0` or
/// [`set_l2_enabled`].
#[inline]
pub fn l2_enabled() -> bool {
    L2.on()
}

/// Turns the L2 prefetch on or off (for same-process A/B measurements and tests).
#[doc(hidden)]
pub fn set_l2_enabled(on: bool) {
    L2.set(on);
}

/// Hints that the cache line holding `p` is read soon (`prefetcht0`, into L1). Any address is
/// allowed: a prefetch never faults and never changes memory.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    hint::<3>(p) // _MM_HINT_T0
}

/// Hints that the cache line holding `p` is read later: fetched into L2 only (`prefetcht1`),
/// which can hold more misses in flight than L1, so it can run further ahead of the reads.
/// Any address is allowed.
#[inline(always)]
pub fn prefetch_l2(p: *const u8) {
    hint::<2>(p) // _MM_HINT_T1
}

/// `_mm_prefetch` with hint `LEVEL`; nothing on other architectures.
#[inline(always)]
fn hint<const LEVEL: i32>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` / `prefetcht1` are hints (SSE, part of x86-64); they cannot fault,
    // whatever `p` is.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<LEVEL>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_takes_any_address() {
        let v = [1u8; 64];
        prefetch(v.as_ptr());
        prefetch(v.as_ptr().wrapping_add(1 << 40));
        prefetch(std::ptr::null());
        prefetch_l2(v.as_ptr());
        prefetch_l2(v.as_ptr().wrapping_add(1 << 40));
        prefetch_l2(std::ptr::null());
        assert_eq!(v, [1u8; 64]);
    }
}
