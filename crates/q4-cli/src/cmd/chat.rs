//! `q4 chat`: interactive multi-turn chat. Reads one user message per line from stdin,
//! streams each reply to stdout, keeps the conversation (and its KV cache) between turns,
//! and ends on EOF or `/exit`.

use std::io::{BufRead, Write};

use anyhow::{bail, Result};
use q4_llm::chat_template::ChatMessage;
use q4_llm::GenerateOptions;

use super::generate::{log_speed, render_chat, stream, ModelArgs, SamplingArgs};

/// Arguments of `q4 chat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let params = args.sampling.params()?;
    let (model, tok) = args.model.load()?;
    if tok.chat_template().is_none() {
        bail!("this model has no chat template (tokenizer_config.json / GGUF metadata)");
    }
    let opts = GenerateOptions {
        max_new_tokens: args.sampling.max_tokens,
        sampling: params,
        stop_tokens: tok.stop_ids(true),
    };
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut cache = model.new_cache(1024);
    // Token ids whose keys/values are in `cache`.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        if text == "/exit" {
            break;
        }
        if text.is_empty() {
            continue;
        }
        messages.push(ChatMessage::new("user", text));
        let ids = tok.encode(&render_chat(&tok, &messages)?, false)?;
        // Re-use the cache when the new conversation extends what it holds; otherwise (the
        // reply re-tokenized differently) start over.
        if !ids.starts_with(&cached) || ids.len() == cached.len() {
            cache.reset();
            cached.clear();
        }
        let new = &ids[cached.len()..];
        let out = stream(&model, &tok, &mut cache, new, &opts)?;
        log_speed(&out);
        // Every new token was fed back except the last one when the reply hit --max-tokens
        // (a sampled stop token is not in `out.tokens` at all).
        cached = ids;
        cached.extend(&out.tokens);
        if out.stop == q4_llm::StopReason::MaxTokens {
            cached.pop();
            tracing::warn!("reply cut at --max-tokens {}", opts.max_new_tokens);
        }
        let reply = tok.decode(&out.tokens, true)?;
        messages.push(ChatMessage::new("assistant", reply.trim()));
    }
    Ok(())
}
