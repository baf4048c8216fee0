//! `q4 bench linear`: QLinear against candle's f32 matmul and candle's own 4-bit path
//! (`QMatMul` over GGUF Q4_0 / Q4K), same shapes, same process, same machine state.
//!
//! Small batches are timed cache-cold: each call uses the next of several copies of the weight,
//! enough copies to exceed three times the last-level cache, so no call finds its weight cached.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor as CandleQTensor};
use candle_core::{DType, Device, Module, Tensor};
use q4::qtensor::QuantSpec;
use q4::{Format, QLinear};

use super::measure::{read_bandwidth, time, time_interleaved, Guard, Timing, MIN_WARMUP};

/// Weights from which every q4 contender's call runs on every thread of the pool, so that a
/// measurement of it using fewer cores is disturbed (see `measure::Guard`).
const PARALLEL_WEIGHTS: usize = 1 << 18;

/// Calls of one contender in a row when interleaving (see `time_interleaved`).
const INTERLEAVE_BLOCK: usize = 5;

/// Arguments of `q4 bench linear`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weight shapes OUTxIN.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x4096,11008x4096,1536x576,49152x576"
    )]
    shapes: Vec<String>,
    /// Activation rows.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batches: Vec<usize>,
    /// Timed calls per measurement (median reported).
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// Batches up to this size are timed cache-cold (rotating weight copies).
    #[arg(long, default_value_t = 4)]
    cold_up_to: usize,
    /// Last-level cache size in MiB (the rotation covers 3x this, the read-bandwidth buffer at
    /// least 4x); default: the size the OS reports for this CPU, else 32.
    #[arg(long)]
    llc_mib: Option<usize>,
    /// Skip candle's Q4_0 (slow at large batches).
    #[arg(long)]
    no_q4_0: bool,
    /// Most CPU (in cores) other processes may use during a measurement before it is repeated.
    #[arg(long, default_value_t = 0.15)]
    max_others: f64,
    /// Make the timed calls from a rayon worker, as `q4 generate` does (each kernel's parallel
    /// loop then forks with `join` instead of handing its work to the pool and sleeping until
    /// it is done); applies to every contender alike. Default: from the main thread.
    #[arg(long)]
    in_pool: bool,
    /// Interleave the contenders' calls: rounds of 5 calls of each contender in turn, so that a
    /// change of the host's speed during the measurement hits all of them alike. Default: each
    /// contender's calls in one run of their own, one contender after the other (interleaving
    /// measured q4's sub-0.1 ms calls up to 1.7x slower than back to back, and sometimes its
    /// NVFP4 batch-1 calls 2x, causes not found; see BENCHMARKS.md).
    #[arg(long)]
    interleave: bool,
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once('x')
        .with_context(|| format!("shape {s:?} is not OUTxIN"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            let mut u = 0f32;
            for _ in 0..3 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (u - 1.5) * scale
        })
        .collect()
}

/// A contender: its name, stored weight bytes, and one layer per rotating copy.
struct Contender {
    name: &'static str,
    bytes: usize,
    layers: Vec<Box<dyn Module + Send + Sync>>,
}

impl Contender {
    /// The layers a measurement rotates over: every copy when cache-cold, else the first.
    fn layers(&self, cold: bool) -> &[Box<dyn Module + Send + Sync>] {
        if cold {
            &self.layers
        } else {
            &self.layers[..1]
        }
    }
}

struct DenseF32(Tensor);
impl Module for DenseF32 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.0.t()?)
    }
}

/// A plain parallel read (a sum, with no software prefetch) of as many bytes as the NVFP4
/// weight, its activations returned as they are: a reference for how long a cache-cold read of
/// one layer-sized buffer takes on this host. It is split as q4's GEMVs split their rows
/// (`q4::kernels::cpu::parallel`: 16 KiB pieces, the calling thread joining the pool's workers,
/// for the same amount of work), so that both pay the same dispatch. A layer of a few hundred
/// KiB reads well under the streaming bandwidth of `read_bandwidth`'s large buffer (dispatch,
/// the first misses), and this row shows by how much in the same run.
struct PlainRead {
    words: Vec<u64>,
    weights: usize,
}

/// Words per piece of [`PlainRead`]: 16 KiB, about 32 rows of a 1024-wide NVFP4 weight.
const READ_PIECE: usize = 2048;

impl Module for PlainRead {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut sums = vec![0u64; self.words.len().div_ceil(READ_PIECE)];
        q4::kernels::cpu::parallel::for_each_chunk_mut(&mut sums, 1, self.weights, |i, out| {
            let piece = &self.words[i * READ_PIECE..((i + 1) * READ_PIECE).min(self.words.len())];
            out[0] = piece.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        });
        std::hint::black_box(&sums);
        Ok(x.clone())
    }
}

/// The name of the [`PlainRead`] contender, timed only where the q4 contenders are cache-cold.
const PLAIN_READ: &str = "plain-read";

