//! Layers that read the same input (q/k/v, gate/up) run as one stacked matmul when their
//! storage allows it: fewer, larger kernel calls, one activation pass.

use anyhow::Result;
use candle_core::{Module, Tensor, D};
use q4::QLinear;

/// A group of linear layers over one input.
#[derive(Clone, Debug)]
pub struct LinearGroup {
    /// The stacked layer, when the parts could be stacked (same format, tensor scale, ...).
    pub(super) fused: Option<QLinear>,
    pub(super) parts: Vec<QLinear>,
}

impl LinearGroup {
    pub fn new(parts: Vec<QLinear>) -> Self {
        let fused = match QLinear::fuse(&parts) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!("running {} layers separately: {e}", parts.len());
                None
            }
        };
        LinearGroup { fused, parts }
    }

    /// Applies `f` to every layer (the stacked one and the parts).
    pub fn map(self, f: &dyn Fn(QLinear) -> Result<QLinear>) -> Result<Self> {
        Ok(LinearGroup {
            fused: self.fused.map(f).transpose()?,
            parts: self.parts.into_iter().map(f).collect::<Result<_>>()?,
        })
    }

    /// The stacked layer (if any) and the parts.
    #[cfg(feature = "cuda")]
    pub fn all(&self) -> impl Iterator<Item = &QLinear> {
        self.fused.iter().chain(&self.parts)
    }

    /// Each part's output, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.fused {
            Some(f) => {
                let y = f.forward(x)?;
                let mut start = 0;
                self.parts
                    .iter()
                    .map(|p| {
                        let part = y.narrow(D::Minus1, start, p.out_features())?;
                        start += p.out_features();
                        Ok(part)
                    })
                    .collect()
            }
            None => self.parts.iter().map(|p| Ok(p.forward(x)?)).collect(),
        }
    }
}
