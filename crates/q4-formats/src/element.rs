//! Element types accepted by the quantizers and produced by the dequantizers.

use half::{bf16, f16};

/// A floating-point element that quantizers read. Conversion to f32 is exact for all of them.
pub trait Element: Copy + Send + Sync + 'static {
    /// Human-readable dtype name (as safetensors spells it).
    const NAME: &'static str;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Narrows from f32 with round-to-nearest-even (what torch's `.to(dtype)` does).
    fn from_f32(x: f32) -> Self;
    /// Absolute-value bit pattern of the f32 widening, for fast NaN-aware maxima.
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_f32().to_bits() & 0x7fff_ffff
    }
}

impl Element for f32 {
    const NAME: &'static str = "F32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    const NAME: &'static str = "BF16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f16 {
    const NAME: &'static str = "F16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Absolute maximum of a slice via the ordered bit patterns of non-negative floats: NaN and Inf
/// compare above every finite value, so a single `>= 0x7f80_0000` test finds them.
#[inline(always)]
pub(crate) fn abs_max_bits<T: Element>(xs: &[T]) -> u32 {
    let mut m = 0u32;
    for &x in xs {
        m = m.max(x.abs_bits());
    }
    m
}

/// Index (within `xs`) of the first NaN or infinity.
pub(crate) fn first_non_finite<T: Element>(xs: &[T]) -> Option<usize> {
    xs.iter().position(|x| !x.to_f32().is_finite())
}
