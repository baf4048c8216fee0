//! Errors of the format layer. They carry element indices; callers add file and tensor names.

/// What went wrong while quantizing or decoding.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    /// A NaN or infinity in the input (quantizing non-finite values is refused by default).
    #[error("non-finite value {value} at flat index {index}")]
    NonFinite { index: usize, value: f32 },
    /// The last dimension does not split into whole blocks.
    #[error("last dimension {cols} is not a multiple of the block size {block}")]
    NotBlockMultiple { cols: usize, block: usize },
    /// A block size the format does not allow.
    #[error("block size {0} is not supported (bitsandbytes allows 32, 64, 128, 256, 512, 1024, 2048, 4096)")]
    BlockSize(usize),
    /// A buffer of the wrong length (e.g. a scale tensor that does not match the codes).
    #[error("{what}: expected {expected} elements, found {found}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    /// Any other inconsistency in stored quantization state.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of the format layer.
pub type Result<T> = std::result::Result<T, FormatError>;

/// Checks a buffer length.
pub(crate) fn expect_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(FormatError::Length {
            what,
            expected,
            found,
        })
    }
}
