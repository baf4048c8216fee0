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
