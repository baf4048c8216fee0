//! Autoregressive generation: one batched prefill of the prompt, then one-token decode steps
//! through the KV cache.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when one of these is sampled (it is not part of the output).
    pub stop_tokens: Vec<u32>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was sampled.
    Stop(u32),
    /// `max_new_tokens` were produced.
    MaxTokens,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// New tokens, without the stop token.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    /// Time of the single-token forward passes after the prefill.
    pub decode_time: Duration,
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode steps per second.
    pub fn decode_tok_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt` (which continues whatever
/// `cache` already holds), calling `on_token` with each new token as soon as it is chosen.
///
/// On return the cache holds the prompt and every new token except the last one sampled
/// (which was never fed back).
pub fn generate(
    model: &Model,
    cache: &mut KvCache,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("empty prompt: nothing to generate from");
    }
    let ctx = model.context_length();
    let needed = cache.len() + prompt.len() + opts.max_new_tokens;
    if needed > ctx {
        bail!(
            "{} cached + {} prompt tokens + {} new tokens = {needed} exceeds the model's context \
             length {ctx}",
            cache.len(),
            prompt.len(),
            opts.max_new_tokens
        );
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let device = model.device();
    // The repetition penalty looks at the prompt too.
    let mut history: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::with_capacity(opts.max_new_tokens);
    let mut stop = StopReason::MaxTokens;

    let start = Instant::now();
    // The prompt is always fed, so the cache holds it even when nothing is generated.
    let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let first = model.forward_last(&ids, cache)?.squeeze(0)?;
    let mut logits = (opts.max_new_tokens > 0).then_some(first);
    let prefill_time = start.elapsed();

    let start = Instant::now();
    let mut decode_steps = 0;
    while let Some(l) = logits.take() {
        let next = sampler.sample(&l, &history)?;
        if opts.stop_tokens.contains(&next) {
            stop = StopReason::Stop(next);
            break;
        }
        tokens.push(next);
        history.push(next);
        on_token(next)?;
        if tokens.len() < opts.max_new_tokens {
            logits = Some(model.decode_step(next, cache)?);
            decode_steps += 1;
        }
    }
    Ok(Generation {
        tokens,
        stop,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: start.elapsed(),
        decode_steps,
    })
}
