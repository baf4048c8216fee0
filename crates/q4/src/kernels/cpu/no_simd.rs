//! Targets without a SIMD micro-kernel: the portable path serves every shape.

use super::rows::Rows;

pub const CHUNK: usize = 64;

pub fn available() -> bool {
    false
}

pub fn permute_activations(x: &[f32], _k: usize, _high_first: bool, out: &mut [f32]) {
    out.copy_from_slice(x);
}

/// # Safety
/// Never called: `available()` is false.
pub unsafe fn rows(
    _w: &Rows<'_>,
    _xp: &[f32],
    _batch: usize,
    _r0: usize,
    _r1: usize,
    _out: &mut [f32],
) {
    unreachable!("no SIMD kernel on this target")
}
