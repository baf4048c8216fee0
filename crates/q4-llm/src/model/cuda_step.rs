//! One decode step (batch 1, one new token) on a CUDA device, captured once as a CUDA graph and
//! replayed for every token.
//!
//! Eagerly, a step is some twenty candle ops per layer, each a host-side dispatch and a launch:
//! a small model on a fast GPU then waits on the host (SmolLM2-135M decoded ~106-200 tok/s on an
//! H200, ~900 this way; BENCHMARKS.md). Here a layer is nine launches: residual add + RMSNorm,
//! the fused q/k/v projection, bias + q/k norm + RoPE + KV-cache append, single-query attention,
//! the output projection, residual add + RMSNorm, the fused gate/up projection, SiLU(gate) * up,
//! the down projection (`cuda_step.cu`; the projections are q4's fused GEMVs, written in place).
//! The token and its position live in device memory, so the captured graph holds every launch
//! of the step and the host only writes those two numbers, replays it and reads the logits.
//!
//! The graph holds the addresses of the model's weights and of the cache's buffers: it is kept
//! in the [`KvCache`] and captured again when the model or the cache's buffers change
//! ([`KvCache::generation`]). Models this step cannot run (activation quantization, 4-bit
//! embeddings, head sizes that do not divide 256, positions past the RoPE table) decode
//! eagerly; `Q4_CUDA_GRAPH=0` forces that.
//!
//! Numerics: the residual stream, queries, keys and values are f32 as in the eager path; the
//! projections' inputs and outputs are bf16 (the eager path gives the GEMV f16 copies of its
//! f32 activations with a scale per row and keeps its f32 outputs), so logits differ from the
//! eager step's by bf16 rounding (the GPU tests bound it).

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, LaunchConfig};
use candle_core::{DType, Device, Tensor};
use q4::kernels::cuda::{device_ptr, launch_ex, module_cache};
use q4::qlinear::LinearWeight;
use q4::{ActQuant, QLinear};

use super::fused::LinearGroup;
use super::{Embedding, Head, Model};
use crate::kv_cache::KvCache;

const SOURCE: &str = include_str!("cuda_step.cu");
const FAMILY: &str = "q4llm_step";
/// Head sizes must divide this (the attention kernel's smallest block).
const ATTEND_THREADS: usize = 256;

/// Threads of the attention kernel's block: 512 for head sizes up to 64 (fewer value rows per
/// thread; the key rows still fit the registers), else 256; `Q4_STEP_ATTEND_THREADS` overrides.
fn attend_threads(head_dim: usize) -> usize {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        std::env::var("Q4_STEP_ATTEND_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&t| t == 256 || t == 512)
    });
    forced.unwrap_or(if head_dim <= 64 { 512 } else { 256 })
}

/// Dynamic shared memory any kernel may take without opting in: the attention's scores.
const MAX_SCORES_BYTES: usize = 48 * 1024;

/// A captured step and the buffers it reads and writes, in the cache it was captured for.
pub struct CudaStepSlot {
    /// (model id, cache generation) the graph was captured for.
    key: (u64, u64),
    /// `None` where the capture failed: the step's kernels are then launched one by one.
    graph: Option<SendGraph>,
    /// The step's first run failed: this model and cache decode through the model's ops.
    eager: bool,
    bufs: Buffers,
    /// Replay timings, gathered while debug logging is on.
    stats: StepStats,
}

#[derive(Default)]
struct StepStats {
    steps: u32,
    /// Device time of the replays (CUDA events), seconds.
    gpu_s: f64,
    /// Host time of `decode` around them (the token write, the replay until it finished, the
    /// copy of the logits), seconds.
    wall_s: f64,
}

impl std::fmt::Debug for CudaStepSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStepSlot")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CudaStepSlot {
    /// Whether the step was captured (else its kernels are launched one by one).
    pub fn has_graph(&self) -> bool {
        self.graph.is_some()
    }
}

struct SendGraph(CudaGraph);

// SAFETY: the graph is only touched through `&mut KvCache` (one thread at a time); CUDA allows a
// graph to be launched and destroyed from any thread as long as those calls are serialized.
unsafe impl Send for SendGraph {}

