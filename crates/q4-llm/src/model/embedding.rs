//! The token-embedding table, dense or 4-bit. A 4-bit table is gathered row by row (only the
//! rows of the current tokens are decoded) and, with tied embeddings, is the very same storage
//! the output layer multiplies with.

use anyhow::Result;
use candle_core::{Device, Tensor};
use q4::QTensor;

#[derive(Clone, Debug)]
pub enum Embedding {
    Dense(Tensor),
    Quant(QTensor),
}

impl Embedding {
    /// `[ids.len(), hidden]` f32 rows for flat u32 `ids`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.index_select(ids, 0)?),
            Embedding::Quant(q) => {
                let host: Vec<u32> = ids.to_device(&Device::Cpu)?.to_vec1()?;
                Ok(q.gather_rows(&host)?)
            }
        }
    }
}
