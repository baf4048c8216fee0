//! The decoder-only transformer shared by Llama, Qwen2 and Qwen3.
//!
//! The three differ only in details the config carries: Qwen2 has q/k/v biases, Qwen3 a
//! per-head RMSNorm on q and k; everything else (GQA, RoPE, RMSNorm, SiLU MLP, tied or untied
//! embeddings) is common.

mod attention;
mod cpu_ops;
#[cfg(feature = "cuda")]
mod cuda_step;
mod decode_attention;
mod embedding;
mod fused;
mod mlp;
mod norm;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

use q4::{Format, Int8Table, QLinear, QTensor, QuantSpec};

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::rope::Rope;
use crate::weights::{
    checked_linears, int8_table_with_shape, tensor_as_with_shape, LinearSpec, WeightSource,
};
use attention::Attention;
#[cfg(feature = "cuda")]
pub use cuda_step::CudaStepSlot;
use embedding::Embedding;
pub use embedding::EmbeddingStorage;
use mlp::Mlp;
use norm::RmsNorm;

/// How to build a model from its weights.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Quantize every decoder linear (q, k, v, o, gate, up, down) to this format at load.
    pub quant: Option<Format>,
    /// Storage of the token embeddings and of a tied or unquantized `lm_head`; `None` picks
    /// f32 without `quant`, and with it int8 on the CPU (the layout and W8A8 product llama.cpp
    /// uses for these tables: 0.56x the bytes of bf16, SmolLM2 decode ~1.15x, perplexity
    /// 81.07 vs 80.94 with bf16) and bf16 elsewhere. For small models these tables are most of
    /// the bytes read per token.
    pub embeddings: Option<EmbeddingStorage>,
    /// NVFP4 checkpoints: quantize activations with each layer's `input_scale` (W4A4
    /// emulation) instead of running weight-only.
    pub w4a4: bool,
    /// Quantize the decoder linears' activations to int8 per 32 values (W4A8, as llama.cpp does;
    /// bitsandbytes codebooks rounded to int8 too, see `q4::ActQuant::Int8`), for faster CPU
    /// kernels at a small cost in accuracy.
    pub w4a8: bool,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quant: None,
            embeddings: None,
            w4a4: false,
            w4a8: false,
            device: Device::Cpu,
        }
    }
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The output layer: a linear layer (dense or 4-bit), or an int8 table (W8A8, CPU).
#[derive(Clone, Debug)]
enum Head {
    Linear(QLinear),
    Int8(Arc<Int8Table>),
}

impl Head {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Head::Linear(l) => l.forward(x)?,
            Head::Int8(t) => t.matmul(x)?,
        })
    }
}

/// Hidden states of one forward pass, for checking against a reference implementation.
pub struct HiddenStates {
    /// `[batch, seq, hidden]` output of the embedding.
    pub embeddings: Tensor,
    /// Residual stream after each decoder layer.
    pub layer_outputs: Vec<Tensor>,
    /// Output of the final norm (input of `lm_head`).
    pub final_norm: Tensor,
}

/// A loaded decoder; activations are f32.
#[derive(Clone, Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Head,
    rope: Rope,
    device: Device,
    /// Tells models apart (clones share it, and their weights): a captured CUDA decode step
    /// holds the weights' addresses of the model it was captured for.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    id: u64,
}

