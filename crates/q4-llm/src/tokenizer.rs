//! Tokenizer: HF `tokenizer.json` or the byte-level BPE stored in GGUF metadata, plus the
//! special tokens and chat template that go with it.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde_json::Value as Json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::weights::existing;

/// A text <-> token ids converter with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// Tokens that end a turn in common chat formats (ChatML, Llama 3).
const END_OF_TURN_TOKENS: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<|end|>"];

impl Tokenizer {
    /// `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja`,
    /// `generation_config.json` and `config.json` (eos ids) of an HF directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let path = existing(dir, "tokenizer.json")
            .with_context(|| format!("model directory {} has no tokenizer.json", dir.display()))?;
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let tok_config = read_json(dir, "tokenizer_config.json")?;
        let token_str = |key: &str| -> Option<String> {
            let v = tok_config.as_ref()?.get(key)?;
            match v {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let mut chat_template = match existing(dir, "chat_template.jinja") {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            ),
            None => None,
        };
        if chat_template.is_none() {
            chat_template = tok_config
                .as_ref()
                .and_then(|c| c.get("chat_template"))
                .and_then(template_of);
        }
        let mut eos_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(j) = read_json(dir, file)? {
                eos_ids.extend(ids_of(j.get("eos_token_id")));
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
            eos_ids,
            chat_template,
        })
    }

    /// The BPE described by GGUF `tokenizer.ggml.*` metadata.
    ///
    /// candle's `TokenizerFromGguf` builds vocabulary, merges and special tokens; its
    /// pre-tokenizer is only right for `qwen2`/`llama3`-style files, so the others are set
    /// here the way llama.cpp splits them (e.g. `smollm`: every digit on its own, then GPT-2's
    /// byte-level regex without a prefix space).
    pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
        let mut inner = tokenizers::Tokenizer::from_gguf(content)?;
        let pre = gguf_str(content, "tokenizer.ggml.pre").unwrap_or_else(|| "gpt2".into());
        match pre.as_str() {
            "qwen2" | "llama3" | "smaug-bpe" | "lfm2" => {}
            "llama-bpe" => {
                inner.with_pre_tokenizer(Some(split_then_byte_level(LLAMA3_REGEX)?));
                inner.with_decoder(Some(DecoderWrapper::from(ByteLevelDecoder::default())));
            }
            "gpt2" | "default" => {
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::from(ByteLevel::new(
                    false, true, true,
                ))));
            }
            "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva"
            | "command-r" => {
                let seq = Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ]);
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::from(seq)));
            }
            other => bail!("unsupported GGUF tokenizer pre-tokenizer `{other}`"),
        }
        let tokens = content
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok());
        let token_of = |key: &str| -> Option<String> {
            let id = gguf_u32(content, key)?;
            tokens?.get(id as usize)?.to_string().ok().cloned()
        };
        let bos_token = token_of("tokenizer.ggml.bos_token_id");
        let eos_token = token_of("tokenizer.ggml.eos_token_id");
        let eos_ids = gguf_u32(content, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
            eos_ids,
            chat_template: gguf_str(content, "tokenizer.chat_template"),
        })
    }

    /// The files an HF directory holds for this tokenizer: `tokenizer.json` and a
    /// `tokenizer_config.json` with the special tokens and chat template.
    pub fn hf_files(&self) -> Result<Vec<(String, String)>> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?;
        let mut config = serde_json::Map::new();
        if let Some(t) = &self.bos_token {
            config.insert("bos_token".into(), Json::String(t.clone()));
        }
        if let Some(t) = &self.eos_token {
            config.insert("eos_token".into(), Json::String(t.clone()));
        }
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), Json::String(t.clone()));
        }
        config.insert(
            "tokenizer_class".into(),
            Json::String("PreTrainedTokenizerFast".into()),
        );
        let config = serde_json::to_string_pretty(&Json::Object(config))?;
        Ok(vec![
            ("tokenizer.json".into(), json),
            ("tokenizer_config.json".into(), config),
        ])
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor
    /// adds (e.g. BOS for Llama 3, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// End-of-sequence ids from the tokenizer config, generation config and model config.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Ids that stop generation: EOS and `<|endoftext|>`, plus end-of-turn tokens in chat.
    pub fn stop_ids(&self, chat: bool) -> Vec<u32> {
        let mut ids = self.eos_ids.clone();
        ids.extend(self.token_id("<|endoftext|>"));
        if chat {
            ids.extend(END_OF_TURN_TOKENS.iter().filter_map(|t| self.token_id(t)));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the chat template (e.g. for a model that ships none).
    pub fn set_chat_template(&mut self, template: impl Into<String>) {
        self.chat_template = Some(template.into());
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// An incremental decoder for streaming output.
    pub fn streamer(&self) -> TextStreamer<'_> {
        TextStreamer {
            stream: self.inner.decode_stream(true),
        }
    }
}

/// Turns generated ids into text pieces as soon as they form whole UTF-8 characters.
pub struct TextStreamer<'a> {
    stream: tokenizers::DecodeStream<
        'a,
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
}

impl TextStreamer<'_> {
    /// Feeds one id; returns the new text, if any is complete.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.stream
            .step(id)
            .map_err(|e| anyhow!("cannot decode token {id}: {e}"))
    }
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_then_byte_level(regex: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("bad pre-tokenizer regex: {e}"))?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])
    .into())
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Json>> {
    let Some(p) = existing(dir, name) else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let j = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", p.display()))?;
    Ok(Some(j))
}

/// `chat_template` is a string, or a list of `{name, template}` where `default` wins.
fn template_of(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(n))
            };
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned)
        }
        _ => None,
    }
}

fn ids_of(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn gguf_str(c: &Content, key: &str) -> Option<String> {
    c.metadata.get(key)?.to_string().ok().cloned()
}

fn gguf_u32(c: &Content, key: &str) -> Option<u32> {
    match c.metadata.get(key)? {
        Value::U32(x) => Some(*x),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u32),
        Value::U8(x) => Some(*x as u32),
        _ => None,
    }
}
