//! Helpers shared by the CUDA test files (a module of each, not a test target of its own).
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};

/// Deterministic pseudo-random values with a spread of magnitudes, signed zeros and zero blocks.
pub fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..len)
        .map(|i| {
            let r = next();
            let u = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let scale = [1.0f32, 0.01, 30.0, 1e-4][(r % 4) as usize];
            match i % 97 {
                0 => -0.0,
                1..=16 if (i / 97) % 5 == 0 => 0.0,
                _ => u * scale,
            }
        })
        .collect()
}

/// A tensor's values as f32 bit patterns (bf16 / f16 widen exactly).
pub fn bits_f32(t: &Tensor) -> Vec<u32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Panics naming `what`, the first output where `got` and `want` (f32 bit patterns, see
/// [`bits_f32`]) differ and both values, unless they are identical; their lengths must be `len`.
pub fn assert_same_bits(got: &[u32], want: &[u32], len: usize, what: std::fmt::Arguments<'_>) {
    assert_eq!(
        (got.len(), want.len()),
        (len, len),
        "{what}: output lengths"
    );
    if let Some(i) = (0..len).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: output {i} differs: {:#x} against {:#x}",
            got[i], want[i]
        );
    }
}