fn build(name: &'static str, w: &Tensor, copies: usize) -> Result<Contender> {
    let mut layers: Vec<Box<dyn Module + Send + Sync>> = Vec::with_capacity(copies);
    let mut bytes = 0;
    for _ in 0..copies {
        // Each copy is a separate allocation (same values).
        let w = w.copy()?;
        let (layer, b): (Box<dyn Module + Send + Sync>, usize) = match name {
            "q4-nvfp4" | "q4-nf4" | "q4-nvfp4-w4a8" | "q4-nf4-w4a8" => {
                let f = if name.starts_with("q4-nf4") {
                    Format::Nf4
                } else {
                    Format::Nvfp4
                };
                let mut l = QLinear::from_dense(&w, None, Some(&QuantSpec::new(f)))?;
                if name.ends_with("-w4a8") {
                    l = l.with_act_quant(q4::ActQuant::Int8)?;
                }
                let b = match l.weight() {
                    q4::qlinear::LinearWeight::Quant(q) => q.storage_bytes(),
                    _ => unreachable!(),
                };
                (Box::new(l), b)
            }
            "candle-f32" => {
                let b = w.elem_count() * 4;
                (Box::new(DenseF32(w)), b)
            }
            "candle-q4k" | "candle-q4_0" => {
                let dt = if name == "candle-q4k" {
                    GgmlDType::Q4K
                } else {
                    GgmlDType::Q4_0
                };
                let q = CandleQTensor::quantize(&w, dt)?;
                let b = q.storage_size_in_bytes();
                (Box::new(QMatMul::from_qtensor(q)?), b)
            }
            PLAIN_READ => {
                let (n, k) = w.dims2()?;
                let (codes, scales) = q4::qtensor::storage_lengths(
                    Format::Nvfp4,
                    Format::Nvfp4.default_block_size(),
                    n,
                    k,
                );
                let b = codes + scales;
                let words: Vec<u64> = (0..b.div_ceil(8) as u64).collect();
                (
                    Box::new(PlainRead {
                        words,
                        weights: n * k,
                    }),
                    b,
                )
            }
            _ => bail!("unknown contender {name}"),
        };
        bytes = b;
        layers.push(layer);
    }
    Ok(Contender {
        name,
        bytes,
        layers,
    })
}

