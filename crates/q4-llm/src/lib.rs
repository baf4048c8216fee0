//! # q4-llm
//!
//! Llama / Qwen2 / Qwen3 decoder-only transformers whose linear layers are [`q4::QLinear`]s,
//! with loaders (Hugging Face directories, GGUF files), tokenizer, chat template, sampling,
//! streaming generation and perplexity.
//!
//! Data flow: [`weights::open_weights`] gives a [`WeightSource`]; [`Model::load`] builds the
//! network from it (quantizing each decoder linear when asked); [`generate::generate`] and
//! [`ppl::perplexity`] run it.

pub mod chat;
pub mod chat_template;
pub mod config;
pub mod default_model;
pub mod device;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod ppl;
pub mod rope;
pub mod sampling;
pub mod text_data;
pub mod threads;
pub mod tokenizer;
pub mod weights;

pub use chat::ChatSession;
pub use config::{Arch, ModelConfig, RopeScaling};
pub use generate::{generate, GenerateOptions, Generation, StopReason};
pub use kv_cache::KvCache;
pub use model::{EmbeddingStorage, LoadOptions, Model};
pub use sampling::{Sampler, SamplingParams};
pub use threads::pin_candle_thread_count;
pub use tokenizer::Tokenizer;
pub use weights::{open_weights, LinearSpec, WeightSource};

/// Opens `path` (an HF model directory or a `.gguf` file) and loads model and tokenizer.
pub fn load(path: &std::path::Path, opts: &LoadOptions) -> anyhow::Result<(Model, Tokenizer)> {
    let source = open_weights(path, opts.w4a4)?;
    let tokenizer = source.tokenizer()?;
    let model = Model::load(source.as_ref(), opts)?;
    Ok((model, tokenizer))
}
