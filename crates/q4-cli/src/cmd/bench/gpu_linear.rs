//! `q4 bench gpu-linear`: q4's CUDA matmul (fused GEMV for small batches, chunked dequantize +
//! cuBLAS for large ones) against candle's bf16 matmul (cuBLAS) on the same device, in the same
//! process, next to the device copy bandwidth measured in that process.
//!
//! Weights rotate over several copies whose total size exceeds the L2 cache several times, so
//! no timed call finds its weight in L2. Activations are bf16 (as in an LLM); accumulation is
//! f32 everywhere. Each result line also gives the relative error against an f32 reference
//! (dequantized weight, f32 cuBLAS), so a fast but wrong kernel cannot go unnoticed.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Arguments of `q4 bench gpu-linear`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weight shapes OUTxIN.
    #[arg(long, value_delimiter = ',', default_value = "8192x8192,28672x4096")]
    shapes: Vec<String>,
    /// 4-bit formats.
    #[arg(long, value_delimiter = ',', default_value = "nvfp4,nf4")]
    formats: Vec<String>,
    /// Activation rows of the GEMV measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// Activation rows of the prefill GEMM measurement (0 skips it).
    #[arg(long, default_value_t = 2048)]
    gemm_m: usize,
    /// Total size of the rotating weight copies, MiB (several times the L2 cache).
    #[arg(long, default_value_t = 200)]
    rotate_mib: usize,
    /// Timed calls per batch of calls (median over 5 batches).
    #[arg(long, default_value_t = 20)]
    calls: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: Args) -> Result<()> {
    bail!("this q4 was built without the `cuda` feature; rebuild with `--features cuda`")
}

#[cfg(feature = "cuda")]
pub fn run(args: Args) -> Result<()> {
    imp::run(args)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once('x')
        .with_context(|| format!("shape {s:?} is not OUTxIN"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::cmd::bench::gpu::{randn, Gpu};
    use candle_core::{DType, Module, Tensor};
    use q4::qtensor::QuantSpec;
    use q4::{Format, QLinear};
    use serde_json::json;

    fn rel_err(y: &Tensor, reference: &Tensor) -> Result<f64> {
        let y = y.to_dtype(DType::F32)?;
        let d = (&y - reference)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let r = reference.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((d / r).sqrt())
    }

    pub fn run(args: Args) -> Result<()> {
        let gpu = Gpu::new(args.device)?;
        let dev = gpu.device.clone();
        let props = q4::probe::probe();
        let card = props
            .cuda
            .devices
            .get(args.device)
            .map(|d| d.name.clone())
            .unwrap_or_else(|| "unknown".into());
        let copy_bw = gpu.copy_bandwidth(1 << 30)?;
        println!("# q4 bench gpu-linear on {card}; device copy bandwidth {:.0} GB/s (read+write, same run)", copy_bw / 1e9);
        println!(
            "{:<11} {:>5} {:<14} {:>10} {:>8} {:>7} {:>9} {:>8} {:>9}",
            "shape", "batch", "impl", "us", "GB/s", "%copy", "TFLOP/s", "vs_bf16", "rel_err"
        );
        let rotate = args.rotate_mib << 20;
        let mut rows = Vec::new();
        for shape in &args.shapes {
            let (n, k) = parse_shape(shape)?;
            let w32 = randn(&dev, (n, k), 0.02)?;
            let bf16_bytes = n * k * 2;
            let bf16_copies = rotate.div_ceil(bf16_bytes).max(2);
            let bf16_w: Vec<Tensor> = (0..bf16_copies)
                .map(|_| w32.to_dtype(DType::BF16))
                .collect::<candle_core::Result<_>>()?;
            let mut layers: Vec<(String, usize, Vec<QLinear>)> = Vec::new();
            for f in &args.formats {
                let format = Format::parse(f).with_context(|| format!("unknown format {f}"))?;
                let first = QLinear::from_dense(&w32, None, Some(&QuantSpec::new(format)))?;
                let bytes = match first.weight() {
                    q4::qlinear::LinearWeight::Quant(q) => q.storage_bytes(),
                    _ => unreachable!(),
                };
                let copies = rotate.div_ceil(bytes).max(2);
                let mut v = vec![first];
                for _ in 1..copies {
                    v.push(QLinear::from_dense(
                        &w32,
                        None,
                        Some(&QuantSpec::new(format)),
                    )?);
                }
                layers.push((format.name().to_string(), bytes, v));
            }
            let mut batches = args.batches.clone();
            if args.gemm_m > 0 {
                batches.push(args.gemm_m);
            }
            for &batch in &batches {
                let x = randn(&dev, (batch, k), 1.0)?.to_dtype(DType::BF16)?;
                let x32 = x.to_dtype(DType::F32)?;
                let flops = 2.0 * (n * k * batch) as f64;
                let calls = if batch >= 256 {
                    args.calls.min(10)
                } else {
                    args.calls
                };
                let t_bf16 = gpu.time(3, calls, 5, |i| {
                    let y = x.matmul(&bf16_w[i % bf16_copies].t()?)?;
                    drop(y);
                    Ok(())
                })?;
                let y_bf16 = x.matmul(&bf16_w[0].t()?)?;
                let ref_dense = x32.matmul(&w32.t()?)?;
                let mut emit = |name: &str, bytes: usize, t: f64, err: f64| {
                    let line = format!(
                        "{:<11} {:>5} {:<14} {:>10.1} {:>8.0} {:>7.1} {:>9.1} {:>8.2} {:>9.2e}",
                        shape,
                        batch,
                        name,
                        t * 1e6,
                        bytes as f64 / t / 1e9,
                        100.0 * bytes as f64 / t / copy_bw,
                        flops / t / 1e12,
                        t_bf16 / t,
                        err
                    );
                    println!("{line}");
                    rows.push(json!({
                        "shape": shape, "batch": batch, "impl": name, "us": t * 1e6,
                        "weight_bytes": bytes, "gbps": bytes as f64 / t / 1e9,
                        "pct_copy": 100.0 * bytes as f64 / t / copy_bw, "tflops": flops / t / 1e12,
                        "speedup_vs_bf16": t_bf16 / t, "rel_err": err,
                    }));
                };
                emit(
                    "candle-bf16",
                    bf16_bytes,
                    t_bf16,
                    rel_err(&y_bf16, &ref_dense)?,
                );
                for (name, bytes, copies) in &layers {
                    let t = gpu.time(3, calls, 5, |i| {
                        let y = copies[i % copies.len()].forward(&x)?;
                        drop(y);
                        Ok(())
                    })?;
                    // Reference: the same quantized weight, dequantized to f32, f32 matmul.
                    let q4::qlinear::LinearWeight::Quant(q) = copies[0].weight() else {
                        bail!("expected a quantized layer")
                    };
                    let wd = q.dequantize(DType::F32)?;
                    let reference = x32.matmul(&wd.t()?)?;
                    let y = copies[0].forward(&x)?;
                    emit(&format!("q4-{name}"), *bytes, t, rel_err(&y, &reference)?);
                }
            }
        }
        if let Some(path) = &args.json {
            let doc = json!({ "card": card, "copy_gbps": copy_bw / 1e9, "rows": rows });
            std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        }
        Ok(())
    }
}