impl Model {
    pub fn load(src: &dyn WeightSource, opts: &LoadOptions) -> Result<Model> {
        let cfg = src.config()?;
        let dev = &opts.device;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let storage = opts.embeddings.unwrap_or(match opts.quant {
            Some(_) if dev.is_cpu() => EmbeddingStorage::Int8,
            Some(_) => EmbeddingStorage::Bf16,
            None => EmbeddingStorage::F32,
        });
        let embed_dtype = match storage {
            EmbeddingStorage::Bf16 => DType::BF16,
            _ => DType::F32,
        };
        if storage == EmbeddingStorage::Int8 && !dev.is_cpu() {
            bail!("int8 embeddings run on the CPU only; use --embeddings bf16 on {dev:?}");
        }
        let embed_int8 = match storage {
            EmbeddingStorage::Int8 => Some(Arc::new(int8_table_with_shape(
                src,
                "model.embed_tokens.weight",
                [vocab, h],
            )?)),
            _ => None,
        };
        // The dense table only where it is kept (an int8 table is built piecewise above).
        let embed_dense = match embed_int8 {
            Some(_) => None,
            None => Some(
                tensor_as_with_shape(src, "model.embed_tokens.weight", embed_dtype, &[vocab, h])?
                    .to_device(dev)?,
            ),
        };
        let head_quant = match storage {
            EmbeddingStorage::Quantized => Some(
                opts.quant
                    .context("4-bit embeddings need --quant (which format?)")?,
            ),
            _ => None,
        };
        let dense = || -> Result<Tensor> {
            embed_dense
                .clone()
                .context("the dense embedding table is not kept with int8 embeddings")
        };
        let embed_q = match head_quant {
            Some(f) => Some(
                QTensor::quantize(&dense()?, &QuantSpec::new(f))
                    .context("cannot quantize the token embeddings")?,
            ),
            None => None,
        };
        if opts.w4a8 && opts.w4a4 {
            bail!("--w4a8 and --w4a4 exclude each other (one activation format per layer)");
        }
        let act = |l: QLinear| -> Result<QLinear> {
            if opts.w4a8 {
                l.with_act_quant(q4::ActQuant::Int8).context(
                    "--w4a8 needs 4-bit weights (--quant, or a 4-bit checkpoint) and layer input \
                     widths that are multiples of 32",
                )
            } else {
                Ok(l)
            }
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let eps = cfg.rms_norm_eps;
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.input_layernorm.weight"),
                    h,
                    eps,
                    dev,
                )?,
                self_attn: Attention::load(src, &cfg, &format!("{p}.self_attn"), opts.quant, dev)?
                    .map_linears(&act)?,
                post_attention_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                    dev,
                )?,
                mlp: Mlp::load(src, &cfg, &format!("{p}.mlp"), opts.quant, dev)?
                    .map_linears(&act)?,
            });
        }
        let norm = RmsNorm::load(src, "model.norm.weight", h, cfg.rms_norm_eps, dev)?;
        let lm_head = if cfg.tie_word_embeddings {
            match (&embed_int8, &embed_q) {
                (Some(t), _) => Head::Int8(t.clone()),
                (None, Some(q)) => Head::Linear(QLinear::new(q.clone(), None)?),
                (None, None) => Head::Linear(QLinear::dense(dense()?, None)?),
            }
        } else if storage == EmbeddingStorage::Int8 {
            // Built piecewise from the checkpoint, never dense in full.
            Head::Int8(Arc::new(int8_table_with_shape(
                src,
                "lm_head.weight",
                [vocab, h],
            )?))
        } else {
            let spec = LinearSpec {
                name: "lm_head".into(),
                out_features: vocab,
                in_features: h,
                bias: false,
            };
            let head = checked_linears(src, &[spec], head_quant, dev)?
                .pop()
                .expect("one layer");
            match (storage, head.weight()) {
                (EmbeddingStorage::Bf16, q4::qlinear::LinearWeight::Dense(w)) => {
                    Head::Linear(QLinear::dense(w.to_dtype(DType::BF16)?, None)?)
                }
                _ => Head::Linear(head),
            }
        };
        let rope = Rope::new(&cfg, dev)?;
        let embed_tokens = match (embed_int8, embed_q) {
            (Some(t), _) => Embedding::Int8(t),
            (None, Some(q)) => Embedding::Quant(q),
            (None, None) => Embedding::Dense(dense()?),
        };
        Ok(Model {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device: dev.clone(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence the model accepts (`max_position_embeddings` / GGUF context length).
    pub fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// An empty cache for sequences of up to `capacity` positions (it grows if needed).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), capacity.min(self.context_length()))
    }

    /// Logits `[batch, seq, vocab]` for `ids` (`[batch, seq]`, u32 or i64), which continue
    /// what `cache` holds. The whole sequence runs as one batched forward.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.in_pool(|| {
            let hidden = self.forward_hidden(ids, cache, None)?;
            self.logits(&hidden)
        })
    }

    /// Logits `[batch, vocab]` of the last position only (what generation needs).
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.in_pool(|| {
            let hidden = self.forward_hidden(ids, cache, None)?;
            let t = hidden.dim(1)?;
            let last = hidden.narrow(1, t - 1, 1)?;
            Ok(self.logits(&last)?.squeeze(1)?)
        })
    }

    /// Logits `[vocab]` of the position after `token` (batch 1), which continues what `cache`
    /// holds: one decode step. On a CUDA device it runs as a captured CUDA graph where the
    /// model allows (`cuda_step`), elsewhere as [`Model::forward_last`].
    pub fn decode_step(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
        if token as usize >= self.cfg.vocab_size {
            bail!(
                "token id {token} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            );
        }
        if cache.len() + 1 > self.context_length() {
            bail!(
                "sequence of {} positions exceeds the model's context length {}",
                cache.len() + 1,
                self.context_length()
            );
        }
        #[cfg(feature = "cuda")]
        if cache.num_layers() == self.layers.len() {
            if let Some(logits) = cuda_step::decode(self, token, cache)? {
                return Ok(logits);
            }
        }
        let ids = Tensor::new(&[token], &self.device)?.unsqueeze(0)?;
        Ok(self.forward_last(&ids, cache)?.squeeze(0)?)
    }

    /// `lm_head` over final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Like [`Model::forward`] but returns every intermediate hidden state instead of logits.
    pub fn hidden_states(&self, ids: &Tensor, cache: &mut KvCache) -> Result<HiddenStates> {
        let mut trace = Vec::with_capacity(self.layers.len() + 1);
        let final_norm = self.forward_hidden(ids, cache, Some(&mut trace))?;
        let embeddings = trace.remove(0);
        Ok(HiddenStates {
            embeddings,
            layer_outputs: trace,
            final_norm,
        })
    }

    /// Final-norm hidden states `[batch, seq, hidden]`; `trace` collects the embedding
    /// output and each layer's output.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        self.in_pool(|| self.forward_hidden_inner(ids, cache, trace))
    }

    /// Runs `f` on a rayon worker when the model is on the CPU. Each kernel's parallel loop then
    /// forks with `join` (the caller does the other half itself if the second worker is slow to
    /// wake) instead of injecting a job from outside the pool and sleeping until it is done:
    /// one hand-off per forward instead of one per kernel (BENCHMARKS.md has the same-binary
    /// A/B; `Q4_FORWARD_OUTSIDE_POOL=1` is its switch).
    fn in_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        static OUTSIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let outside =
            *OUTSIDE.get_or_init(|| std::env::var_os("Q4_FORWARD_OUTSIDE_POOL").is_some());
        if !outside && self.device.is_cpu() && rayon::current_thread_index().is_none() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    fn forward_hidden_inner(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2().context("token ids must be [batch, seq]")?;
        if t == 0 {
            bail!("empty input: no token ids");
        }
        if cache.num_layers() != self.layers.len() {
            bail!(
                "KV cache has {} layers, model has {}",
                cache.num_layers(),
                self.layers.len()
            );
        }
        let offset = cache.len();
        if offset + t > self.context_length() {
            bail!(
                "sequence of {} positions exceeds the model's context length {}",
                offset + t,
                self.context_length()
            );
        }
        let ids = self.checked_ids(ids)?;
        let mut x =
            self.embed_tokens
                .lookup(&ids.flatten_all()?)?
                .reshape((b, t, self.cfg.hidden_size))?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.push(x.clone());
        }
        let mask = if t > 1 {
            Some(causal_mask(t, offset, &self.device)?)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer
                .self_attn
                .forward(&h, &self.rope, offset, mask.as_ref(), cache, i)?;
            x = (x + h)?;
            let h = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x)?)?;
            x = (x + h)?;
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(x.clone());
            }
        }
        self.norm.forward(&x)
    }

    /// Ids as u32 on the model's device, each checked against the vocabulary.
    fn checked_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = match ids.dtype() {
            DType::U32 => ids.clone(),
            DType::I64 => {
                let min = ids.min_all()?.to_scalar::<i64>()?;
                if min < 0 {
                    bail!("token id {min} is negative");
                }
                ids.to_dtype(DType::U32)?
            }
            other => bail!("token ids must be u32 or i64, got {other:?}"),
        };
        let max = ids.max_all()?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            bail!(
                "token id {max} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            );
        }
        Ok(ids.to_device(&self.device)?)
    }
}

/// Largest absolute elementwise difference of two same-shaped tensors (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same-shaped tensors")
}

/// Additive mask `[t, offset + t]`: query `i` (at position `offset + i`) sees keys `<= offset + i`.
fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}
