//! Model hyper-parameters, read from an HF `config.json` or from GGUF metadata.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// The decoder families this crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    /// Maps an HF `architectures` entry or `model_type` to a family.
    pub fn from_hf_name(name: &str) -> Option<Arch> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Arch::Llama),
            "Qwen2ForCausalLM" | "qwen2" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Arch::Qwen3),
            _ => None,
        }
    }
}

/// How positions are stretched before the rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (HF `linear`).
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling (HF `llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, how llama.cpp stores Llama 3 scaling).
    FreqFactors(Vec<f32>),
}

/// Everything the decoder needs to know about its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (always on for Qwen2).
    pub attention_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&json).with_context(|| format!("bad model config {}", path.display()))
    }

    /// Parses an HF config object.
    pub fn from_hf_json(json: &Value) -> Result<ModelConfig> {
        let arch = detect_arch(json)?;
        let raw: HfConfig = serde_json::from_value(json.clone())?;
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (only silu)");
            }
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.num_attention_heads > 0 => raw.hidden_size / raw.num_attention_heads,
            None => 0,
        };
        // transformers >= 5 nests theta and scaling under `rope_parameters`.
        let rope_params = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let scaling = match json.get("rope_scaling").filter(|v| v.is_object()) {
            Some(s) => Some(s),
            None => rope_params,
        };
        let rope_scaling = match scaling {
            Some(s) => parse_rope_scaling(s)?,
            None => None,
        };
        let cfg = ModelConfig {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: ids_of(json.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The fields of an HF config that map one-to-one.
#[derive(Deserialize)]
struct HfConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
}

/// `architectures[0]` first, `model_type` as a fallback; anything else is named in the error.
fn detect_arch(json: &Value) -> Result<Arch> {
    let declared: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(first) = declared.first() {
        return Arch::from_hf_name(first).ok_or_else(|| {
            anyhow::anyhow!(
                "unsupported architecture `{first}` (supported: LlamaForCausalLM, \
                 Qwen2ForCausalLM, Qwen3ForCausalLM)"
            )
        });
    }
    match json.get("model_type").and_then(Value::as_str) {
        Some(t) => Arch::from_hf_name(t).ok_or_else(|| {
            anyhow::anyhow!("unsupported model_type `{t}` (supported: llama, qwen2, qwen3)")
        }),
        None => bail!("config has neither `architectures` nor `model_type`"),
    }
}

/// `rope_scaling` / `rope_parameters`: `None` for the default rotary embedding.
pub fn parse_rope_scaling(s: &Value) -> Result<Option<RopeScaling>> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => bail!("unsupported rope scaling type `{other}` (supported: linear, llama3)"),
    })
}

/// A token id given as a number, a list of numbers or null.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "rope_theta": 500000.0, "max_position_embeddings": 128
        })
    }

    #[test]
    fn parses_old_and_new_rope_fields() {
        let c = ModelConfig::from_hf_json(&base()).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        let mut j = base();
        j["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0});
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    #[test]
    fn unknown_scaling_and_arch_are_named() {
        let mut j = base();
        j["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        let mut j = base();
        j["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_qwen3_has_qk_norm() {
        let mut j = base();
        j["architectures"] = json!(["Qwen2ForCausalLM"]);
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert!(c.attention_bias && !c.qk_norm);
        j["architectures"] = json!(["Qwen3ForCausalLM"]);
        let c = ModelConfig::from_hf_json(&j).unwrap();
        assert!(!c.attention_bias && c.qk_norm);
    }
}
