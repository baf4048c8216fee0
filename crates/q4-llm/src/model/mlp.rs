//! The SiLU-gated feed-forward block.

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use q4::{Format, QLinear};

use crate::config::ModelConfig;
use crate::weights::{checked_linears, LinearSpec, WeightSource};

/// `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
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
        let mut gate_up = checked_linears(
            src,
            &[spec("gate_proj", i, h), spec("up_proj", i, h)],
            quant,
            device,
        )?;
        let mut down = checked_linears(src, &[spec("down_proj", h, i)], quant, device)?;
        let up_proj = gate_up.pop().expect("two layers");
        let gate_proj = gate_up.pop().expect("two layers");
        Ok(Mlp {
            gate_proj,
            up_proj,
            down_proj: down.pop().expect("one layer"),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}
