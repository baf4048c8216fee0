//! Turning a GGUF model into the pieces of a Hugging Face directory (HF-named f32 tensors, a
//! `config.json`, tokenizer files), so `q4 quantize model.gguf` can write it in the ecosystem's
//! quantized layouts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::gguf::GgufSource;
use crate::weights::WeightSource;

/// An HF model in memory: tensors under HF names, its config and tokenizer files.
pub struct HfModel {
    pub tensors: Vec<(String, Tensor)>,
    pub config: Value,
    /// `(file name, contents)`: `tokenizer.json`, `tokenizer_config.json`.
    pub files: Vec<(String, String)>,
}

/// The HF tensor names of a decoder with this config, in checkpoint order.
pub fn tensor_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        names.push(format!("{p}.input_layernorm.weight"));
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("{p}.self_attn.{proj}.weight"));
            if cfg.attention_bias && proj != "o_proj" {
                names.push(format!("{p}.self_attn.{proj}.bias"));
            }
        }
        if cfg.qk_norm {
            names.push(format!("{p}.self_attn.q_norm.weight"));
            names.push(format!("{p}.self_attn.k_norm.weight"));
        }
        names.push(format!("{p}.post_attention_layernorm.weight"));
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("{p}.mlp.{proj}.weight"));
            if cfg.mlp_bias {
                names.push(format!("{p}.mlp.{proj}.bias"));
            }
        }
    }
    names.push("model.norm.weight".to_string());
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".to_string());
    }
    names
}

/// The `config.json` transformers writes for this model (float32 weights).
pub fn hf_config(cfg: &ModelConfig) -> Result<Value> {
    let (arch, model_type) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
    };
    let rope_scaling = match &cfg.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        Some(RopeScaling::FreqFactors(_)) => {
            bail!("this GGUF stores RoPE scaling as per-frequency factors, which an HF config cannot express")
        }
    };
    let eos: Value = match cfg.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    Ok(json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }))
}

/// Reads a GGUF file as an HF model: tensors dequantized to f32 (q/k rows un-permuted).
pub fn gguf_to_hf(path: &Path) -> Result<HfModel> {
    let src = GgufSource::open(path)?;
    let cfg = src.config()?;
    let config = hf_config(&cfg)
        .with_context(|| format!("cannot describe {} as an HF config", path.display()))?;
    let mut tensors = Vec::new();
    for name in tensor_names(&cfg) {
        tensors.push((name.clone(), src.tensor(&name)?));
    }
    // A GGUF without a vocabulary still exports its weights (the tokenizer files are then
    // missing, as they would be in the source).
    let files = if src.content().metadata.contains_key("tokenizer.ggml.model") {
        src.tokenizer()?.hf_files()?
    } else {
        tracing::warn!(
            "{} has no tokenizer metadata; exporting the weights only",
            path.display()
        );
        Vec::new()
    };
    Ok(HfModel {
        tensors,
        config,
        files,
    })
}

/// Writes `files` into `dir` and returns their paths.
pub fn write_files(dir: &Path, files: &[(String, String)]) -> Result<Vec<PathBuf>> {
    files
        .iter()
        .map(|(name, text)| {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
            Ok(p)
        })
        .collect()
}
