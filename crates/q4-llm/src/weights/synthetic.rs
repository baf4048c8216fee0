//! Random weights of a model's shape, made on the target device: what `q4 bench decode-runner`
//! loads to time the runner on shapes whose checkpoints cannot be brought here (Qwen3-4B).
//!
//! Linear weights are N(0, 0.02), embeddings N(0, 1), norm weights 1 + N(0, 0.05), biases
//! N(0, 0.02): magnitudes like a trained model's, so quantization and the kernels see realistic
//! scales. The tokens such a model produces mean nothing.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use q4::qlinear::LinearWeight;
use q4::{Format, QLinear};

use super::{dense_linears, LinearSpec, WeightSource};
use crate::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// A [`WeightSource`] of random tensors for `config`, created on `device`.
pub struct SyntheticSource {
    config: ModelConfig,
    device: Device,
    /// Storage of linear layers left unquantized (`quant = None`): f32 as a dense checkpoint
    /// loads, or bf16 (the usual baseline on a GPU).
    dense_dtype: DType,
}

impl SyntheticSource {
    pub fn new(config: ModelConfig, device: Device, dense_dtype: DType) -> Result<Self> {
        config.validate()?;
        if !matches!(dense_dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("unquantized layers are f32, bf16 or f16, not {dense_dtype:?}");
        }
        Ok(SyntheticSource {
            config,
            device,
            dense_dtype,
        })
    }

    /// The shape of tensor `name` and the spread of its values, if the model has it.
    fn shape_of(&self, name: &str) -> Option<(Vec<usize>, Init)> {
        let c = &self.config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q, kv) = (c.num_heads * d, c.num_kv_heads * d);
        match name {
            "model.embed_tokens.weight" => return Some((vec![c.vocab_size, h], Init::Normal(1.0))),
            "lm_head.weight" if !c.tie_word_embeddings => {
                return Some((vec![c.vocab_size, h], Init::Normal(0.02)))
            }
            "model.norm.weight" => return Some((vec![h], Init::Norm)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, part) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= c.num_layers {
            return None;
        }
        let linear = |out: usize, inp: usize, bias: bool, suffix: &str| match suffix {
            "weight" => Some((vec![out, inp], Init::Normal(0.02))),
            "bias" if bias => Some((vec![out], Init::Normal(0.02))),
            _ => None,
        };
        let (module, suffix) = part.rsplit_once('.')?;
        match module {
            "input_layernorm" | "post_attention_layernorm" if suffix == "weight" => {
                Some((vec![h], Init::Norm))
            }
            "self_attn.q_norm" | "self_attn.k_norm" if suffix == "weight" && c.qk_norm => {
                Some((vec![d], Init::Norm))
            }
            "self_attn.q_proj" => linear(q, h, c.attention_bias, suffix),
            "self_attn.k_proj" | "self_attn.v_proj" => linear(kv, h, c.attention_bias, suffix),
            "self_attn.o_proj" => linear(h, q, false, suffix),
            "mlp.gate_proj" | "mlp.up_proj" => linear(i, h, c.mlp_bias, suffix),
            "mlp.down_proj" => linear(h, i, c.mlp_bias, suffix),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Init {
    Normal(f64),
    /// 1 + N(0, 0.05).
    Norm,
}

impl WeightSource for SyntheticSource {
    fn location(&self) -> &Path {
        Path::new("<synthetic weights>")
    }

    fn config(&self) -> Result<ModelConfig> {
        Ok(self.config.clone())
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        bail!("synthetic weights come without a tokenizer")
    }

    fn contains(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let Some((shape, init)) = self.shape_of(name) else {
            bail!("a {:?} model has no tensor `{name}`", self.config.arch);
        };
        Ok(match init {
            Init::Normal(std) => Tensor::randn(0f32, std as f32, shape, &self.device)?,
            Init::Norm => (Tensor::randn(0f32, 0.05, shape, &self.device)? + 1.0)?,
        })
    }

    fn linears(
        &self,
        group: &[LinearSpec],
        quant: Option<Format>,
        device: &Device,
    ) -> Result<Vec<QLinear>> {
        let layers = dense_linears(self, group, quant, device)?;
        if quant.is_some() || self.dense_dtype == DType::F32 {
            return Ok(layers);
        }
        layers
            .into_iter()
            .map(|l| match l.weight() {
                LinearWeight::Dense(w) => Ok(QLinear::dense(
                    w.to_dtype(self.dense_dtype)?,
                    l.bias().cloned(),
                )?),
                LinearWeight::Quant(_) => Ok(l),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EmbeddingStorage, LoadOptions, Model};

    fn tiny(arch: &str) -> ModelConfig {
        let json = serde_json::json!({
            "model_type": arch, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 300, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": arch == "llama"
        });
        ModelConfig::from_hf_json(&json).unwrap()
    }

    #[test]
    fn loads_every_architecture_and_runs() {
        for arch in ["llama", "qwen2", "qwen3"] {
            for (quant, dtype) in [
                (Some(Format::Nvfp4), DType::F32),
                (None, DType::F32),
                (None, DType::BF16),
            ] {
                let src = SyntheticSource::new(tiny(arch), Device::Cpu, dtype).unwrap();
                let opts = LoadOptions {
                    quant,
                    embeddings: Some(EmbeddingStorage::F32),
                    ..Default::default()
                };
                let model = Model::load(&src, &opts).unwrap();
                let mut cache = model.new_cache(8);
                let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
                let logits = model.forward_last(&ids, &mut cache).unwrap();
                assert_eq!(logits.dims(), [1, 300]);
                let step = model.decode_step(7, &mut cache).unwrap();
                assert_eq!(step.dims(), [300]);
                let v: Vec<f32> = step.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{arch} {quant:?} {dtype:?}"
                );
            }
        }
    }

    #[test]
    fn names_outside_the_model_are_refused() {
        let src = SyntheticSource::new(tiny("llama"), Device::Cpu, DType::F32).unwrap();
        assert!(src.contains("model.layers.1.mlp.down_proj.weight"));
        assert!(!src.contains("model.layers.2.mlp.down_proj.weight"));
        assert!(
            !src.contains("lm_head.weight"),
            "llama here ties its embeddings"
        );
        assert!(!src.contains("model.layers.0.self_attn.q_proj.bias"));
        assert!(!src.contains("model.layers.0.self_attn.q_norm.weight"));
        let err = src.tensor("model.layers.0.mlp.nope.weight").unwrap_err();
        assert!(err.to_string().contains("no tensor"), "{err}");
        let q3 = SyntheticSource::new(tiny("qwen3"), Device::Cpu, DType::F32).unwrap();
        assert!(q3.contains("model.layers.0.self_attn.k_norm.weight"));
        let q2 = SyntheticSource::new(tiny("qwen2"), Device::Cpu, DType::F32).unwrap();
        assert!(q2.contains("model.layers.0.self_attn.v_proj.bias"));
    }
}