pub fn run(args: Args) -> Result<()> {
    let threads = rayon::current_num_threads();
    // Cache-cold means beyond the last-level cache, which on some servers holds hundreds of MiB:
    // a fixed 32 MiB guess left such hosts' "cold" weights partly cached.
    let llc_mib = args
        .llc_mib
        .unwrap_or_else(q4::probe::last_level_cache_mib)
        .max(1);
    let bw = read_bandwidth((512usize << 20).max(4 * (llc_mib << 20)));
    let mut out = String::new();
    writeln!(
        out,
        "# q4 bench linear: {threads} threads, memory read bandwidth {:.1} GB/s (same run), calls from {}, \
         cold calls rotate over 3 x {llc_mib} MiB (last-level cache)",
        bw / 1e9,
        if args.in_pool { "a rayon worker" } else { "the main thread" }
    )?;
    writeln!(
        out,
        "{:<12} {:>5} {:<5} {:<13} {:>9} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>6}",
        "shape",
        "batch",
        "cache",
        "impl",
        "median_ms",
        "GB/s",
        "GFLOP/s",
        "%readbw",
        "vs_f32",
        "vs_q4k",
        "others",
        "cores"
    )?;
    eprint!("{out}");
    let mut names = vec![
        "q4-nvfp4",
        "q4-nvfp4-w4a8",
        "q4-nf4",
        "q4-nf4-w4a8",
        "candle-f32",
        "candle-q4k",
    ];
    if !args.no_q4_0 {
        names.push("candle-q4_0");
    }
    names.push(PLAIN_READ);
    for shape in &args.shapes {
        let (n, k) = parse_shape(shape)?;
        let w = Tensor::from_vec(random(n * k, 7, 0.02), (n, k), &Device::Cpu)?;
        let max_batch = args.batches.iter().copied().max().unwrap_or(1);
        let cold_copies = |bytes: usize| (3 * (llc_mib << 20)).div_ceil(bytes.max(1)).max(2);
        let mut contenders = Vec::new();
        for &name in &names {
            // One copy first to learn the stored size, then enough copies for the rotation.
            let probe = match build(name, &w, 1) {
                Ok(p) => p,
                Err(e) => {
                    // e.g. Q4K needs rows of a multiple of 256 elements.
                    let line = format!(
                        "{shape:<12}   -   -     {name:<13} n/a: {}",
                        e.to_string().lines().next().unwrap_or("")
                    );
                    eprintln!("{line}");
                    writeln!(out, "{line}")?;
                    continue;
                }
            };
            let copies = if args.batches.iter().any(|&b| b <= args.cold_up_to) {
                cold_copies(probe.bytes)
            } else {
                1
            };
            contenders.push(if copies == 1 {
                probe
            } else {
                build(name, &w, copies)?
            });
        }
        let xs = random(max_batch * k, 11, 1.0);
        for &batch in &args.batches {
            let x = Tensor::from_vec(xs[..batch * k].to_vec(), (batch, k), &Device::Cpu)?
                .to_dtype(DType::F32)?;
            let cold = batch <= args.cold_up_to;
            let active: Vec<&Contender> = contenders
                .iter()
                .filter(|c| cold || c.name != PLAIN_READ)
                .collect();
            let reps = if n * k * batch > 200_000_000 {
                args.reps.min(10)
            } else {
                args.reps
            };
            // Every copy is called once before timing: candle repacks a Q4K weight on its first
            // call (and caches it per tensor), which must not land in the timed calls.
            let warmup = active
                .iter()
                .map(|c| c.layers(cold).len())
                .max()
                .unwrap_or(0)
                .max(2);
            // q4's layers (and the plain read) of a quarter million weights and more run on
            // every thread of the pool at every batch (smaller ones may run on the calling
            // thread alone); candle's f32 matmul runs batch 1 on one thread and its Q4K on a
            // pool of its own, so only the other processes are checked for those.
            let parallel = n * k >= PARALLEL_WEIGHTS;
            let guard = |c: &Contender| {
                if parallel && (c.name.starts_with("q4-") || c.name == PLAIN_READ) {
                    Guard::parallel(args.max_others)
                } else {
                    Guard::others(args.max_others)
                }
            };
            let call = |c: &Contender, i: usize| {
                let layers = c.layers(cold);
                let y = layers[i % layers.len()].forward(&x).expect("forward");
                std::hint::black_box(y);
            };
            let timed = || -> Vec<Timing> {
                if !args.interleave {
                    active
                        .iter()
                        .map(|c| time(warmup, reps, guard(c), |i| call(c, i)))
                        .collect()
                } else {
                    let mut fs: Vec<Box<dyn FnMut(usize) + '_>> = active
                        .iter()
                        .map(|c| Box::new(move |i| call(c, i)) as Box<dyn FnMut(usize)>)
                        .collect();
                    let mut refs: Vec<&mut dyn FnMut(usize)> = fs
                        .iter_mut()
                        .map(|f| &mut **f as &mut dyn FnMut(usize))
                        .collect();
                    time_interleaved(
                        warmup,
                        MIN_WARMUP,
                        reps,
                        INTERLEAVE_BLOCK,
                        Guard::others(args.max_others),
                        &mut refs,
                    )
                }
            };
            let timings = if args.in_pool {
                let mut t = None;
                rayon::scope(|_| t = Some(timed()));
                t.expect("the scope ran")
            } else {
                timed()
            };
            let results: Vec<(&str, usize, Timing)> = active
                .iter()
                .zip(timings)
                .map(|(c, t)| (c.name, c.bytes, t))
                .collect();
            let get = |name: &str| results.iter().find(|r| r.0 == name).map(|r| r.2.median);
            for (name, bytes, t) in &results {
                let flops = 2.0 * (n * k * batch) as f64;
                let line = format!(
                    "{:<12} {:>5} {:<5} {:<13} {:>9} {:>8.2} {:>9.1} {:>7.1} {:>7.2} {:>7.2} {:>7.2} {:>6.2}",
                    shape,
                    batch,
                    if cold { "cold" } else { "warm" },
                    name,
                    millis(t.median),
                    *bytes as f64 / t.median / 1e9,
                    flops / t.median / 1e9,
                    100.0 * (*bytes as f64 / t.median) / bw,
                    get("candle-f32").map_or(f64::NAN, |f| f / t.median),
                    get("candle-q4k").map_or(f64::NAN, |f| f / t.median),
                    t.others,
                    t.cores,
                );
                // Kept after every attempt was disturbed: said at the end of its row.
                let line = if t.disturbed {
                    format!("{line} disturbed")
                } else {
                    line
                };
                eprintln!("{line}");
                writeln!(out, "{line}")?;
            }
        }
    }
    print!("{out}");
    Ok(())
}

/// Milliseconds with three decimals, or three significant digits where that would show a
/// non-zero time as 0.000 (sub-microsecond calls on tiny shapes).
fn millis(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms != 0.0 && ms.abs() < 0.0005 {
        format!("{ms:.2e}")
    } else {
        format!("{ms:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::millis;

    #[test]
    fn millis_never_shows_a_nonzero_time_as_zero() {
        assert_eq!(millis(0.0123456), "12.346");
        assert_eq!(millis(1.5e-6), "0.002");
        let tiny = millis(2.5e-7);
        assert_eq!(tiny, "2.50e-4");
        assert_eq!(tiny.parse::<f64>().unwrap(), 2.5e-4);
        assert_eq!(millis(0.0), "0.000");
    }
}
