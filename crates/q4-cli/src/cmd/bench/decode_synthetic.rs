//! `q4 bench decode-synthetic`: decode tokens/s of a Qwen3-4B-shaped stack with random weights,
//! bf16 against 4-bit formats, on one GPU.
//!
//! What one decode step contains (batch 1, bf16 activations, all on the device):
//! embedding row gather; per layer: residual add + RMSNorm, fused q/k/v projection, RoPE and KV
//! cache append, single-query attention over the cache (GQA), output projection, residual add +
//! RMSNorm, fused gate/up projection, SiLU(gate) * up, down projection; final RMSNorm, LM head
//! and a greedy argmax that feeds the next step. The projections are `QLinear` layers (bf16:
//! candle's cuBLAS matmul; 4-bit: q4's CUDA kernels), LM head included in the same format.
//! Not included: tokenizer, sampling beyond argmax, q/k-norm, host round trips. The position and
//! token live in device memory, so the whole step is captured once in a CUDA graph and replayed
//! for every token (with `--no-graph`, eager launches).

use anyhow::{bail, Result};

/// Arguments of `q4 bench decode-synthetic`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weight formats: bf16 and/or 4-bit formats.
    #[arg(long, value_delimiter = ',', default_value = "bf16,nvfp4,nf4")]
    formats: Vec<String>,
    /// Timed decode steps (tokens); the KV cache grows to this length.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Decoder layers (Qwen3-4B: 36).
    #[arg(long, default_value_t = 36)]
    layers: usize,
    /// Time eager launches instead of a captured CUDA graph.
    #[arg(long)]
    no_graph: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: Args) -> Result<()> {
    bail!("this q4 was built without the `cuda` feature; rebuild with `--features cuda`")
}

