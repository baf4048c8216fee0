//! A multi-turn conversation that keeps its KV cache between turns.

use anyhow::{Context, Result};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::generate::{generate, GenerateOptions, Generation, StopReason};
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// History, chat template and the cache of what has been fed to the model.
pub struct ChatSession {
    template: ChatTemplate,
    messages: Vec<ChatMessage>,
    cache: KvCache,
    /// Token ids whose keys/values are in `cache`.
    cached: Vec<u32>,
}

impl ChatSession {
    /// A new conversation, optionally opened by a system message.
    pub fn new(model: &Model, tok: &Tokenizer, system: Option<&str>) -> Result<ChatSession> {
        let source = tok
            .chat_template()
            .context("this model has no chat template (tokenizer_config.json / GGUF metadata)")?;
        Ok(ChatSession {
            template: ChatTemplate::new(source, tok.bos_token(), tok.eos_token())?,
            messages: system
                .map(|s| vec![ChatMessage::new("system", s)])
                .unwrap_or_default(),
            cache: model.new_cache(1024),
            cached: Vec::new(),
        })
    }

    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Appends a message without generating (e.g. to restore a saved conversation).
    pub fn push_message(&mut self, message: ChatMessage) {
        self.messages.push(message);
    }

    /// Token ids currently held by the KV cache.
    pub fn cached_ids(&self) -> &[u32] {
        &self.cached
    }

    /// The whole conversation so far plus the assistant header, as the model sees it.
    pub fn prompt_ids(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        tok.encode(&self.template.render(&self.messages, true)?, false)
    }

    /// Adds a user message, generates the reply (streamed through `on_token`) and records it.
    pub fn turn(
        &mut self,
        model: &Model,
        tok: &Tokenizer,
        user: &str,
        opts: &GenerateOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        self.messages.push(ChatMessage::new("user", user));
        let ids = self.prompt_ids(tok)?;
        // Feed only what the cache lacks; if the history re-tokenizes differently from what
        // was generated, start over.
        if !ids.starts_with(&self.cached) || ids.len() == self.cached.len() {
            self.cache.reset();
            self.cached.clear();
        }
        let out = generate(
            model,
            &mut self.cache,
            &ids[self.cached.len()..],
            opts,
            on_token,
        )?;
        // Every new token was fed back except the last one when the reply hit the limit (a
        // sampled stop token is not in `out.tokens` at all).
        self.cached = ids;
        self.cached.extend(&out.tokens);
        if out.stop == StopReason::MaxTokens && !out.tokens.is_empty() {
            self.cached.pop();
        }
        let reply = tok.decode(&out.tokens, true)?;
        self.messages
            .push(ChatMessage::new("assistant", reply.trim()));
        Ok(out)
    }
}
