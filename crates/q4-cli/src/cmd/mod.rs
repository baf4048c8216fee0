//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod dequantize;
pub mod doctor;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod ppl;
pub mod quantize;
pub mod train;
