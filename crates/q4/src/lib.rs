//! # q4
//!
//! 4-bit weights for candle: [`QTensor`] (packed codes + block scales on any device) and
//! [`QLinear`] (a `candle_nn::Module` with fused dequantize-on-the-fly kernels).

pub mod cache_home;
pub mod checkpoint;
pub mod error;
pub mod host_bytes;
pub mod int8_table;
pub mod kernels;
pub mod lut;
pub mod probe;
pub mod qlinear;
pub mod qtensor;
#[cfg(test)]
mod test_util;

pub use error::{Context, Error, Result};
pub use host_bytes::HostBytes;
pub use int8_table::Int8Table;
pub use q4_formats::{Format, NonFinite};
pub use qlinear::{ActQuant, QLinear};
pub use qtensor::{QTensor, QuantSpec, Quantized};
