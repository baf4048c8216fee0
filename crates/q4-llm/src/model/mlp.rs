//! The SiLU-gated feed-forward block.

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use q4::{Format, QLinear};

use super::cpu_ops::silu_mul;
use super::fused::LinearGroup;
use crate::config::ModelConfig;
use crate::weights::{checked_linears, LinearSpec, WeightSource};

/// `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// gate and up projections (one stacked matmul when possible).
    pub(super) gate_up: LinearGroup,
    pub(super) down_proj: QLinear,
}

impl Mlp {
    pub fn load<S: WeightSource + ?Sized>(
        src: &S,
        cfg: &ModelConfig,
        prefix: &str,
        quant: Option<Format>,
        device: &Device,
    ) -> Result<Mlp> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let spec = |name: &str, out_features, in_features| LinearSpec {
            name: format!("{prefix}.{name}"),
            out_features,
            in_features,
            bias,
        };
        // gate and up read the same input: one group, one shared NVFP4 tensor scale.
        let gate_up = checked_linears(
            src,
            &[spec("gate_proj", i, h), spec("up_proj", i, h)],
            quant,
            device,
        )?;
        let mut down = checked_linears(src, &[spec("down_proj", h, i)], quant, device)?;
        Ok(Mlp {
            gate_up: LinearGroup::new(gate_up),
            down_proj: down.pop().expect("one layer"),
        })
    }

    /// Applies `f` to every linear layer.
    pub fn map_linears(self, f: &dyn Fn(QLinear) -> Result<QLinear>) -> Result<Self> {
        Ok(Mlp {
            gate_up: self.gate_up.map(f)?,
            down_proj: f(self.down_proj)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(x)?
            .try_into()
            .expect("two projections");
        let h = match silu_mul(&gate, &up)? {
            Some(h) => h,
            None => (gate.silu()? * up)?,
        };
        Ok(self.down_proj.forward(&h)?)
    }
}