/// Device buffers of one step, at fixed addresses for the graph.
struct Buffers {
    /// [token, position] (u32).
    tp: Tensor,
    resid: Tensor,
    h: Tensor,
    qkv: Tensor,
    q: Tensor,
    attn: Tensor,
    o: Tensor,
    gate_up: Tensor,
    act: Tensor,
    down: Tensor,
    logits: Tensor,
    logits_f32: Tensor,
}

/// Why this model's decode step cannot be captured, if it cannot.
fn unsupported(m: &Model) -> Option<String> {
    let c = &m.cfg;
    // The attention kernel's groups of head_dim threads fill its block; keys are read in
    // 16-byte pieces.
    if c.head_dim == 0
        || !ATTEND_THREADS.is_multiple_of(c.head_dim)
        || !c.head_dim.is_multiple_of(4)
    {
        return Some(format!(
            "head size {} (a multiple of 4 dividing {ATTEND_THREADS})",
            c.head_dim
        ));
    }
    if c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return Some("query heads not a multiple of the kv heads".into());
    }
    if !matches!(m.embed_tokens, Embedding::Dense(_)) {
        return Some("4-bit or int8 embeddings".into());
    }
    if !matches!(m.lm_head, Head::Linear(_)) {
        return Some("an int8 output layer".into());
    }
    let linears = m.layers.iter().flat_map(|l| {
        l.self_attn
            .qkv
            .all()
            .chain([&l.self_attn.o_proj])
            .chain(l.mlp.gate_up.all())
            .chain([&l.mlp.down_proj])
    });
    let head = match &m.lm_head {
        Head::Linear(h) => Some(h),
        Head::Int8(_) => None,
    };
    if linears.chain(head).any(|l| l.act_quant() != ActQuant::None) {
        return Some("activation quantization (--w4a8 / --w4a4)".into());
    }
    let norms = m.layers.iter().flat_map(|l| {
        [&l.input_layernorm, &l.post_attention_layernorm]
            .into_iter()
            .chain(l.self_attn.q_norm.as_ref())
            .chain(l.self_attn.k_norm.as_ref())
    });
    if norms
        .chain([&m.norm])
        .any(|n| n.weight.dtype() != DType::F32)
    {
        return Some("RMSNorm weights not in f32".into());
    }
    None
}

/// Timing aid: `Q4_STEP_SKIP` names step parts not to launch (`norm`, `rope`, `attend`,
/// `silu`, `proj`, `head`), so that the step's device time without them (`Q4_LOG=q4_llm=debug`)
/// shows what they cost. The logits of such a step are no model's.
fn skipped(part: &str) -> bool {
    static SKIP: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SKIP.get_or_init(|| {
        let v: Vec<String> = std::env::var("Q4_STEP_SKIP")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !v.is_empty() {
            tracing::warn!("Q4_STEP_SKIP: not launching {v:?}; the logits are no model's");
        }
        v
    })
    .iter()
    .any(|s| s == part)
}

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("Q4_CUDA_GRAPH").as_deref() != Ok("0"))
}

