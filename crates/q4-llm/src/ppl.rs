//! Perplexity.
//!
//! Method: the token sequence is cut into non-overlapping windows of `ctx` tokens (a text that
//! fits is one window; the last window may be shorter). Each window is one causal forward from
//! an empty cache, so its first token has no context and is not scored; every other token `i`
//! is scored with `-log p(token_i | window tokens before i)`. Perplexity is
//! `exp(mean NLL over all scored tokens)`, the usual definition (HF's "non-overlapping
//! windows"; with a single window it equals llama.cpp's and candle's plain `exp(mean NLL)`).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

use crate::model::Model;

/// Positions whose logits are materialised at once (bounds memory for large vocabularies).
const LOGIT_CHUNK: usize = 128;

/// Result of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub ppl: f64,
    /// Mean negative log-likelihood (nats per scored token).
    pub mean_nll: f64,
    /// Tokens of text evaluated.
    pub tokens: usize,
    /// Tokens scored (`tokens` minus one per window).
    pub scored: usize,
    pub windows: usize,
}

/// Perplexity of `tokens` in windows of `ctx` tokens.
pub fn perplexity(model: &Model, tokens: &[u32], ctx: usize) -> Result<Perplexity> {
    perplexity_with_progress(model, tokens, ctx, |_, _, _| {})
}

/// [`perplexity`], calling `progress(windows_done, windows_total, running_ppl)` after each
/// window.
pub fn perplexity_with_progress(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    if ctx < 2 {
        bail!("--ctx must be at least 2, got {ctx}");
    }
    if ctx > model.context_length() {
        bail!(
            "--ctx {ctx} exceeds the model's context length {}",
            model.context_length()
        );
    }
    if tokens.len() < 2 {
        bail!(
            "need at least 2 tokens of text for perplexity, got {}",
            tokens.len()
        );
    }
    let mut total_nll = 0f64;
    let mut scored = 0usize;
    let mut windows = 0usize;
    let total = tokens.chunks(ctx).filter(|w| w.len() >= 2).count();
    for window in tokens.chunks(ctx) {
        if window.len() < 2 {
            continue;
        }
        total_nll += window_nll(model, window)?;
        scored += window.len() - 1;
        windows += 1;
        progress(windows, total, (total_nll / scored as f64).exp());
    }
    let mean_nll = total_nll / scored as f64;
    Ok(Perplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens: tokens.len(),
        scored,
        windows,
    })
}

/// Sum of the NLLs of `window[1..]`.
fn window_nll(model: &Model, window: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache(window.len());
    let ids = Tensor::new(window, model.device())?.unsqueeze(0)?;
    let hidden = model.forward_hidden(&ids, &mut cache, None)?;
    let n = window.len() - 1;
    let mut sum = 0f64;
    let mut start = 0;
    while start < n {
        let len = LOGIT_CHUNK.min(n - start);
        let logits = model
            .logits(&hidden.narrow(1, start, len)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&window[start + 1..start + 1 + len], model.device())?;
        let picked = log_probs
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .to_dtype(DType::F64)?;
        sum -= picked.sum_all()?.to_scalar::<f64>()?;
        start += len;
    }
    Ok(sum)
}
