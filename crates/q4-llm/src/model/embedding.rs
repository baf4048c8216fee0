//! The token-embedding table, dense or 4-bit. A 4-bit table is gathered row by row (only the
//! rows of the current tokens are decoded) and, with tied embeddings, is the very same storage
//! the output layer multiplies with.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::sync::Arc;

use q4::{Int8Table, QTensor};

/// How the embedding table (and a dense or tied `lm_head`) is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingStorage {
    F32,
    /// Half the bytes of f32 and close to lossless for checkpoints whose embeddings were 8-bit
    /// or bf16 to begin with; multiplied by q4's bf16 kernel.
    Bf16,
    /// int8 in blocks of 32 with an f32 scale (GGUF Q8_0's layout, f32 scales); the output
    /// layer then multiplies with int8 activations (W8A8). CPU only.
    Int8,
    /// The 4-bit format of the decoder layers (smallest, but the output layer is sensitive).
    Quantized,
}

#[derive(Clone, Debug)]
pub enum Embedding {
    Dense(Tensor),
    Quant(QTensor),
    /// Shared with a tied output layer.
    Int8(Arc<Int8Table>),
}

impl Embedding {
    /// `[ids.len(), hidden]` f32 rows for flat u32 `ids`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.index_select(ids, 0)?.to_dtype(candle_core::DType::F32)?),
            Embedding::Quant(q) => {
                let host: Vec<u32> = ids.to_device(&Device::Cpu)?.to_vec1()?;
                Ok(q.gather_rows(&host)?)
            }
            Embedding::Int8(t) => {
                let host: Vec<u32> = ids.to_device(&Device::Cpu)?.to_vec1()?;
                Ok(t.gather_rows(&host)?)
            }
        }
    }
}
