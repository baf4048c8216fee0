//! Multi-turn chat keeps its history: the second turn gives exactly what a fresh run over the
//! whole conversation gives, whether it re-used the KV cache or had to start over (a reply
//! that does not re-tokenize to the same ids).

use std::path::PathBuf;

use q4_llm::chat_template::ChatMessage;
use q4_llm::{generate, ChatSession, GenerateOptions, Model, SamplingParams, Tokenizer};

const TEMPLATE: &str = "{% for m in messages %}<|endoftext|>{{ m.role }}\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}";

fn opts() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 4,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    }
}

/// Runs two turns; returns whether the second one re-used the cache.
fn two_turns(model: &Model, tok: &Tokenizer, first_msg: &str) -> bool {
    let mut session = ChatSession::new(model, tok, Some("be brief")).unwrap();
    let first = session
        .turn(model, tok, first_msg, &opts(), |_| Ok(()))
        .unwrap();
    let reply1 = tok.decode(&first.tokens, true).unwrap();
    let second = session
        .turn(model, tok, "and then", &opts(), |_| Ok(()))
        .unwrap();
    let m = session.messages();
    assert_eq!(m.len(), 5, "system, user, assistant, user, assistant");
    assert_eq!(m[2], ChatMessage::new("assistant", reply1.trim()));

    // The same conversation from scratch.
    let mut fresh = ChatSession::new(model, tok, Some("be brief")).unwrap();
    for msg in &m[1..4] {
        fresh.push_message(msg.clone());
    }
    let ids = fresh.prompt_ids(tok).unwrap();
    let mut cache = model.new_cache(ids.len() + 8);
    let want = generate(model, &mut cache, &ids, &opts(), |_| Ok(())).unwrap();
    assert_eq!(second.tokens, want.tokens, "first message {first_msg:?}");
    assert!(session.cached_ids().starts_with(&ids));
    second.prompt_tokens < ids.len()
}

#[test]
fn second_turn_sees_the_first_and_matches_a_fresh_run() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen3");
    let (model, mut tok) = q4_llm::load(&dir, &Default::default()).unwrap();
    tok.set_chat_template(TEMPLATE);
    let prompts = [
        "the quick brown fox",
        "block scales",
        "four bits",
        "the weights are packed",
        "every block stores its own maximum",
        "the lazy dog",
    ];
    let reused = prompts
        .iter()
        .filter(|p| two_turns(&model, &tok, p))
        .count();
    assert!(reused > 0, "no conversation re-used its cache");
}
