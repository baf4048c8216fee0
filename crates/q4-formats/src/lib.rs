//! # q4-formats
//!
//! Bit-exact 4-bit weight formats, with no tensor-library dependency:
//!
//! * [`nvfp4`]: NVIDIA NVFP4 as ModelOpt exports it (E2M1 + E4M3 block scale per 16 + f32 tensor scale);
//! * [`bnb`]: bitsandbytes NF4 and FP4 with double quantization;
//! * [`mxfp4`]: OCP MXFP4 (E2M1 + E8M0 per 32) with the RCEIL, FLOOR and EVEN scale rules;
//! * [`scalar`]: the E2M1, E4M3FN and E8M0 scalars under them.
//!
//! The rules, and which reference each one reproduces, are in `FORMATS.md` and `DESIGN.md`.
//! Quantizers and dequantizers are multithreaded (rayon) and vectorised (AVX2 when present).

pub mod bnb;
pub mod codebook;
pub mod element;
pub mod error;
pub mod mxfp4;
pub mod nvfp4;
pub mod scalar;
pub mod simd;

pub use element::Element;
pub use error::{FormatError, Result};

/// What quantizers do with NaN and infinite inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinite {
    /// Refuse with [`FormatError::NonFinite`] naming the first offending index (the default).
    #[default]
    Reject,
    /// Quantize NaN and +-Inf as if they were 0.
    Zero,
}

/// The 4-bit formats q4 implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Nvfp4,
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
    Mxfp4,
}

impl Format {
    /// All formats.
    pub const ALL: [Format; 4] = [Format::Nvfp4, Format::Nf4, Format::Fp4, Format::Mxfp4];

    /// Lower-case name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Nvfp4 => "nvfp4",
            Format::Nf4 => "nf4",
            Format::Fp4 => "fp4",
            Format::Mxfp4 => "mxfp4",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
    }

    /// Default block size.
    pub fn default_block_size(self) -> usize {
        match self {
            Format::Nvfp4 => nvfp4::BLOCK,
            Format::Mxfp4 => mxfp4::BLOCK,
            Format::Nf4 | Format::Fp4 => 64,
        }
    }

    /// Storage cost in bits per weight for `numel` weights with the given block size, counting
    /// every stored byte (codes and scales; tensor scales amortised).
    pub fn bits_per_weight(self, block: usize, double_quant: bool) -> f64 {
        match self {
            Format::Nvfp4 => 4.0 + 8.0 / block as f64,
            Format::Mxfp4 => 4.0 + 8.0 / block as f64,
            Format::Nf4 | Format::Fp4 => {
                if double_quant {
                    4.0 + 8.0 / block as f64 + 32.0 / (block * bnb::NESTED_BLOCK) as f64
                } else {
                    4.0 + 32.0 / block as f64
                }
            }
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
