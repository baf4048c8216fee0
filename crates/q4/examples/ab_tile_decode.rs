//! Same-process A/B of two choices of the tiled GEMM, calls alternating on weight copies rotating
//! over 3x the last-level cache; prints the median µs per call of each.
//!
//! - `decode` (default): tiles decoded in the GEMV's chunk order (with permuted activations)
//!   against element order.
//! - `slices`: rows up to `UNSLICED_MAX_K` wide decoded whole (tiles of fewer rows) against the
//!   earlier rule, 256-wide K slices above 1024. Batches 9-16 take the tiled GEMM on both sides.
//! - `nr4`: the dot-product micro-kernel's 3 x 4 blocks against 3 x 3.
//! - `int8`: W4A8 (`ActQuant::Int8`) calls through the int8 kernel against the f32 kernels on
//!   the activations' int8 round trip.
//! - `vnni`: W4A8 calls through the AVX-512 VNNI tile kernel (`w4a8_vnni`, from its smallest
//!   batch, or `Q4_VNNI_MIN_BATCH`) against what ran before it (the AVX2 int8 kernel up to 16,
//!   the f32 kernels above).
//! - `amx`: the AMX tile GEMM against the AVX2 kernels (AMX hosts; NVFP4, or with `nf4` the
//!   codebook one).
//! - `amxpf`: the AMX tile decoders' prefetch of later rows on against off.
//! - `persist`: the AMX GEMM's accumulators held in tile registers over all of K (one group
//!   pair) against stored per K slice.
//! - `sliceA-B` (e.g. `slice256-1024`): the AMX GEMM's K slice of A values against B.
//! - `cbsliceA-B`: the codebook (NF4) AMX GEMM's K slice for one activation group, A against B.
//! - `lanes`: batches 9-64 on the AVX-512 kernel with the activation rows in the vector lanes
//!   (`kernels::cpu::lanes`) against the dot-product micro-kernel.
//! - `lanesN` (e.g. `lanes512`): the lanes kernel up to batch N (passes of 64 rows) against
//!   up to 64 (then the dot-product kernel or the `gemm` crate).
//! - `dotN` (e.g. `dot64`): q4's dot-product micro-kernel up to batch N against the `gemm`
//!   crate's at every batch.
//!
//! `cargo run --release -p q4 --example ab_tile_decode [-- ROUNDS [SHAPES [BATCHES [FORMAT
//! [MODE]]]]]`, SHAPES like `1536x576,576x1536`, BATCHES like `12,64`, FORMAT `nvfp4` (default),
//! `nf4` or `mxfp4`.

mod ab;

use candle_core::{Device, Module, Tensor};
use q4::kernels::cpu::w4a8::set_int8_max_batch;
use q4::kernels::cpu::{
    default_gemv_passes_min_k, set_chunk_order_tiles, set_dot_max_batch, set_gemv_passes_min_k,
    set_unsliced_max_k, set_wide_tile_blocks, UNSLICED_MAX_K,
};
use q4::{ActQuant, Format, QLinear, QTensor, QuantSpec};

