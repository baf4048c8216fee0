//! Rotary position embedding (the HF "rotate half" layout) with precomputed cos/sin tables.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};

/// Tables are precomputed up to this many positions; longer contexts compute their slice.
const MAX_TABLE_POSITIONS: usize = 16_384;

/// cos/sin tables `[positions, head_dim / 2]`.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    cos: Tensor,
    sin: Tensor,
    table_len: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Rope> {
        let inv_freq = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref())?;
        let table_len = cfg.max_position_embeddings.min(MAX_TABLE_POSITIONS);
        let (cos, sin) = tables(&inv_freq, 0, table_len, device)?;
        Ok(Rope {
            inv_freq,
            cos,
            sin,
            table_len,
        })
    }

    /// Positions the precomputed tables cover.
    pub fn table_len(&self) -> usize {
        self.table_len
    }

    /// The precomputed cos and sin tables, `[table_len, head_dim / 2]` f32 each.
    pub fn cos_sin(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`, contiguous) for positions
    /// `offset..offset + seq`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let (cos, sin) = if offset + seq <= self.table_len {
            (
                self.cos.narrow(0, offset, seq)?,
                self.sin.narrow(0, offset, seq)?,
            )
        } else {
            tables(&self.inv_freq, offset, seq, x.device())?
        };
        Ok(candle_nn::rotary_emb::rope(x, &cos, &sin)?)
    }
}

/// Inverse frequencies `1 / theta^(2i / d)`, adjusted by the scaling rule.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Result<Vec<f64>> {
    let half = head_dim / 2;
    let base: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    Ok(match scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            // transformers' `_compute_llama3_parameters`.
            let old_ctx = *original_max_position_embeddings as f64;
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        Some(RopeScaling::FreqFactors(factors)) => {
            if factors.len() != half {
                bail!(
                    "rope_freqs has {} factors, expected head_dim / 2 = {half}",
                    factors.len()
                );
            }
            base.iter()
                .zip(factors)
                .map(|(f, &d)| f / d as f64)
                .collect()
        }
    })
}

fn tables(inv_freq: &[f64], start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in start..start + len {
        for &f in inv_freq {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(DType::F32)?;
    let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(DType::F32)?;
    Ok((cos, sin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let base = inv_freq(128, 500000.0, None).unwrap();
        let scaled = inv_freq(128, 500000.0, Some(&s)).unwrap();
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[63] - base[63] / 8.0).abs() < 1e-18);
        // Medium band is strictly between the two.
        let mid = (0..64)
            .find(|&i| scaled[i] != base[i] && scaled[i] != base[i] / 8.0)
            .unwrap();
        assert!(scaled[mid] < base[mid] && scaled[mid] > base[mid] / 8.0);
    }

    #[test]
    fn table_and_on_the_fly_agree() {
        let f = inv_freq(8, 10000.0, Some(&RopeScaling::Linear { factor: 2.0 })).unwrap();
        let (c, _) = tables(&f, 0, 10, &Device::Cpu).unwrap();
        let (c2, _) = tables(&f, 7, 3, &Device::Cpu).unwrap();
        let a: Vec<Vec<f32>> = c.narrow(0, 7, 3).unwrap().to_vec2().unwrap();
        assert_eq!(a, c2.to_vec2::<f32>().unwrap());
    }
}
