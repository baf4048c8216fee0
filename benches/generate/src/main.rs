//! Same-run generation benchmark on the default model (SmolLM2-135M-Instruct GGUF):
//! q4 with `--quant none|nvfp4|nf4` against candle-transformers' `quantized_llama` running the
//! same GGUF and, when llama-cpp-python is installed, llama.cpp on the GGUF and on a Q4_0 copy;
//! greedy, same prompt token ids. Each configuration runs in its own child process so its peak
//! RSS is its own; the parent checks the machine is idle around each run.
//!
//! ```sh
//! cargo run --release --manifest-path benches/generate/Cargo.toml -- [--new 64] [--reps 5] \
//!     [--no-llama-cpp] [--only q4-nvfp4,llama.cpp-q4_0]
//! ```

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use q4_llm::{generate, GenerateOptions, LoadOptions, SamplingParams};
use serde_json::json;

const PROMPT: &str = "The capital of France is Paris. The capital of Germany is";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Idle CPU fraction of the machine over a short window (1.0 = both cores idle).
fn idle_fraction(ms: u64) -> f64 {
    let read = || -> (u64, u64) {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = s
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        (idle, v.iter().take(8).sum())
    };
    let a = read();
    std::thread::sleep(std::time::Duration::from_millis(ms));
    let b = read();
    (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64
}

/// Runs one configuration in this process and prints a JSON line.
fn child(config: &str, new: usize, reps: usize, long_prompt: usize) -> Result<()> {
    let gguf = q4_llm::default_model::ensure()?;
    let quant = match config {
        "q4-none" => None,
        "q4-nvfp4" => Some(q4::Format::Nvfp4),
        "q4-nf4" => Some(q4::Format::Nf4),
        "q4-nvfp4-ebf16" | "q4-nvfp4-w4a8" | "q4-nvfp4-w4a8-e8" => Some(q4::Format::Nvfp4),
        "candle-q4_1" => return child_candle(&gguf, new, reps, long_prompt),
        "llama.cpp-q4_1" | "llama.cpp-q4_0" => {
            let quant = &config["llama.cpp-".len()..];
            return llama_cpp_job(&gguf, quant, new, reps, long_prompt, "bench");
        }
        other => bail!("unknown configuration {other}"),
    };
    // Suffixes: -w4a8 int8 activations in the decoder, -e8 int8 / -ebf16 bf16 embeddings and
    // LM head (otherwise the runner's default).
    let opts = LoadOptions {
        quant,
        w4a8: config.contains("-w4a8"),
        embeddings: if config.ends_with("-e8") {
            Some(q4_llm::EmbeddingStorage::Int8)
        } else if config.ends_with("-ebf16") {
            Some(q4_llm::EmbeddingStorage::Bf16)
        } else {
            None
        },
        ..Default::default()
    };
    let (model, tok) = q4_llm::load(&gguf, &opts)?;
    let prompt = tok.encode(PROMPT, false)?;
    let long = long_prompt_ids(&tok, long_prompt)?;
    let gen_opts = GenerateOptions {
        max_new_tokens: new,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let mut run = Samples::default();
    for _ in 0..reps {
        let mut cache = model.new_cache(prompt.len() + new);
        let g = generate(&model, &mut cache, &prompt, &gen_opts, |_| Ok(()))?;
        run.prefill
            .push(g.prompt_tokens as f64 / g.prefill_time.as_secs_f64());
        run.decode
            .push(g.decode_steps as f64 / g.decode_time.as_secs_f64());
        run.text = tok.decode(&g.tokens, true)?;
    }
    // Peak of the anchors' configuration (12-token prompt, 64 new tokens), before the long
    // prefill adds its activations.
    run.short_peak_kib = vm_hwm_kib();
    for _ in 0..reps {
        let mut cache = model.new_cache(long.len());
        let t = Instant::now();
        let ids = Tensor::new(long.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        model.forward_last(&ids, &mut cache)?;
        run.long.push(long.len() as f64 / t.elapsed().as_secs_f64());
    }
    run.report(config, prompt.len(), long.len())
}

/// Same-process A/B of a tiled-GEMM choice on the 12-token prefill — tiles decoded in chunk or
/// element order (`--ab-tile-decode`), or the micro-kernel's 3 x 4 or 3 x 3 blocks
/// (`--ab-micro-kernel`) — or on the 12- and a 256-token prefill, the AMX tile GEMM against the
/// SIMD tile kernels (`--ab-amx`, AMX hosts), or on the 12-token prefill the AMX kernel with the
/// activation pieces resident against the two-register one (`--ab-amx-resident`) or the tile
/// decoder with and without its prefetch (`--ab-amx-prefetch`), or the accumulators held in
/// their tile registers over all of K against stored per K slice (`--ab-amx-persist`) —
/// alternating per call so the host's noise hits both alike; prints the median tokens/s of each.
fn ab_prefill(flag: &str, config: &str, reps: usize) -> Result<()> {
    let (select, on_name, off_name): (fn(bool), &str, &str) = match flag {
        "--ab-tile-decode" => (
            q4::kernels::cpu::set_chunk_order_tiles,
            "chunk order",
            "element order",
        ),
        #[cfg(target_arch = "x86_64")]
        "--ab-amx" => (q4::kernels::cpu::amx::set_enabled, "AMX", "SIMD tiles"),
        #[cfg(target_arch = "x86_64")]
        "--ab-amx-resident" => (
            q4::kernels::cpu::amx::set_resident,
            "AMX resident pieces",
            "AMX two-register",
        ),
        #[cfg(target_arch = "x86_64")]
        "--ab-amx-prefetch" => (
            q4::kernels::cpu::amx::set_decode_prefetch,
            "decode prefetch",
            "no decode prefetch",
        ),
        #[cfg(target_arch = "x86_64")]
        "--ab-amx-persist" => (
            q4::kernels::cpu::amx::set_persist,
            "accumulators held over K",
            "accumulators stored per slice",
        ),
        #[cfg(not(target_arch = "x86_64"))]
        "--ab-amx" | "--ab-amx-resident" | "--ab-amx-prefetch" | "--ab-amx-persist" => {
            bail!("{flag}: AMX is an x86-64 feature")
        }
        _ => (
            q4::kernels::cpu::set_wide_tile_blocks,
            "3x4 blocks",
            "3x3 blocks",
        ),
    };
    let quant = match config {
        "q4-nvfp4" => q4::Format::Nvfp4,
        "q4-nf4" => q4::Format::Nf4,
        "q4-mxfp4" => q4::Format::Mxfp4,
        other => bail!("{flag} takes q4-nvfp4, q4-nf4 or q4-mxfp4, not {other}"),
    };
    let gguf = q4_llm::default_model::ensure()?;
    let opts = LoadOptions {
        quant: Some(quant),
        ..Default::default()
    };
    let (model, tok) = q4_llm::load(&gguf, &opts)?;
    let prompts = if flag.starts_with("--ab-amx") {
        #[cfg(target_arch = "x86_64")]
        anyhow::ensure!(
            q4::kernels::cpu::amx::usable(),
            "{flag}: AMX is not usable on this host"
        );
        if flag == "--ab-amx" {
            vec![tok.encode(PROMPT, false)?, long_prompt_ids(&tok, 256)?]
        } else {
            // The resident kernel serves one activation group (up to 16 rows), held
            // accumulators one group pair: the 12-token prompt has both.
            vec![tok.encode(PROMPT, false)?]
        }
    } else {
        vec![tok.encode(PROMPT, false)?]
    };
    for prompt in prompts {
        ab_prompt(&model, &prompt, select, on_name, off_name, config, reps)?;
    }
    Ok(())
}

/// Same-process A/B of the AVX-512 GEMV against the AVX2 one (`--ab-avx512`, AVX-512 hosts):
/// whole greedy generations (12-token prompt, `new` tokens) alternate between the two kernels;
/// prints the median decode and prefill tokens/s of each and checks that both produce the same
/// tokens.
#[cfg(target_arch = "x86_64")]
fn ab_decode(config: &str, new: usize, reps: usize) -> Result<()> {
    use q4::kernels::cpu::avx512;
    anyhow::ensure!(
        avx512::usable(),
        "--ab-avx512: AVX-512F is not usable on this host"
    );
    let quant = match config {
        "q4-nvfp4" => q4::Format::Nvfp4,
        "q4-nf4" => q4::Format::Nf4,
        "q4-mxfp4" => q4::Format::Mxfp4,
        other => bail!("--ab-avx512 takes q4-nvfp4, q4-nf4 or q4-mxfp4, not {other}"),
    };
    let gguf = q4_llm::default_model::ensure()?;
    let opts = LoadOptions {
        quant: Some(quant),
        ..Default::default()
    };
    let (model, tok) = q4_llm::load(&gguf, &opts)?;
    let prompt = tok.encode(PROMPT, false)?;
    let gen_opts = GenerateOptions {
        max_new_tokens: new,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop_tokens: vec![],
    };
    let mut samples = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let mut texts = [Vec::new(), Vec::new()];
    for i in 0..reps + 1 {
        for (s, on) in [true, false].into_iter().enumerate() {
            avx512::set_enabled(on);
            let mut cache = model.new_cache(prompt.len() + new);
            let g = generate(&model, &mut cache, &prompt, &gen_opts, |_| Ok(()))?;
            if i >= 1 {
                samples[s]
                    .0
                    .push(g.decode_steps as f64 / g.decode_time.as_secs_f64());
                samples[s]
                    .1
                    .push(g.prompt_tokens as f64 / g.prefill_time.as_secs_f64());
            }
            texts[s] = g.tokens;
        }
    }
    avx512::set_enabled(true);
    let (on, off) = (&samples[0], &samples[1]);
    println!(
        "{config} {new}-token greedy decode, median of {reps} alternating runs: AVX-512 {:.1} tok/s, AVX2 {:.1} tok/s, ratio x{:.3}; 12-token prefill {:.1} vs {:.1} tok/s; same tokens: {}",
        median(&on.0),
        median(&off.0),
        median(&on.0) / median(&off.0),
        median(&on.1),
        median(&off.1),
        texts[0] == texts[1]
    );
    Ok(())
}

/// One prompt's alternating A/B for [`ab_prefill`].
fn ab_prompt(
    model: &q4_llm::Model,
    prompt: &[u32],
    select: fn(bool),
    on_name: &str,
    off_name: &str,
    config: &str,
    reps: usize,
) -> Result<()> {
    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let (mut on_times, mut off_times) = (Vec::new(), Vec::new());
    for i in 0..reps + 3 {
        for (on, times) in [(true, &mut on_times), (false, &mut off_times)] {
            select(on);
            let mut cache = model.new_cache(prompt.len());
            let t = Instant::now();
            model.forward_last(&ids, &mut cache)?;
            if i >= 3 {
                times.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    select(true);
    let (a, b) = (median(&on_times), median(&off_times));
    println!(
        "{config} {}-token prefill, median of {reps} alternating calls: {on_name} {a:.1} tok/s, {off_name} {b:.1} tok/s, ratio x{:.3}",
        prompt.len(),
        a / b
    );
    Ok(())
}

fn long_prompt_ids(tok: &q4_llm::Tokenizer, n: usize) -> Result<Vec<u32>> {
    let text = q4_llm::text_data::moby_dick()?;
    // Only the start is needed: tokenizing the whole book would dominate the peak RSS.
    let mut end = text.len().min(16 * n.max(64));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let ids = tok.encode(&text[..end], false)?;
    if ids.len() < n {
        anyhow::bail!(
            "the first {end} bytes of Moby-Dick give only {} tokens",
            ids.len()
        );
    }
    Ok(ids[..n.min(ids.len())].to_vec())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// What one configuration measured: tokens/s samples, the last generated text, and the peak
/// RSS after the short runs (before the long prefill adds its activations).
#[derive(Default)]
struct Samples {
    prefill: Vec<f64>,
    decode: Vec<f64>,
    long: Vec<f64>,
    text: String,
    short_peak_kib: u64,
}

impl Samples {
    /// Prints the JSON line the parent reads.
    fn report(&self, config: &str, prompt_tokens: usize, long_tokens: usize) -> Result<()> {
        println!(
            "{}",
            json!({
                "config": config,
                "prefill_tok_s": median(&self.prefill),
                "decode_tok_s": median(&self.decode),
                "long_prefill_tok_s": median(&self.long),
                "prompt_tokens": prompt_tokens,
                "long_prompt_tokens": long_tokens,
                "peak_rss_mib": vm_hwm_kib() as f64 / 1024.0,
                "peak_rss_short_mib": self.short_peak_kib as f64 / 1024.0,
                "text": self.text,
            })
        );
        Ok(())
    }
}

/// candle-transformers' quantized Llama on the GGUF itself (Q4_1 weights, Q8 activations).
fn child_candle(gguf: &std::path::Path, new: usize, reps: usize, long_prompt: usize) -> Result<()> {
    use candle_core::quantized::gguf_file;
    use candle_transformers::models::quantized_llama::ModelWeights;
    let tok = q4_llm::open_weights(gguf, false)?.tokenizer()?;
    let prompt = tok.encode(PROMPT, false)?;
    let long = long_prompt_ids(&tok, long_prompt)?;
    // A fresh model per run resets its KV cache (Content is not Clone: re-read the header).
    let load = || -> Result<ModelWeights> {
        let mut file = std::fs::File::open(gguf)?;
        let content = gguf_file::Content::read(&mut file)?;
        Ok(ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?)
    };
    let mut run = Samples::default();
    for _ in 0..reps {
        let mut model = load()?;
        let t = Instant::now();
        let logits = model.forward(
            &Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            0,
        )?;
        let mut next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        run.prefill
            .push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let mut out = vec![next];
        let t = Instant::now();
        for i in 0..new - 1 {
            let logits = model.forward(
                &Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?,
                prompt.len() + i,
            )?;
            next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            out.push(next);
        }
        run.decode
            .push((new - 1) as f64 / t.elapsed().as_secs_f64());
        run.text = tok.decode(&out, true)?;
    }
    run.short_peak_kib = vm_hwm_kib();
    for _ in 0..reps {
        let mut model = load()?;
        let t = Instant::now();
        model.forward(
            &Tensor::new(long.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            0,
        )?;
        run.long.push(long.len() as f64 / t.elapsed().as_secs_f64());
    }
    run.report("candle-q4_1", prompt.len(), long.len())
}

/// llama.cpp through llama-cpp-python (`scripts/cpu/llama_cpp_child.py`), fed q4's token ids
/// so that both run the very same inputs (`mode`: "bench" prints the script's JSON line with
/// its own peak RSS, "ppl" the perplexity of the long prompt).
fn llama_cpp_job(
    gguf: &std::path::Path,
    quant: &str,
    new: usize,
    reps: usize,
    long_prompt: usize,
    mode: &str,
) -> Result<()> {
    let tok = q4_llm::open_weights(gguf, false)?.tokenizer()?;
    let job = json!({
        "mode": mode,
        "gguf": gguf,
        "quant": quant,
        "prompt": tok.encode(PROMPT, false)?,
        "long": long_prompt_ids(&tok, long_prompt)?,
        "new": new,
        "reps": reps,
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/cpu/llama_cpp_child.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    drop(tok);
    serde_json::to_writer(child.stdin.take().expect("piped stdin"), &job)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

fn llama_cpp_available() -> bool {
    Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Perplexity of the first `n` Moby-Dick tokens (same tokens as `q4 ppl --max-tokens n`) with
/// candle-transformers' quantized Llama, one token per forward (it returns the last position's
/// logits only): a cross-check of q4's `none` perplexity against the candle anchor.
fn candle_ppl(n: usize) -> Result<()> {
    use candle_core::quantized::gguf_file;
    use candle_transformers::models::quantized_llama::ModelWeights;
    let gguf = q4_llm::default_model::ensure()?;
    let tok = q4_llm::open_weights(&gguf, false)?.tokenizer()?;
    let ids = long_prompt_ids(&tok, n)?;
    // The very tokens `q4 ppl --text moby-dick --max-tokens n` scores (whole text, specials on).
    let q4_ids = tok.encode(&q4_llm::text_data::moby_dick()?, true)?;
    if q4_ids[..n] != ids[..] {
        bail!("tokenization differs from `q4 ppl`'s");
    }
    let mut file = std::fs::File::open(&gguf)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut nll = 0f64;
    for (pos, w) in ids.windows(2).enumerate() {
        let logits = model.forward(&Tensor::new(&[w[0]], &Device::Cpu)?.unsqueeze(0)?, pos)?;
        let lp =
            candle_nn::ops::log_softmax(&logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?, 0)?;
        nll -= lp.get(w[1] as usize)?.to_scalar::<f32>()? as f64;
    }
    let scored = ids.len() - 1;
    println!(
        "candle quantized_llama ppl={:.4} tokens={} scored={scored}",
        (nll / scored as f64).exp(),
        ids.len()
    );
    Ok(())
}

/// One line of same-run ratios of configuration `r` to `base`.
fn print_ratio(r: &serde_json::Value, base: &serde_json::Value) {
    let ratio = |key: &str| r[key].as_f64().unwrap_or(0.0) / base[key].as_f64().unwrap_or(1.0);
    println!(
        "ratio {:<9} vs {}: prefill x{:.2}, decode x{:.2}, prefill256 x{:.2}, peak RSS x{:.2}",
        r["config"].as_str().unwrap_or(""),
        base["config"].as_str().unwrap_or(""),
        ratio("prefill_tok_s"),
        ratio("decode_tok_s"),
        ratio("long_prefill_tok_s"),
        ratio("peak_rss_short_mib"),
    );
}

const USAGE: &str = "usage: q4-bench-generate [--new N (64)] [--reps N (5)] [--long N (256)] \
[--no-llama-cpp] [--only CONFIG,...] | --candle-ppl [--ppl-tokens N] | --llama-cpp-ppl [--ppl-tokens N] \
| --ab-tile-decode CONFIG [--reps N (200)] | --ab-micro-kernel CONFIG [--reps N (200)] \
| --ab-amx CONFIG [--reps N (200)] | --ab-amx-resident CONFIG [--reps N (200)] \
| --ab-amx-prefetch CONFIG [--reps N (200)] | --ab-amx-persist CONFIG [--reps N (200)] \
| --ab-avx512 CONFIG [--new N (64)] [--reps N (20)]";

/// The prefill A/B flags, each taking a configuration ([`ab_prefill`]).
const AB_PREFILL: [&str; 6] = [
    "--ab-tile-decode",
    "--ab-micro-kernel",
    "--ab-amx",
    "--ab-amx-resident",
    "--ab-amx-prefetch",
    "--ab-amx-persist",
];

/// Flags this binary takes (`--child` is its own re-invocation); anything else is refused
/// rather than silently starting a several-minute run.
fn check_args(args: &[String]) -> Result<bool> {
    const VALUED: [&str; 7] = [
        "--new",
        "--reps",
        "--long",
        "--only",
        "--ppl-tokens",
        "--child",
        "--ab-avx512",
    ];
    const FLAGS: [&str; 3] = ["--no-llama-cpp", "--candle-ppl", "--llama-cpp-ppl"];
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--help" || a == "-h" {
            return Ok(false);
        }
        if VALUED.contains(&a) || AB_PREFILL.contains(&a) {
            if args.get(i + 1).is_none() {
                bail!("{a} needs a value\n{USAGE}");
            }
            i += 2;
        } else if FLAGS.contains(&a) {
            i += 1;
        } else {
            bail!("unknown argument `{a}`\n{USAGE}");
        }
    }
    Ok(true)
}

fn main() -> Result<()> {
    // q4's own setting, for q4's configurations (the children); candle's peer gets it too, so
    // its matmuls stop re-reading /proc/cpuinfo as well (same thread count either way here).
    q4_llm::pin_candle_thread_count();
    let args: Vec<String> = std::env::args().collect();
    if !check_args(&args)? {
        println!("{USAGE}");
        return Ok(());
    }
    let new = arg("--new", 64);
    let reps = arg("--reps", 5);
    let long = arg("--long", 256);
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(&args[i + 1], new, reps, long);
    }
    for flag in AB_PREFILL {
        if let Some(i) = args.iter().position(|a| a == flag) {
            return ab_prefill(flag, &args[i + 1], arg("--reps", 200));
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--ab-avx512") {
        #[cfg(target_arch = "x86_64")]
        return ab_decode(&args[i + 1], new, arg("--reps", 20));
        #[cfg(not(target_arch = "x86_64"))]
        bail!(
            "--ab-avx512: AVX-512 is an x86-64 feature (argument {})",
            args[i + 1]
        );
    }
    if args.iter().any(|a| a == "--candle-ppl") {
        return candle_ppl(arg("--ppl-tokens", 256));
    }
    if args.iter().any(|a| a == "--llama-cpp-ppl") {
        // The same first n Moby-Dick tokens as `--candle-ppl` and `q4 ppl --max-tokens n`.
        return llama_cpp_job(
            &q4_llm::default_model::ensure()?,
            "q4_1",
            0,
            0,
            arg("--ppl-tokens", 256),
            "ppl",
        );
    }
    let exe = std::env::current_exe()?;
    println!("# generation benchmark: SmolLM2-135M-Instruct (Q4_1 GGUF), {} threads, 12-token prompt, {new} new tokens, long prefill {long} tokens, median of {reps}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    // Two peaks: after the 12-token prompt + new tokens runs (the anchors' configuration), and
    // over the whole child including the long prefill.
    println!(
        "{:<12} {:>11} {:>11} {:>14} {:>10} {:>10} {:>6}  text",
        "config", "prefill t/s", "decode t/s", "prefill256 t/s", "peak MiB", "peak+256", "idle"
    );
    let mut rows = Vec::new();
    let mut configs = vec![
        "candle-q4_1",
        "q4-none",
        "q4-nvfp4",
        "q4-nvfp4-ebf16",
        "q4-nvfp4-w4a8",
        "q4-nvfp4-w4a8-e8",
        "q4-nf4",
    ];
    // The anchors' other peer, when llama-cpp-python is installed (`pip install llama-cpp-python`).
    if args.iter().any(|a| a == "--no-llama-cpp") || !llama_cpp_available() {
        println!("# llama.cpp: skipped (no `import llama_cpp`, or --no-llama-cpp)");
    } else {
        configs.extend(["llama.cpp-q4_1", "llama.cpp-q4_0"]);
    }
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let keep: Vec<&str> = args
            .get(i + 1)
            .map(|s| s.split(',').collect())
            .unwrap_or_default();
        configs.retain(|c| *c == "candle-q4_1" || keep.contains(c));
    }
    for config in configs {
        let idle_before = idle_fraction(500);
        let out = Command::new(&exe)
            .args([
                "--child",
                config,
                "--new",
                &new.to_string(),
                "--reps",
                &reps.to_string(),
                "--long",
                &long.to_string(),
            ])
            .output()
            .with_context(|| format!("cannot run the {config} child"))?;
        if !out.status.success() {
            bail!("{config} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        println!(
            "{:<12} {:>11.1} {:>11.1} {:>14.1} {:>10.1} {:>10.1} {:>5.0}%  {:?}",
            config,
            v["prefill_tok_s"].as_f64().unwrap_or(f64::NAN),
            v["decode_tok_s"].as_f64().unwrap_or(f64::NAN),
            v["long_prefill_tok_s"].as_f64().unwrap_or(f64::NAN),
            v["peak_rss_short_mib"].as_f64().unwrap_or(f64::NAN),
            v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            idle_before * 100.0,
            v["text"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(40)
                .collect::<String>()
        );
        rows.push(v);
    }
    // Same-run ratios against llama.cpp's fastest configuration (when it ran), then candle.
    if let Some(ll) = rows.iter().find(|r| r["config"] == "llama.cpp-q4_0") {
        for r in rows
            .iter()
            .filter(|r| r["config"].as_str().is_some_and(|c| c.starts_with("q4-")))
        {
            print_ratio(r, ll);
        }
    }
    for r in &rows[1..] {
        print_ratio(r, &rows[0]);
    }
    Ok(())
}