fn main() {
    let dev = Device::Cpu;
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(200);
    let shapes = args
        .next()
        .unwrap_or_else(|| "1536x576,576x1536,576x576,4096x4096".into());
    let batches = args.next().unwrap_or_else(|| "12,64".into());
    let format = match args.next().as_deref() {
        Some("nf4") => Format::Nf4,
        Some("mxfp4") => Format::Mxfp4,
        _ => Format::Nvfp4,
    };
    let mode = args.next().unwrap_or_default();
    let slices = mode == "slices";
    let nr4 = mode == "nr4";
    // `int8`: W4A8 calls, the int8 kernel against the f32 kernels on the activations' int8
    // round trip.
    let int8 = mode == "int8";
    // `vnni`: W4A8 calls, the VNNI tile kernel on against off.
    let vnni = mode == "vnni";
    let amx = mode == "amx";
    // `amxpf`: the AMX tile decoders' prefetch of later rows on against off.
    let amx_prefetch = mode == "amxpf";
    // `sliceA-B` (e.g. `slice256-1024`): the AMX GEMM's K slice A against B.
    let pair = |m: &str| -> Option<(usize, usize)> {
        let (a, b) = m.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let slice_ab = mode.strip_prefix("slice").and_then(pair);
    // `cbsliceA-B`: the codebook AMX GEMM's one-group K slice A against B.
    let cb_slice_ab = mode.strip_prefix("cbslice").and_then(pair);
    let dot_max: Option<usize> = mode.strip_prefix("dot").and_then(|n| n.parse().ok());
    let lanes = mode == "lanes";
    // `lanesN` (e.g. `lanes256`): the lanes kernel up to batch N against up to 64.
    let lanes_max: Option<usize> = mode.strip_prefix("lanes").and_then(|n| n.parse().ok());
    let select = |on: bool| {
        if lanes {
            #[cfg(target_arch = "x86_64")]
            q4::kernels::cpu::lanes::set_enabled(on);
        } else if let Some(max) = lanes_max {
            #[cfg(target_arch = "x86_64")]
            {
                q4::kernels::cpu::lanes::set_max_batch(if on { max } else { 64 });
                // `Q4_LANES_MIN_K`: rows this wide and up take the kernel on the `on` side.
                if let Some(k) = std::env::var("Q4_LANES_MIN_K")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    q4::kernels::cpu::lanes::set_min_k(if on {
                        k
                    } else {
                        q4::kernels::cpu::lanes::MIN_K
                    });
                }
            }
            let _ = max;
        } else if mode == "persist" {
            #[cfg(target_arch = "x86_64")]
            q4::kernels::cpu::amx::set_persist(on);
        } else if let Some((a, b)) = cb_slice_ab {
            #[cfg(target_arch = "x86_64")]
            q4::kernels::cpu::amx::codebook::set_one_group_slice(if on { a } else { b });
            let _ = (a, b);
        } else if let Some((a, b)) = slice_ab {
            #[cfg(target_arch = "x86_64")]
            q4::kernels::cpu::amx::set_slice(if on { a } else { b });
            let _ = (a, b);
        } else if amx_prefetch {
            #[cfg(target_arch = "x86_64")]
            q4::kernels::cpu::amx::set_decode_prefetch(on);
        } else if amx {
            #[cfg(target_arch = "x86_64")]
            q4::kernels::cpu::amx::set_enabled(on);
        } else if int8 {
            set_int8_max_batch(if on { usize::MAX } else { 0 });
        } else if vnni {
            #[cfg(target_arch = "x86_64")]
            {
                q4::kernels::cpu::w4a8_vnni::set_enabled(on);
                // `Q4_VNNI_MIN_BATCH`: try the kernel below its default smallest batch.
                if let Some(b) = std::env::var("Q4_VNNI_MIN_BATCH")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    q4::kernels::cpu::w4a8_vnni::set_min_batch(b);
                }
            }
        } else if nr4 {
            set_wide_tile_blocks(on);
        } else if let Some(max) = dot_max {
            // 1: no tiled batch (all above 8) takes the dot-product kernel.
            set_dot_max_batch(if on { max } else { 1 });
        } else if slices {
            set_unsliced_max_k(if on { UNSLICED_MAX_K } else { 1024 });
        } else {
            set_chunk_order_tiles(on);
        }
    };
    if slices {
        set_gemv_passes_min_k(usize::MAX);
        println!("{format}: shape  batch  whole_rows_us  k_slices_us  ratio");
    } else if int8 {
        println!("{format} W4A8: shape  batch  int8_us  f32_us  ratio");
    } else if vnni {
        println!("{format} W4A8: shape  batch  vnni_tiles_us  before_us  ratio");
    } else if nr4 {
        println!("{format}: shape  batch  3x4_us  3x3_us  ratio");
    } else if amx {
        println!("{format}: shape  batch  amx_us  without_amx_us  ratio");
    } else if lanes {
        println!("{format}: shape  batch  lanes_us  dot_kernel_us  ratio");
    } else if let Some(max) = lanes_max {
        println!("{format}: shape  batch  lanes_to_{max}_us  before_us  ratio");
    } else if dot_max.is_some() {
        println!("{format}: shape  batch  dot_kernel_us  gemm_crate_us  ratio");
    } else {
        println!("{format}: shape  batch  chunk_us  element_us  ratio");
    }
    for shape in shapes.split(',') {
        let (n, k) = ab::parse_shape(shape);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let copies = ab::cold_rotation_bytes() / (n * k * 9 / 16) + 1;
        let lins: Vec<QLinear> = (0..copies)
            .map(|_| {
                let q = QTensor::quantize(&w, &QuantSpec::new(format)).unwrap();
                let lin = QLinear::new(q, None).unwrap();
                if int8 || vnni {
                    lin.with_act_quant(ActQuant::Int8).unwrap()
                } else {
                    lin
                }
            })
            .collect();
        for batch in batches
            .split(',')
            .map(|b| b.parse::<usize>().expect("batch"))
        {
            let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
            let (a, b) = ab::interleave(rounds, 5, copies, &select, &|c| {
                std::hint::black_box(lins[c].forward(&x).unwrap());
            });
            select(true);
            println!("{shape:<10} {batch:>5} {a:>9.1} {b:>11.1} {:>6.3}", a / b);
        }
    }
    set_gemv_passes_min_k(default_gemv_passes_min_k());
    set_dot_max_batch(0);
}
