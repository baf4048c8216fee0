//! RMSNorm.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::weights::{tensor_with_shape, WeightSource};

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
}

impl RmsNorm {
    pub fn load<S: WeightSource + ?Sized>(
        src: &S,
        name: &str,
        size: usize,
        eps: f64,
        device: &Device,
    ) -> Result<RmsNorm> {
        let weight = tensor_with_shape(src, name, &[size])?.to_device(device)?;
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}
