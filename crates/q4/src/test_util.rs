//! Helpers shared by the unit tests.

/// `len` values uniform in `[-scale, scale)` from `seed` (xorshift), so that a failing case
/// replays.
pub fn uniform(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

/// `‖got - want‖ / ‖want‖`.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f32 = want.iter().map(|b| b * b).sum();
    (num / den.max(f32::MIN_POSITIVE)).sqrt()
}

/// `f()` with denormal operands read as zero (MXCSR.DAZ set on this thread), and whether they
/// did; the previous MXCSR is restored before `f`'s panic, if any, goes on.
#[cfg(target_arch = "x86_64")]
pub fn with_denormals_as_zero<R>(f: impl FnOnce() -> R) -> (R, bool) {
    #[allow(deprecated)] // `_mm_getcsr` / `_mm_setcsr`: deprecated, not removed
    use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
    #[allow(deprecated)]
    // SAFETY: MXCSR is this thread's (SSE, part of x86-64); DAZ (bit 6) only changes how
    // denormal operands read.
    let csr = unsafe { _mm_getcsr() };
    #[allow(deprecated)]
    // SAFETY: as above.
    unsafe {
        _mm_setcsr(csr | 0x40)
    };
    let daz = crate::kernels::cpu::avx512_groups::denormals_are_zero();
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    #[allow(deprecated)]
    // SAFETY: as above; the value read before is put back.
    unsafe {
        _mm_setcsr(csr)
    };
    match got {
        Ok(r) => (r, daz),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