#[cfg(feature = "cuda")]
pub fn run(args: Args) -> Result<()> {
    imp::run(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::cmd::bench::gpu::{Gpu, KERNELS};
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::{sys, LaunchConfig};
    use candle_core::{DType, Device, Module, Tensor};
    use q4::kernels::cuda::{device_ptr, launch_ex};
    use q4::qtensor::QuantSpec;
    use q4::{Format, QLinear};

    const HIDDEN: usize = 2560;
    const INTER: usize = 9728;
    const HEADS: usize = 32;
    const KV_HEADS: usize = 8;
    const HEAD_DIM: usize = 128;
    const VOCAB: usize = 151936;
    const EPS: f32 = 1e-6;
    const THETA: f32 = 1_000_000.0;

    struct Layer {
        ln1: Tensor,
        qkv: QLinear,
        o: QLinear,
        ln2: Tensor,
        gate_up: QLinear,
        down: QLinear,
        k_cache: Tensor,
        v_cache: Tensor,
    }

    struct Model {
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: QLinear,
        inv_freq: Tensor,
        // Device-side state and work buffers (fixed addresses for graph replay).
        token: Tensor,
        pos: Tensor,
        resid: Tensor,
        h: Tensor,
        q: Tensor,
        attn: Tensor,
        act: Tensor,
        // Projection outputs, written in place (`QLinear::forward_into`) when `into`: the 4-bit
        // formats, unless `Q4_BENCH_INTO=0`. Then the captured graph holds no memory nodes
        // between its kernels, and each GEMV starts while the kernel before it finishes. bf16
        // layers (candle's cuBLAS matmul) allocate their outputs: writing them in place would
        // add a copy.
        into: bool,
        qkv_out: Tensor,
        o_out: Tensor,
        gu_out: Tensor,
        down_out: Tensor,
        logits: Tensor,
        weight_bytes: usize,
    }

    /// `layer(x)`, into `out` when the model writes projections in place.
    fn project(m: &Model, layer: &QLinear, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        if skipped("proj") {
            return Ok(out.clone());
        }
        if m.into {
            layer.forward_into(x, out)?;
            Ok(out.clone())
        } else {
            Ok(layer.forward(x)?)
        }
    }

    /// Timing aid: `Q4_BENCH_SKIP` names step kernels not to launch (`norm`, `rope`, `attend`,
    /// `silu`, `proj`), so that a run's time without them shows what they cost. The tokens such
    /// a step produces are no model's.
    fn skipped(kernel: &str) -> bool {
        static SKIP: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
            let v: Vec<String> = std::env::var("Q4_BENCH_SKIP")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if !v.is_empty() {
                tracing::warn!("Q4_BENCH_SKIP: not launching {v:?}; the tokens are no model's");
            }
            v
        });
        SKIP.iter().any(|s| s == kernel)
    }

    fn linear(
        dev: &Device,
        out: usize,
        inp: usize,
        format: Option<Format>,
    ) -> Result<(QLinear, usize)> {
        let w = Tensor::randn(0f32, 0.02, (out, inp), dev)?;
        Ok(match format {
            None => (
                QLinear::dense(w.to_dtype(DType::BF16)?, None)?,
                out * inp * 2,
            ),
            Some(f) => {
                let l = QLinear::from_dense(&w, None, Some(&QuantSpec::new(f)))?;
                let bytes = match l.weight() {
                    q4::qlinear::LinearWeight::Quant(q) => q.storage_bytes(),
                    _ => unreachable!(),
                };
                (l, bytes)
            }
        })
    }

    fn norm_weight(dev: &Device) -> Result<Tensor> {
        Ok((Tensor::randn(0f32, 0.05, HIDDEN, dev)? + 1.0)?.to_dtype(DType::BF16)?)
    }

    fn build(
        dev: &Device,
        format: Option<Format>,
        n_layers: usize,
        max_len: usize,
    ) -> Result<Model> {
        let mut bytes = 0;
        let mut layers = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            let (qkv, a) = linear(dev, (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, format)?;
            let (o, b) = linear(dev, HIDDEN, HEADS * HEAD_DIM, format)?;
            let (gate_up, c) = linear(dev, 2 * INTER, HIDDEN, format)?;
            let (down, d) = linear(dev, HIDDEN, INTER, format)?;
            bytes += a + b + c + d;
            layers.push(Layer {
                ln1: norm_weight(dev)?,
                qkv,
                o,
                ln2: norm_weight(dev)?,
                gate_up,
                down,
                k_cache: Tensor::zeros((max_len, KV_HEADS * HEAD_DIM), DType::BF16, dev)?,
                v_cache: Tensor::zeros((max_len, KV_HEADS * HEAD_DIM), DType::BF16, dev)?,
            });
        }
        let (lm_head, e) = linear(dev, VOCAB, HIDDEN, format)?;
        bytes += e;
        let inv_freq: Vec<f32> = (0..HEAD_DIM / 2)
            .map(|i| THETA.powf(-(2.0 * i as f32) / HEAD_DIM as f32))
            .collect();
        Ok(Model {
            embed: Tensor::randn(0f32, 1.0, (VOCAB, HIDDEN), dev)?.to_dtype(DType::BF16)?,
            layers,
            norm: norm_weight(dev)?,
            lm_head,
            inv_freq: Tensor::from_vec(inv_freq, HEAD_DIM / 2, dev)?,
            token: Tensor::from_vec(vec![1u32], 1, dev)?,
            pos: Tensor::from_vec(vec![0u32], 1, dev)?,
            resid: Tensor::zeros((1, HIDDEN), DType::BF16, dev)?,
            h: Tensor::zeros((1, HIDDEN), DType::BF16, dev)?,
            q: Tensor::zeros((1, HEADS * HEAD_DIM), DType::BF16, dev)?,
            attn: Tensor::zeros((1, HEADS * HEAD_DIM), DType::BF16, dev)?,
            act: Tensor::zeros((1, INTER), DType::BF16, dev)?,
            into: format.is_some() && std::env::var("Q4_BENCH_INTO").as_deref() != Ok("0"),
            qkv_out: Tensor::zeros((1, (HEADS + 2 * KV_HEADS) * HEAD_DIM), DType::BF16, dev)?,
            o_out: Tensor::zeros((1, HIDDEN), DType::BF16, dev)?,
            gu_out: Tensor::zeros((1, 2 * INTER), DType::BF16, dev)?,
            down_out: Tensor::zeros((1, HIDDEN), DType::BF16, dev)?,
            logits: Tensor::zeros((1, VOCAB), DType::BF16, dev)?,
            weight_bytes: bytes,
        })
    }

    fn cfg(grid: usize, block: usize, smem: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (block as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    }

    /// `kernel` (`attend` or `attend_wide`, gpu_kernels.cu): single-query attention of `q` over
    /// layer `l`'s cache positions 0..=`*pos` into `out`.
    fn launch_attend(
        gpu: &Gpu,
        kernel: &str,
        l: &Layer,
        (q, pos, out): (u64, u64, u64),
        pdl: bool,
    ) -> Result<()> {
        let func = gpu.kernels.function("bench", KERNELS, &[], kernel)?;
        let (kc, vc) = (device_ptr(&l.k_cache)?, device_ptr(&l.v_cache)?);
        let (hq, hkv, hd) = (HEADS as i32, KV_HEADS as i32, HEAD_DIM as i32);
        let scale = 1.0f32 / (HEAD_DIM as f32).sqrt();
        let max_len = l.k_cache.dims()[0];
        let mut args = q4::kernel_args![&q, &kc, &vc, &pos, &out, &hq, &hkv, &hd, &scale];
        // SAFETY: q and out hold HEADS * HEAD_DIM bf16 (HEAD_DIM 128, as both kernels need), the
        // caches max_len rows, and *pos < max_len (the callers bound the steps); max_len floats
        // of shared memory cover every position.
        unsafe {
            launch_ex(
                &gpu.stream,
                &func,
                cfg(HEADS, 256, max_len * 4),
                &mut args,
                pdl,
            )
        }?;
        Ok(())
    }

    /// `add_rmsnorm` (`simple`) or `add_rmsnorm8` (gpu_kernels.cu): `resid += delta` (unless
    /// `delta` is null), then `out = RMSNorm(resid) * w`.
    fn launch_add_norm(
        gpu: &Gpu,
        simple: bool,
        (resid, delta, w, out): (u64, u64, u64, u64),
        pdl: bool,
    ) -> Result<()> {
        let (name, threads) = if simple {
            ("add_rmsnorm", 512)
        } else {
            ("add_rmsnorm8", HIDDEN / 8)
        };
        let func = gpu.kernels.function("bench", KERNELS, &[], name)?;
        let (hidden, eps) = (HIDDEN as i32, EPS);
        let mut args = q4::kernel_args![&resid, &delta, &w, &out, &hidden, &eps];
        // SAFETY: all four buffers hold HIDDEN bf16 values (delta may be null); add_rmsnorm8
        // takes HIDDEN / 8 threads (HIDDEN a multiple of 256, 16-byte aligned buffers).
        unsafe { launch_ex(&gpu.stream, &func, cfg(1, threads, 0), &mut args, pdl) }?;
        Ok(())
    }

    /// One decode step; everything position-dependent is read from device memory.
    fn step(gpu: &Gpu, m: &Model) -> Result<()> {
        let k = &gpu.kernels;
        let f = |name: &str| k.function("bench", KERNELS, &[], name);
        let s = &gpu.stream;
        // Launched early (programmatic dependent launch, compute capability 9.0 on), each step
        // kernel lets the next one start, and waits for the previous one before it reads
        // anything (`pdl_wait` first in each, gpu_kernels.cu): the SAFETY comments below cover
        // both ways. `Q4_BENCH_PDL=0` launches them in plain stream order.
        let pdl = gpu.kernels.cc.0 >= 9 && std::env::var("Q4_BENCH_PDL").as_deref() != Ok("0");
        let (hidden, inter) = (HIDDEN as i32, INTER as i32);
        let (resid, h) = (device_ptr(&m.resid)?, device_ptr(&m.h)?);
        {
            let func = f("embed")?;
            let (table, tok) = (device_ptr(&m.embed)?, device_ptr(&m.token)?);
            let mut args = q4::kernel_args![&table, &tok, &resid, &hidden];
            // SAFETY: table is [VOCAB][HIDDEN] bf16, token one u32 < VOCAB, resid HIDDEN bf16.
            unsafe { launch_ex(s, &func, cfg(1, 256, 0), &mut args, pdl) }?;
        }
        let mut delta: Option<Tensor> = None;
        // The step's RMSNorm and attention kernels: those that load all their inputs at once
        // (`add_rmsnorm8`, `attend_wide`), or with `Q4_BENCH_SIMPLE=1` the earlier ones that
        // load one value or position after another (kept as the cross-check's reference).
        let simple = simple_kernels();
        let add_norm = |delta: &Option<Tensor>, w: &Tensor, out: u64| -> Result<()> {
            if skipped("norm") {
                return Ok(());
            }
            let dp = match delta {
                Some(d) => device_ptr(d)?,
                None => 0u64,
            };
            launch_add_norm(gpu, simple, (resid, dp, device_ptr(w)?, out), pdl)
        };
        let pos = device_ptr(&m.pos)?;
        let (qp, attn, act) = (device_ptr(&m.q)?, device_ptr(&m.attn)?, device_ptr(&m.act)?);
        let (hq, hkv, hd) = (HEADS as i32, KV_HEADS as i32, HEAD_DIM as i32);
        for l in &m.layers {
            add_norm(&delta, &l.ln1, h)?;
            let qkv = project(m, &l.qkv, &m.h, &m.qkv_out)?;
            if !skipped("rope") {
                let func = f("rope_append")?;
                let (src, inv, kc, vc) = (
                    device_ptr(&qkv)?,
                    device_ptr(&m.inv_freq)?,
                    device_ptr(&l.k_cache)?,
                    device_ptr(&l.v_cache)?,
                );
                let mut args = q4::kernel_args![&src, &inv, &pos, &qp, &kc, &vc, &hq, &hkv, &hd];
                // SAFETY: qkv holds (HEADS + 2 KV_HEADS) * HEAD_DIM bf16; caches max_len rows;
                // the position stays below max_len (the caller bounds the steps).
                unsafe { launch_ex(s, &func, cfg(HEADS + KV_HEADS, 64, 0), &mut args, pdl) }?;
            }
            if !skipped("attend") {
                let kernel = if simple { "attend" } else { "attend_wide" };
                launch_attend(gpu, kernel, l, (qp, pos, attn), pdl)?;
            }
            let o = project(m, &l.o, &m.attn, &m.o_out)?;
            add_norm(&Some(o), &l.ln2, h)?;
            let gu = project(m, &l.gate_up, &m.h, &m.gu_out)?;
            if !skipped("silu") {
                let func = f("silu_mul")?;
                let gp = device_ptr(&gu)?;
                let mut args = q4::kernel_args![&gp, &act, &inter];
                // SAFETY: gu holds 2 * INTER bf16, act INTER.
                unsafe { launch_ex(s, &func, cfg(INTER.div_ceil(256), 256, 0), &mut args, pdl) }?;
            }
            delta = Some(project(m, &l.down, &m.act, &m.down_out)?);
        }
        add_norm(&delta, &m.norm, h)?;
        let logits = project(m, &m.lm_head, &m.h, &m.logits)?;
        {
            let func = f("argmax_next")?;
            let (lp, tok, vocab) = (device_ptr(&logits)?, device_ptr(&m.token)?, VOCAB as i32);
            let mut args = q4::kernel_args![&lp, &vocab, &tok, &pos];
            // SAFETY: logits hold VOCAB bf16; token and pos one u32 each.
            unsafe { launch_ex(s, &func, cfg(1, 1024, 0), &mut args, pdl) }?;
        }
        Ok(())
    }

    fn simple_kernels() -> bool {
        std::env::var("Q4_BENCH_SIMPLE").as_deref() == Ok("1")
    }

    /// Single-query attention of `q` (`HEADS * HEAD_DIM` bf16) over the first `len` positions of
    /// layer `l`'s caches with candle's f32 ops: the cross-check's reference that shares no code
    /// with the bench kernels.
    fn attention_reference(q: &Tensor, l: &Layer, len: usize) -> Result<Tensor> {
        let group = HEADS / KV_HEADS;
        let q = q.to_dtype(DType::F32)?.reshape((HEADS, 1, HEAD_DIM))?;
        // (len, KV_HEADS * HEAD_DIM) -> (HEADS, len, HEAD_DIM), each kv head serving `group`.
        let per_head = |cache: &Tensor| -> Result<Tensor> {
            Ok(cache
                .narrow(0, 0, len)?
                .to_dtype(DType::F32)?
                .reshape((len, KV_HEADS, 1, HEAD_DIM))?
                .broadcast_as((len, KV_HEADS, group, HEAD_DIM))?
                .reshape((len, HEADS, HEAD_DIM))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (k, v) = (per_head(&l.k_cache)?, per_head(&l.v_cache)?);
        let scores = (q.matmul(&k.t()?)? / (HEAD_DIM as f64).sqrt())?;
        let e = scores.broadcast_sub(&scores.max_keepdim(2)?)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(2)?)?;
        Ok(p.matmul(&v)?.reshape((1, HEADS * HEAD_DIM))?)
    }

    /// After a step: the last layer's attention output (`attn`, from `q` and its caches) and the
    /// final norm's output (`h`, from `resid`) recomputed by the simple kernels must agree with
    /// what the step's kernels wrote, to bf16 precision; the attention also with candle's f32
    /// ops (`attention_reference`).
    fn cross_check(gpu: &Gpu, m: &Model) -> Result<f32> {
        let pos = m.pos.to_vec1::<u32>()?[0];
        anyhow::ensure!(pos > 0, "cross-check before any step");
        let dev = m.pos.device();
        let last = Tensor::from_vec(vec![pos - 1], 1, dev)?;
        let (attn_ref, h_ref) = (m.attn.zeros_like()?, m.h.zeros_like()?);
        let l = m.layers.last().context("no layers")?;
        let ptrs = (
            device_ptr(&m.q)?,
            device_ptr(&last)?,
            device_ptr(&attn_ref)?,
        );
        launch_attend(gpu, "attend", l, ptrs, false)?;
        // No delta, so resid is only read.
        let ptrs = (
            device_ptr(&m.resid)?,
            0u64,
            device_ptr(&m.norm)?,
            device_ptr(&h_ref)?,
        );
        launch_add_norm(gpu, true, ptrs, false)?;
        gpu.stream.synchronize()?;
        let attn_f32 = attention_reference(&m.q, l, pos as usize)?;
        let mut worst = 0f32;
        for (got, want, what) in [
            (&m.attn, &attn_ref, "attention"),
            (&m.attn, &attn_f32, "attention (against candle's f32 ops)"),
            (&m.h, &h_ref, "RMSNorm"),
        ] {
            let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let scale = want
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()))
                / scale;
            if diff.is_nan() || diff > 1e-2 {
                bail!("the step's {what} differs from the reference: max |diff| {diff:.2e} of the largest value");
            }
            worst = worst.max(diff);
        }
        Ok(worst)
    }

    fn reset(m: &Model) -> Result<()> {
        for (t, v) in [(&m.token, 1u8), (&m.pos, 0u8)] {
            set_u32(t, v)?;
        }
        Ok(())
    }

    fn set_u32(t: &Tensor, value: u8) -> Result<()> {
        let host = vec![value as u32];
        let src = Tensor::from_vec(host, 1, t.device())?;
        t.slice_set(&src, 0, 0)?;
        Ok(())
    }

    pub fn run(args: Args) -> Result<()> {
        let gpu = Gpu::with_own_stream(args.device)?;
        let dev = gpu.device.clone();
        let card = q4::probe::probe()
            .cuda
            .devices
            .get(args.device)
            .map(|d| d.name.clone())
            .unwrap_or_else(|| "unknown".into());
        let max_len = args.tokens + 8;
        println!(
            "# q4 bench decode-synthetic on {card}: Qwen3-4B shape ({} layers, hidden {HIDDEN}, intermediate {INTER}, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, vocab {VOCAB}), batch 1, {} tokens, {}",
            args.layers,
            args.tokens,
            if args.no_graph { "eager launches" } else { "CUDA graph per step" }
        );
        println!(
            "{:<7} {:>10} {:>10} {:>9} {:>9} {:>10}",
            "format", "weights_GB", "ms/token", "tok/s", "GB/s", "vs_bf16"
        );
        let mut bf16_ms = None;
        for name in &args.formats {
            let format = match name.as_str() {
                "bf16" => None,
                f => Some(Format::parse(f).with_context(|| format!("unknown format {f}"))?),
            };
            let model = build(&dev, format, args.layers, max_len)?;
            gpu.stream.synchronize()?;
            // Eager reference run: tokens produced step by step.
            reset(&model)?;
            let mut eager_tokens = Vec::new();
            let reduces = q4::kernels::cuda::gemv::reduce_launches();
            for _ in 0..4 {
                step(&gpu, &model)?;
                eager_tokens.push(model.token.to_vec1::<u32>()?[0]);
            }
            tracing::info!(
                "{name}: {} split-K reductions (a partial-sum buffer and a second kernel) per step",
                (q4::kernels::cuda::gemv::reduce_launches() - reduces) / 4
            );
            reset(&model)?;
            gpu.stream.synchronize()?;
            let graph = if args.no_graph {
                None
            } else {
                // Warm-up outside capture (module loads, cuBLAS workspaces), then capture.
                step(&gpu, &model)?;
                reset(&model)?;
                gpu.stream.synchronize()?;
                gpu.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let r = step(&gpu, &model);
                let g = gpu.stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
                r?;
                let g = g.context("stream capture produced no graph")?;
                g.upload()?;
                Some(g)
            };
            if let Some(g) = &graph {
                // The replayed graph must produce the eager run's tokens.
                let mut graph_tokens = Vec::new();
                for _ in 0..4 {
                    g.launch()?;
                    graph_tokens.push(model.token.to_vec1::<u32>()?[0]);
                }
                if graph_tokens != eager_tokens {
                    bail!("CUDA graph replay produced tokens {graph_tokens:?}, eager launches {eager_tokens:?}");
                }
            }
            reset(&model)?;
            gpu.stream.synchronize()?;
            let t = gpu.time(0, args.tokens, 1, |_| {
                match &graph {
                    Some(g) => g.launch()?,
                    None => step(&gpu, &model)?,
                }
                Ok(())
            })?;
            if !skipped("attend") && !skipped("norm") {
                let diff = cross_check(&gpu, &model)?;
                tracing::info!("{name}: attention and RMSNorm agree with the simple kernels, attention with candle f32 too, after the timed steps (max diff {diff:.1e} of the largest value)");
            }
            let ms = t * 1e3;
            let base = *bf16_ms.get_or_insert(if format.is_none() { ms } else { f64::NAN });
            println!(
                "{:<7} {:>10.2} {:>10.3} {:>9.1} {:>9.0} {:>10.2}",
                name,
                model.weight_bytes as f64 / 1e9,
                ms,
                1e3 / ms,
                model.weight_bytes as f64 / t / 1e9,
                base / ms
            );
            drop(graph);
            drop(model);
            gpu.stream.synchronize()?;
        }
        Ok(())
    }
}