/// Logits `[vocab]` (f32) after `token` at position `cache.len()`, computed by the captured
/// step; `None` when this model, cache or position must decode eagerly instead.
pub fn decode(m: &Model, token: u32, cache: &mut KvCache) -> Result<Option<Tensor>> {
    let Device::Cuda(cuda) = &m.device else {
        return Ok(None);
    };
    if !enabled() {
        return Ok(None);
    }
    if let Some(why) = unsupported(m) {
        tracing::debug!("decoding eagerly: the CUDA graph step does not take {why}");
        return Ok(None);
    }
    let c = &m.cfg;
    let pos = cache.len();
    if pos >= m.rope.table_len() {
        return Ok(None);
    }
    cache.reserve((1, c.num_kv_heads, c.head_dim), DType::F32, &m.device, 1)?;
    if cache.capacity() * 4 > MAX_SCORES_BYTES {
        return Ok(None);
    }
    let kernels = module_cache::for_device(cuda)?;
    let tp = [token, pos as u32];
    let key = (m.id, cache.generation());
    let slot = match cache.cuda_step.take() {
        Some(s) if s.key == key && s.eager => {
            cache.cuda_step = Some(s);
            return Ok(None);
        }
        Some(s) if s.key == key => s,
        _ => {
            // (Re)capture. The first run is eager (it loads modules and sets up cuBLAS, neither
            // of which a capture may do) and is this token's step; the graph serves the next.
            let bufs = Buffers::new(m)?;
            write_tp(&bufs.tp, tp)?;
            if let Err(e) = launch_step(m, cache, &bufs, &kernels) {
                // The model's own ops then run the step (and write this position again).
                tracing::warn!(
                    "the CUDA decode step failed ({e:#}); decoding with the model's ops"
                );
                cache.cuda_step = Some(CudaStepSlot {
                    key,
                    graph: None,
                    eager: true,
                    bufs,
                    stats: StepStats::default(),
                });
                return Ok(None);
            }
            let graph = match capture(m, cache, &bufs, &kernels) {
                Ok(g) => {
                    tracing::debug!("captured the CUDA decode step (cache generation {})", key.1);
                    Some(g)
                }
                Err(e) => {
                    tracing::warn!("could not capture the decode step as a CUDA graph ({e:#}); launching its kernels one by one");
                    None
                }
            };
            let logits = bufs.logits_f32.copy()?;
            cache.cuda_step = Some(CudaStepSlot {
                key,
                graph,
                eager: false,
                bufs,
                stats: StepStats::default(),
            });
            cache.advance(1);
            return Ok(Some(logits));
        }
    };
    let mut slot = slot;
    // Where a token's time goes (`Q4_LOG=q4_llm=debug`): the replay's device time against the
    // host's time in this call, every 256 steps.
    let timed = tracing::enabled!(tracing::Level::DEBUG);
    let wall = std::time::Instant::now();
    write_tp(&slot.bufs.tp, tp)?;
    let stream = cuda.cuda_stream();
    let ev = || stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let start = if timed { Some(ev()?) } else { None };
    match &slot.graph {
        Some(g) => g.0.launch()?,
        None => launch_step(m, cache, &slot.bufs, &kernels)?,
    }
    if let Some(start) = start {
        let end = ev()?;
        end.synchronize()?;
        let st = &mut slot.stats;
        st.gpu_s += f64::from(start.elapsed_ms(&end)?) / 1e3;
        st.wall_s += wall.elapsed().as_secs_f64();
        st.steps += 1;
        if st.steps == 256 {
            tracing::debug!(
                "CUDA decode step: {:.1} us on the device, {:.1} us in the host call ({} steps)",
                st.gpu_s / 256.0 * 1e6,
                st.wall_s / 256.0 * 1e6,
                st.steps
            );
            *st = StepStats::default();
        }
    }
    let logits = slot.bufs.logits_f32.copy()?;
    cache.cuda_step = Some(slot);
    cache.advance(1);
    Ok(Some(logits))
}

/// The step's launches captured as a graph (nothing runs).
fn capture(
    m: &Model,
    cache: &KvCache,
    bufs: &Buffers,
    kernels: &module_cache::DeviceKernels,
) -> Result<SendGraph> {
    let Device::Cuda(cuda) = &m.device else {
        bail!("the CUDA step needs a CUDA model")
    };
    let stream = cuda.cuda_stream();
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let r = launch_step(m, cache, bufs, kernels);
    // Always end the capture, so that a failed launch leaves the stream usable.
    let g = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    r?;
    let graph = g?.context("stream capture produced no graph")?;
    graph.upload()?;
    Ok(SendGraph(graph))
}

/// Writes [token, position] into the step's device buffer (stream-ordered).
fn write_tp(tp: &Tensor, v: [u32; 2]) -> Result<()> {
    let Device::Cuda(cuda) = tp.device() else {
        bail!("the step's buffers are on the CUDA device")
    };
    let stream = cuda.cuda_stream();
    stream.context().bind_to_thread()?;
    let dst = device_ptr(tp)?;
    // SAFETY: `tp` is a contiguous u32 tensor of 2 elements on this stream's device, `v` 8
    // readable host bytes; a copy from pageable memory has read `v` when the call returns.
    let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dst, v.as_ptr().cast(), 8, stream.cu_stream()) };
    r.result()?;
    Ok(())
}

impl Buffers {
    fn new(m: &Model) -> Result<Buffers> {
        let c = &m.cfg;
        let dev = &m.device;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let bf16 = |n: usize| Tensor::zeros((1, n), DType::BF16, dev);
        let q_out = c.num_heads * hd;
        let qkv = (c.num_heads + 2 * c.num_kv_heads) * hd;
        Ok(Buffers {
            tp: Tensor::zeros(2, DType::U32, dev)?,
            resid: Tensor::zeros(h, DType::F32, dev)?,
            h: bf16(h)?,
            qkv: bf16(qkv)?,
            q: Tensor::zeros(q_out, DType::F32, dev)?,
            attn: bf16(q_out)?,
            o: bf16(h)?,
            gate_up: bf16(2 * c.intermediate_size)?,
            act: bf16(c.intermediate_size)?,
            down: bf16(h)?,
            logits: bf16(c.vocab_size)?,
            logits_f32: Tensor::zeros(c.vocab_size, DType::F32, dev)?,
        })
    }
}

fn grid(blocks: usize, threads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// `out = layer(x)` written in place (bf16 `[1, n]` buffers).
fn project(layer: &QLinear, x: &Tensor, out: &Tensor) -> Result<()> {
    match layer.weight() {
        LinearWeight::Quant(_) => layer.forward_into(x, out)?,
        // Dense layers (f32 or bf16): candle's matmul in the weight's dtype.
        LinearWeight::Dense(w) => {
            let y = candle_core::Module::forward(layer, &x.to_dtype(w.dtype())?)?;
            out.slice_set(&y.to_dtype(DType::BF16)?, 0, 0)?;
        }
    }
    Ok(())
}

/// A group's outputs side by side in `out`.
fn project_group(g: &LinearGroup, x: &Tensor, out: &Tensor) -> Result<()> {
    match &g.fused {
        Some(f) => project(f, x, out),
        None => {
            let mut start = 0;
            for p in &g.parts {
                project(p, x, &out.narrow(1, start, p.out_features())?)?;
                start += p.out_features();
            }
            Ok(())
        }
    }
}

/// The q/k/v projection into `out`; returns the bias the RoPE kernel must still add (f32), which
/// is there when the fused GEMV ran without it.
fn project_qkv(g: &LinearGroup, x: &Tensor, out: &Tensor) -> Result<Option<Tensor>> {
    if let Some(f) = &g.fused {
        if let (LinearWeight::Quant(w), ActQuant::None) = (f.weight(), f.act_quant()) {
            let bias_ok = f.bias().is_none_or(|b| b.dtype() == DType::F32);
            if bias_ok && q4::kernels::cuda::matmul_into(w, x, out)? {
                return Ok(f.bias().cloned());
            }
        }
    }
    project_group(g, x, out)?;
    Ok(None)
}

/// Launches one step's kernels on the model's stream (eagerly, or into a capture).
fn launch_step(
    m: &Model,
    cache: &KvCache,
    b: &Buffers,
    kernels: &module_cache::DeviceKernels,
) -> Result<()> {
    let Device::Cuda(cuda) = &m.device else {
        bail!("the CUDA step needs a CUDA model")
    };
    let stream = cuda.cuda_stream();
    let attend_threads = attend_threads(m.cfg.head_dim);
    let defines = [
        ("HEAD_DIM", m.cfg.head_dim as i64),
        ("ATTEND_THREADS", attend_threads as i64),
    ];
    let f = |name: &str| kernels.function(FAMILY, SOURCE, &defines, name);
    let early = kernels.cc.0 >= 9;
    let c = &m.cfg;
    let (hidden, eps) = (c.hidden_size as i32, c.rms_norm_eps as f32);
    let ptr = device_ptr;
    let (tp, resid, h) = (ptr(&b.tp)?, ptr(&b.resid)?, ptr(&b.h)?);
    let null = 0u64;

    {
        let Embedding::Dense(table) = &m.embed_tokens else {
            bail!("dense embeddings expected")
        };
        let bf16 = i32::from(table.dtype() == DType::BF16);
        if !matches!(table.dtype(), DType::BF16 | DType::F32) {
            bail!("embedding table of {:?}", table.dtype());
        }
        let t = ptr(table)?;
        let mut args = q4::kernel_args![&t, &tp, &resid, &hidden, &bf16];
        // SAFETY: the table is [vocab][hidden] of the named dtype, tp[0] a token below vocab
        // (checked by the caller), resid hidden f32.
        unsafe { launch_ex(&stream, &f("embed")?, grid(4, 256, 0), &mut args, early) }?;
    }
    let add_norm = |delta: u64, w: &Tensor, out: u64| -> Result<()> {
        if skipped("norm") {
            return Ok(());
        }
        let w = ptr(w)?;
        let mut args = q4::kernel_args![&resid, &delta, &w, &out, &hidden, &eps];
        // SAFETY: resid hidden f32, delta (unless null) and out hidden bf16, w hidden f32.
        unsafe {
            launch_ex(
                &stream,
                &f("add_rmsnorm")?,
                grid(1, 512, 0),
                &mut args,
                early,
            )
        }?;
        Ok(())
    };
    let (hq, hkv, hd) = (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
    let (cos, sin) = m.rope.cos_sin();
    let (cos, sin) = (ptr(cos)?, ptr(sin)?);
    let cap = cache.capacity() as i32;
    let scale = 1.0f32 / (c.head_dim as f32).sqrt();
    let (q, attn, act) = (ptr(&b.q)?, ptr(&b.attn)?, ptr(&b.act)?);
    let mut delta = null;
    for (i, l) in m.layers.iter().enumerate() {
        add_norm(delta, &l.input_layernorm.weight, h)?;
        let a = &l.self_attn;
        let bias = if skipped("proj") {
            None
        } else {
            project_qkv(&a.qkv, &b.h, &b.qkv)?
        };
        if !skipped("rope") {
            let bias_ptr = bias.as_ref().map_or(Ok(null), ptr)?;
            let norm_ptr =
                |n: &Option<super::norm::RmsNorm>| n.as_ref().map_or(Ok(null), |n| ptr(&n.weight));
            let (qn, kn) = (norm_ptr(&a.q_norm)?, norm_ptr(&a.k_norm)?);
            let (kc, vc) = cache.buffers(i).context("KV buffers reserved")?;
            let (kc, vc, src) = (ptr(kc)?, ptr(vc)?, ptr(&b.qkv)?);
            let qk_eps = a.q_norm.as_ref().map_or(eps, |n| n.eps);
            let mut args = q4::kernel_args![
                &src, &bias_ptr, &qn, &kn, &qk_eps, &cos, &sin, &tp, &q, &kc, &vc, &hq, &hkv, &hd,
                &cap
            ];
            let rope_threads = (c.head_dim / 2).next_multiple_of(32);
            // SAFETY: qkv holds (hq + 2 hkv) hd bf16, bias (unless null) as many f32, the norms
            // (unless null) hd f32, the rope tables [table_len][hd / 2] with tp[1] below
            // table_len, q hq hd f32, the caches [hkv][cap][hd] f32 with tp[1] below cap
            // (reserved by the caller).
            unsafe {
                launch_ex(
                    &stream,
                    &f("qkv_rope_append")?,
                    grid(c.num_heads + 2 * c.num_kv_heads, rope_threads, 0),
                    &mut args,
                    early,
                )
            }?;
        }
        if !skipped("attend") {
            let (kc, vc) = cache.buffers(i).context("KV buffers reserved")?;
            let (kc, vc) = (ptr(kc)?, ptr(vc)?);
            let mut args = q4::kernel_args![&q, &kc, &vc, &tp, &attn, &hq, &hkv, &cap, &scale];
            // SAFETY: q holds hq hd f32, the caches [hkv][cap][hd] f32 with tp[1] below cap
            // (reserved by the caller), attn hq hd bf16; the scores take cap floats of dynamic
            // shared memory (at most MAX_SCORES_BYTES, checked by the caller); hd divides
            // the block (the module's HEAD_DIM and ATTEND_THREADS).
            unsafe {
                launch_ex(
                    &stream,
                    &f("attend")?,
                    grid(c.num_heads, attend_threads, cap as usize * 4),
                    &mut args,
                    early,
                )
            }?;
        }
        let proj = !skipped("proj");
        if proj {
            project(&a.o_proj, &b.attn, &b.o)?;
        }
        add_norm(ptr(&b.o)?, &l.post_attention_layernorm.weight, h)?;
        if proj {
            project_group(&l.mlp.gate_up, &b.h, &b.gate_up)?;
        }
        if !skipped("silu") {
            let (gu, n) = (ptr(&b.gate_up)?, c.intermediate_size as i32);
            let mut args = q4::kernel_args![&gu, &act, &n];
            let blocks = c.intermediate_size.div_ceil(256).min(1024);
            // SAFETY: gate_up holds 2 n bf16, act n bf16.
            unsafe {
                launch_ex(
                    &stream,
                    &f("silu_mul")?,
                    grid(blocks, 256, 0),
                    &mut args,
                    early,
                )
            }?;
        }
        if proj {
            project(&l.mlp.down_proj, &b.act, &b.down)?;
        }
        delta = ptr(&b.down)?;
    }
    add_norm(delta, &m.norm.weight, h)?;
    let Head::Linear(head) = &m.lm_head else {
        bail!("a linear output layer expected")
    };
    if skipped("head") {
        return Ok(());
    }
    let (vocab, k) = (c.vocab_size, c.hidden_size);
    // `Q4_STEP_HEAD=candle`: a bf16 head through candle's matmul instead (A/B aid).
    static CANDLE_HEAD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let candle_head =
        *CANDLE_HEAD.get_or_init(|| std::env::var("Q4_STEP_HEAD").as_deref() == Ok("candle"));
    match head.weight() {
        // A bf16 table (bf16 embeddings, tied or not): q4's GEMV straight into the f32 logits.
        LinearWeight::Dense(w)
            if w.dtype() == DType::BF16
                && !candle_head
                && head.bias().is_none()
                && k.is_multiple_of(8)
                && k * 2 <= MAX_SCORES_BYTES =>
        {
            let (wp, x, y) = (ptr(w)?, h, ptr(&b.logits_f32)?);
            let (n, kk) = (vocab as i32, k as i32);
            let mut args = q4::kernel_args![&wp, &x, &y, &n, &kk];
            // SAFETY: w is a contiguous [vocab][k] bf16 table, h k bf16 (16-byte aligned
            // buffers, k % 8 == 0), logits_f32 vocab f32; k bf16 of dynamic shared memory fit
            // the default limit.
            unsafe {
                launch_ex(
                    &stream,
                    &f("gemv_bf16")?,
                    grid(vocab.div_ceil(32), 256, k * 2),
                    &mut args,
                    early,
                )
            }?;
        }
        _ => {
            project(head, &b.h, &b.logits)?;
            let (src, dst, n) = (ptr(&b.logits)?, ptr(&b.logits_f32)?, vocab as i32);
            let mut args = q4::kernel_args![&src, &dst, &n];
            let blocks = vocab.div_ceil(256).min(1024);
            // SAFETY: logits hold vocab bf16, logits_f32 vocab f32.
            unsafe {
                launch_ex(
                    &stream,
                    &f("widen_bf16")?,
                    grid(blocks, 256, 0),
                    &mut args,
                    early,
                )
            }?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC only (no GPU): the step's kernels compile for Ampere, Hopper and Blackwell.
    #[test]
    fn nvrtc_compiles_the_step_kernels() {
        for (d, t) in [(16, 512), (64, 512), (64, 256), (128, 256), (256, 256)] {
            let src = module_cache::source(SOURCE, &[("HEAD_DIM", d), ("ATTEND_THREADS", t)]);
            for arch in ["sm_80", "sm_90", "sm_120"] {
                module_cache::compile_cubin(FAMILY, &src, arch)
                    .unwrap_or_else(|e| panic!("{arch}, head size {d}: {e}"));
            }
        }
    }
}
