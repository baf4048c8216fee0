//! Backend probe: what this machine offers (CPU SIMD, CUDA driver and devices, NVRTC) and which
//! kernel each format will use, with the fallback chain CUDA-native -> CUDA-dequant -> CPU.
//!
//! The probe never panics and never needs the `cuda` feature: it opens `libcuda.so.1` and
//! `libnvrtc` with `dlopen`, so a CPU-only build on a GPU machine still reports the GPU (and says
//! that this build cannot use it). A stub driver library (as used to *link* CUDA builds on
//! machines without a GPU) is detected because its `cuDriverGetVersion` writes nothing.

use std::ffi::{c_char, c_int, c_uint, CStr};

use serde::Serialize;

use crate::kernels::cpu::{
    kernel_for, CpuKernel, GEMV_MAX_BATCH, GEMV_PASSES_MAX_BATCH, GEMV_PASSES_MIN_K,
};
use crate::kernels::cuda::plan::{self, CudaPlan};
use crate::Format;

/// Everything `q4 doctor` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub q4_version: &'static str,
    /// Whether this build has the `cuda` feature (candle's CUDA device plus q4's kernels).
    pub cuda_feature: bool,
    pub cpu: CpuReport,
    pub cuda: CudaReport,
    /// The backend a `--device auto` run would pick: `cuda:0` or `cpu`.
    pub selected_backend: String,
    /// Order in which backends are tried for a quantized matmul.
    pub fallback_chain: Vec<&'static str>,
}

/// The CPU side.
#[derive(Clone, Debug, Serialize)]
pub struct CpuReport {
    pub arch: &'static str,
    pub threads: usize,
    /// Size of the largest data cache of CPU 0 (Linux sysfs), if known: cache-cold
    /// benchmarks rotate through several times this much memory.
    pub last_level_cache_bytes: Option<usize>,
    /// SIMD features detected at run time.
    pub simd: Vec<&'static str>,
    /// The CPU kernel per format and batch size.
    pub kernels: Vec<CpuKernelRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CpuKernelRow {
    pub format: &'static str,
    pub batch: String,
    pub kernel: &'static str,
}

/// The CUDA side.
#[derive(Clone, Debug, Serialize)]
pub struct CudaReport {
    /// `ok`, `no-driver`, `stub-driver`, `no-device` or `error`.
    pub status: &'static str,
    /// Why the status is not `ok` (or extra context).
    pub detail: Option<String>,
    /// Kernel-module version of the NVIDIA driver (e.g. `580.159.04`), when readable.
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports (`cuDriverGetVersion`), e.g. `13.0`.
    pub driver_cuda_version: Option<String>,
    pub nvrtc: NvrtcReport,
    pub devices: Vec<DeviceReport>,
}

/// NVRTC (run-time compiler of q4's CUDA kernels).
#[derive(Clone, Debug, Serialize)]
pub struct NvrtcReport {
    /// `ok`, `missing` or `error`.
    pub status: &'static str,
    pub version: Option<String>,
    pub detail: Option<String>,
    /// Where compiled kernels are kept between runs, and how many are (CUDA builds; `off`
    /// where `Q4_CUDA_CACHE=0` or no directory is known).
    pub kernel_cache: Option<String>,
}

/// One CUDA device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: String,
    pub multiprocessors: i32,
    pub total_memory_bytes: usize,
    /// Free memory (needs a context; filled in by CUDA builds).
    pub free_memory_bytes: Option<usize>,
    pub l2_cache_bytes: i32,
    /// Shares memory with the CPU (Jetson, DGX Spark / GB10).
    pub integrated: bool,
    pub managed_memory: bool,
    pub concurrent_managed_access: bool,
    pub pageable_memory_access: bool,
    pub pageable_memory_uses_host_page_tables: bool,
    /// FP4 tensor cores (Blackwell, compute capability 10.x / 11.x / 12.x).
    pub native_fp4: bool,
    /// The NVRTC target q4's native FP4 kernel is built for on this device, if any.
    pub native_fp4_target: Option<&'static str>,
    /// Whether this build can run q4's kernels here (cuda feature + NVRTC + supported arch).
    pub usable: bool,
    pub kernels: Vec<DeviceKernelRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceKernelRow {
    pub format: &'static str,
    #[serde(flatten)]
    pub plan: CudaPlan,
}

/// Runs the whole probe. Cheap (no context is created unless the `cuda` feature can use one).
pub fn probe() -> Report {
    let cpu = cpu_report();
    #[allow(unused_mut)]
    let mut cuda = cuda_report();
    #[cfg(feature = "cuda")]
    crate::kernels::cuda::enrich_report(&mut cuda);
    let selected_backend = match cuda.devices.iter().find(|d| d.usable) {
        Some(d) => format!("cuda:{}", d.ordinal),
        None => "cpu".to_string(),
    };
    Report {
        q4_version: env!("CARGO_PKG_VERSION"),
        cuda_feature: cfg!(feature = "cuda"),
        cpu,
        cuda,
        selected_backend,
        fallback_chain: vec!["cuda-native", "cuda-dequant", "cpu"],
    }
}

fn cpu_kernel_name(k: CpuKernel) -> &'static str {
    match k {
        CpuKernel::GemvSimd if cfg!(target_arch = "aarch64") => "gemv-neon (fused decode, NEON)",
        #[cfg(target_arch = "x86_64")]
        CpuKernel::GemvSimd
            if crate::kernels::cpu::avx512::usable()
                && crate::kernels::cpu::avx512_groups::usable() =>
        {
            "gemv-avx512 (fused decode, AVX-512F: codebook in a register, vpermps lookups; batch 1 in 128-weight groups, one 64-byte code load each, AVX-512BW)"
        }
        #[cfg(target_arch = "x86_64")]
        CpuKernel::GemvSimd if crate::kernels::cpu::avx512::usable() => {
            "gemv-avx512 (fused decode, AVX-512F: codebook in a register, vpermps lookups)"
        }
        CpuKernel::GemvSimd => "gemv-avx2 (fused decode, AVX2+FMA)",
        CpuKernel::GemvPortable => "gemv-portable (fused decode)",
        #[cfg(target_arch = "x86_64")]
        CpuKernel::TiledGemm
            if crate::kernels::cpu::tiles_use_dot_kernel()
                && crate::kernels::cpu::avx512::usable() =>
        {
            "tiled-gemm (tile decode + q4's dot kernel, AVX-512, up to 256 rows over K <= 2048, else 128; gemm crate above)"
        }
        CpuKernel::TiledGemm if crate::kernels::cpu::tiles_use_dot_kernel() => {
            "tiled-gemm (tile decode + q4's dot kernel, AVX2, up to 128 rows; gemm crate above)"
        }
        CpuKernel::TiledGemm => "tiled-gemm (tile decode + gemm crate micro-kernel)",
        CpuKernel::GemvPasses => "gemv passes (fused decode, up to 8 activation rows a pass)",
    }
}

/// Size of the highest-level data or unified cache of CPU 0, from Linux sysfs
/// (`/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}`); `None` elsewhere or when
/// unreadable.
pub fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    let read = |p: &std::path::Path, name: &str| std::fs::read_to_string(p.join(name)).ok();
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("index"))
        })
        .filter_map(|p| {
            let kind = read(&p, "type")?;
            if kind.trim() == "Instruction" {
                return None;
            }
            let level: u32 = read(&p, "level")?.trim().parse().ok()?;
            Some((level, parse_cache_size(&read(&p, "size")?)?))
        })
        .max()
        .map(|(_, bytes)| bytes)
}

/// The last-level cache in MiB for sizing cache-cold benchmarks: the OS's figure
/// ([`last_level_cache_bytes`]), else 32 (the anchor machine).
pub fn last_level_cache_mib() -> usize {
    last_level_cache_bytes().map_or(32, |b| (b >> 20).max(1))
}

/// A sysfs cache size such as `48K`, `2048K`, `32M` or `1024` (bytes).
fn parse_cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = num.parse().ok()?;
    let shift = match unit.trim() {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// CPU features and kernels.
pub fn cpu_report() -> CpuReport {
    let mut kernels = Vec::new();
    for f in Format::ALL {
        for (label, batch, k) in [
            (format!("1-{GEMV_MAX_BATCH}"), 1, 0),
            (
                format!(
                    "{}-{GEMV_PASSES_MAX_BATCH}, rows > {} wide",
                    GEMV_MAX_BATCH + 1,
                    GEMV_PASSES_MIN_K - 1
                ),
                GEMV_MAX_BATCH + 1,
                GEMV_PASSES_MIN_K,
            ),
            (
                format!(">{GEMV_MAX_BATCH}, otherwise"),
                GEMV_MAX_BATCH + 1,
                0,
            ),
        ] {
            kernels.push(CpuKernelRow {
                format: f.name(),
                batch: label,
                kernel: cpu_kernel_name(kernel_for(batch, k)),
            });
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::lanes::host_usable() {
            use crate::kernels::cpu::lanes;
            kernels.push(CpuKernelRow {
                format: f.name(),
                batch: format!(
                    ">={} at K>={}, >={} at K>={}, past the dot kernel",
                    lanes::MIN_BATCH,
                    lanes::MIN_K,
                    lanes::WIDE_MIN_BATCH,
                    lanes::WIDE_MIN_K
                ),
                kernel: "tiled-gemm-lanes (rows decoded 64 columns at a time into L1, activation \
                         rows in the AVX-512 lanes, passes of 64 rows)",
            });
        }
        // E2M1 weights as they are; bitsandbytes codebooks rounded to int8, in rows of whole
        // blocks of 32-1024.
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::w4a8_vnni::host_usable() {
            let e2m1 = matches!(f, Format::Nvfp4 | Format::Mxfp4);
            kernels.push(CpuKernelRow {
                format: f.name(),
                batch: format!(
                    ">={}, W4A8 (int8 activations{})",
                    crate::kernels::cpu::w4a8_vnni::MIN_BATCH,
                    if e2m1 {
                        ""
                    } else {
                        ", rows of whole blocks of 32-1024"
                    }
                ),
                kernel: if e2m1 {
                    "w4a8-vnni-tiles (16 rows decoded to bytes, one row per lane, AVX-512 \
                     vpdpbusd; exact integer block sums)"
                } else {
                    "w4a8-vnni-tiles (16 rows decoded to bytes, one row per lane, AVX-512 \
                     vpdpbusd; the codebook rounded to int8, integer sums per 32 activations)"
                },
            });
        }
        // E2M1 codes times E4M3 scales are exact in bfloat16: the tile unit takes NVFP4, and
        // MXFP4 where its E8M0 scales lie within 2^±90 (smaller ones would make subnormal
        // products, which the tile unit flushes). Codebook formats (NF4, bnb-FP4) go to it as
        // two rounded bf16 pieces of weight and activation (where the rows are whole blocks).
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::amx::usable() {
            use crate::kernels::cpu::amx::codebook;
            match f {
                Format::Nvfp4 => kernels.push(CpuKernelRow {
                    format: f.name(),
                    batch: format!(">={}", crate::kernels::cpu::AMX_MIN_BATCH),
                    kernel: "tiled-gemm-amx (tiles decoded straight to bf16, AMX tdpbf16ps, \
                             f32 activations as three exact bf16 pieces, held in tile registers \
                             at batches 9-16)",
                }),
                Format::Nf4 | Format::Fp4 => kernels.push(CpuKernelRow {
                    format: f.name(),
                    batch: format!(
                        ">={} (>={} under {} wide), rows of whole blocks",
                        codebook::MIN_BATCH,
                        codebook::MIN_BATCH_NARROW,
                        codebook::WIDE_K
                    ),
                    kernel: "tiled-gemm-amx-codebook (weights and f32 activations as two \
                             rounded bf16 pieces each, three AMX tdpbf16ps products per \
                             weight: about 4e-6 relative error)",
                }),
                Format::Mxfp4 => kernels.push(CpuKernelRow {
                    format: f.name(),
                    batch: format!(
                        ">={}, scales within 2^-90..2^90",
                        crate::kernels::cpu::AMX_MIN_BATCH
                    ),
                    kernel: "tiled-gemm-amx (tiles decoded straight to bf16, AMX tdpbf16ps, \
                             f32 activations as three exact bf16 pieces)",
                }),
            }
        }
    }
    CpuReport {
        arch: std::env::consts::ARCH,
        threads: rayon::current_num_threads(),
        last_level_cache_bytes: last_level_cache_bytes(),
        simd: simd_features(),
        kernels,
    }
}

fn simd_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    v.push($f);
                }
            )*};
        }
        detect!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni"
        );
        if crate::kernels::cpu::amx::usable() {
            v.push("amx-bf16");
        } else if crate::kernels::cpu::amx::cpu_has_amx() {
            v.push("amx-bf16 (no tile-data permission: unused)");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {$(
                if std::arch::is_aarch64_feature_detected!($f) {
                    v.push($f);
                }
            )*};
        }
        detect!("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2");
    }
    v
}

// CUdevice_attribute values (cuda.h).
const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
const ATTR_INTEGRATED: c_int = 18;
const ATTR_L2_CACHE_SIZE: c_int = 38;
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;
const ATTR_MANAGED_MEMORY: c_int = 83;
const ATTR_PAGEABLE_MEMORY_ACCESS: c_int = 88;
const ATTR_CONCURRENT_MANAGED_ACCESS: c_int = 89;
const ATTR_PAGEABLE_USES_HOST_PAGE_TABLES: c_int = 100;
const CUDA_SUCCESS: c_int = 0;
const CUDA_ERROR_NO_DEVICE: c_int = 100;

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type NvrtcVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

/// Opens the first library that loads.
fn open_first(names: &[&str]) -> Result<libloading::Library, String> {
    let mut errs = Vec::new();
    for n in names {
        // SAFETY: loading a shared library runs its initialisers; the NVIDIA driver and NVRTC
        // libraries are designed to be dlopen'ed (cudarc and PyTorch do the same).
        match unsafe { libloading::Library::new(*n) } {
            Ok(l) => return Ok(l),
            Err(e) => errs.push(format!("{n} ({e})")),
        }
    }
    Err(format!("tried {}", errs.join(", ")))
}

fn version_string(v: c_int) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The driver's kernel-module version from `/proc` (Linux), e.g. `580.159.04`.
fn kernel_module_version() -> Option<String> {
    let s = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = s.lines().next()?;
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

fn nvrtc_report() -> NvrtcReport {
    let names: &[&str] = if cfg!(windows) {
        &["nvrtc64_130_0.dll", "nvrtc64_120_0.dll"]
    } else {
        &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    };
    let lib = match open_first(names) {
        Ok(l) => l,
        Err(e) => {
            return NvrtcReport {
                status: "missing",
                version: None,
                detail: Some(format!("libnvrtc could not be loaded: {e}")),
                kernel_cache: None,
            }
        }
    };
    // SAFETY: `nvrtcVersion` has this signature in every NVRTC release; the symbol is looked up
    // by name and only called while `lib` is alive.
    let version = unsafe {
        lib.get::<NvrtcVersion>(b"nvrtcVersion\0")
            .ok()
            .and_then(|f| {
                let (mut major, mut minor) = (-1, -1);
                (f(&mut major, &mut minor) == 0 && major > 0).then(|| format!("{major}.{minor}"))
            })
    };
    match version {
        Some(v) => NvrtcReport {
            status: "ok",
            version: Some(v),
            detail: None,
            kernel_cache: None,
        },
        None => NvrtcReport {
            status: "error",
            version: None,
            detail: Some("nvrtcVersion failed (stub or broken library)".into()),
            kernel_cache: None,
        },
    }
}

fn empty_cuda(status: &'static str, detail: String) -> CudaReport {
    CudaReport {
        status,
        detail: Some(detail),
        driver_version: kernel_module_version(),
        driver_cuda_version: None,
        nvrtc: nvrtc_report(),
        devices: Vec::new(),
    }
}

/// Driver and devices through `dlopen("libcuda.so.1")`.
pub fn cuda_report() -> CudaReport {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    let lib = match open_first(names) {
        Ok(l) => l,
        Err(e) => {
            return empty_cuda(
                "no-driver",
                format!("no NVIDIA driver library (libcuda.so.1) could be loaded: {e}"),
            )
        }
    };
    // SAFETY: the function types match the CUDA driver API (cuda.h); each symbol is resolved
    // by name from the library just opened and used only while `lib` is alive. Output
    // arguments are initialised to sentinels so that a stub library, which returns without
    // writing them, is detected instead of trusted.
    unsafe { cuda_report_from(&lib) }.unwrap_or_else(|e| empty_cuda("error", e))
}

unsafe fn sym<'l, T>(
    lib: &'l libloading::Library,
    name: &str,
) -> Result<libloading::Symbol<'l, T>, String> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    lib.get::<T>(n.as_slice())
        .map_err(|e| format!("the driver library lacks {name}: {e}"))
}

unsafe fn cuda_report_from(lib: &libloading::Library) -> Result<CudaReport, String> {
    let get_version = sym::<CuDriverGetVersion>(lib, "cuDriverGetVersion")?;
    let mut version: c_int = -1;
    let rc = get_version(&mut version);
    if rc != CUDA_SUCCESS || version <= 0 {
        return Ok(empty_cuda(
            "stub-driver",
            "libcuda.so.1 loaded but cuDriverGetVersion reported nothing: a link-time stub, \
             not an NVIDIA driver"
                .into(),
        ));
    }
    let init = sym::<CuInit>(lib, "cuInit")?;
    let rc = init(0);
    let mut report = CudaReport {
        status: "ok",
        detail: None,
        driver_version: kernel_module_version(),
        driver_cuda_version: Some(version_string(version)),
        nvrtc: nvrtc_report(),
        devices: Vec::new(),
    };
    if rc == CUDA_ERROR_NO_DEVICE {
        report.status = "no-device";
        report.detail = Some("the NVIDIA driver is installed but sees no device".into());
        return Ok(report);
    }
    if rc != CUDA_SUCCESS {
        report.status = "error";
        report.detail = Some(format!("cuInit failed with CUDA error {rc}"));
        return Ok(report);
    }
    let count_fn = sym::<CuDeviceGetCount>(lib, "cuDeviceGetCount")?;
    let device_get = sym::<CuDeviceGet>(lib, "cuDeviceGet")?;
    let get_name = sym::<CuDeviceGetName>(lib, "cuDeviceGetName")?;
    let total_mem = sym::<CuDeviceTotalMem>(lib, "cuDeviceTotalMem_v2")?;
    let attr = sym::<CuDeviceGetAttribute>(lib, "cuDeviceGetAttribute")?;
    let mut count: c_int = 0;
    if count_fn(&mut count) != CUDA_SUCCESS || count <= 0 {
        report.status = "no-device";
        report.detail = Some("cuDeviceGetCount found no device".into());
        return Ok(report);
    }
    let nvrtc_ok = report.nvrtc.status == "ok";
    for ordinal in 0..count {
        let mut dev: c_int = -1;
        if device_get(&mut dev, ordinal) != CUDA_SUCCESS {
            continue;
        }
        let mut name = [0 as c_char; 256];
        let name = if get_name(name.as_mut_ptr(), name.len() as c_int, dev) == CUDA_SUCCESS {
            CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned()
        } else {
            "unknown".into()
        };
        let a = |id: c_int| -> i32 {
            let mut v: c_int = 0;
            if attr(&mut v, id, dev) == CUDA_SUCCESS {
                v
            } else {
                0
            }
        };
        let mut mem: usize = 0;
        if total_mem(&mut mem, dev) != CUDA_SUCCESS {
            mem = 0;
        }
        let cc = (a(ATTR_CC_MAJOR) as u32, a(ATTR_CC_MINOR) as u32);
        let target = plan::native_fp4_target(cc);
        report.devices.push(DeviceReport {
            ordinal: ordinal as usize,
            name,
            compute_capability: format!("{}.{}", cc.0, cc.1),
            multiprocessors: a(ATTR_MULTIPROCESSOR_COUNT),
            total_memory_bytes: mem,
            free_memory_bytes: None,
            l2_cache_bytes: a(ATTR_L2_CACHE_SIZE),
            integrated: a(ATTR_INTEGRATED) != 0,
            managed_memory: a(ATTR_MANAGED_MEMORY) != 0,
            concurrent_managed_access: a(ATTR_CONCURRENT_MANAGED_ACCESS) != 0,
            pageable_memory_access: a(ATTR_PAGEABLE_MEMORY_ACCESS) != 0,
            pageable_memory_uses_host_page_tables: a(ATTR_PAGEABLE_USES_HOST_PAGE_TABLES) != 0,
            native_fp4: plan::has_fp4_tensor_cores(cc),
            native_fp4_target: target,
            usable: cfg!(feature = "cuda") && nvrtc_ok && plan::arch_supported(cc),
            kernels: Format::ALL
                .into_iter()
                .map(|f| DeviceKernelRow {
                    format: f.name(),
                    plan: plan::plan(cc, f),
                })
                .collect(),
        });
    }
    if !cfg!(feature = "cuda") {
        report.detail = Some(
            "this q4 was built without the `cuda` feature: the GPU is not used \
             (rebuild with `--features cuda`)"
                .into(),
        );
    }
    Ok(report)
}

/// Human-readable multi-line rendering of a report.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let _ = writeln!(
        s,
        "q4 {}  (cuda feature: {})",
        r.q4_version,
        if r.cuda_feature { "on" } else { "off" }
    );
    let _ = writeln!(s, "selected backend: {}", r.selected_backend);
    let _ = writeln!(s, "fallback chain: {}", r.fallback_chain.join(" -> "));
    let _ = writeln!(
        s,
        "\nCPU: {} x{} threads, last-level cache {}, SIMD: {}",
        r.cpu.arch,
        r.cpu.threads,
        r.cpu
            .last_level_cache_bytes
            .map_or("unknown".to_string(), |b| format!("{} MiB", b >> 20)),
        if r.cpu.simd.is_empty() {
            "none detected".to_string()
        } else {
            r.cpu.simd.join(" ")
        }
    );
    let width = r
        .cpu
        .kernels
        .iter()
        .map(|k| k.batch.len())
        .max()
        .unwrap_or(0);
    for k in &r.cpu.kernels {
        let _ = writeln!(
            s,
            "  {:<6} batch {:<width$}  {}",
            k.format, k.batch, k.kernel
        );
    }
    let c = &r.cuda;
    let _ = writeln!(s, "\nCUDA: {}", c.status);
    if let Some(d) = &c.detail {
        let _ = writeln!(s, "  {d}");
    }
    let _ = writeln!(
        s,
        "  driver: {}  (CUDA {})",
        c.driver_version.as_deref().unwrap_or("unknown"),
        c.driver_cuda_version.as_deref().unwrap_or("n/a")
    );
    let _ = writeln!(
        s,
        "  nvrtc: {}{}{}",
        c.nvrtc.status,
        c.nvrtc
            .version
            .as_deref()
            .map(|v| format!(" {v}"))
            .unwrap_or_default(),
        c.nvrtc
            .detail
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    if let Some(cache) = &c.nvrtc.kernel_cache {
        let _ = writeln!(s, "  kernel cache: {cache}");
    }
    for d in &c.devices {
        let _ = writeln!(
            s,
            "  device {}: {}  sm_{}  {} SMs  {:.1} GiB{}  L2 {} MiB",
            d.ordinal,
            d.name,
            d.compute_capability.replace('.', ""),
            d.multiprocessors,
            gib(d.total_memory_bytes),
            d.free_memory_bytes
                .map(|f| format!(" ({:.1} GiB free)", gib(f)))
                .unwrap_or_default(),
            d.l2_cache_bytes >> 20
        );
        let _ = writeln!(s, "    integrated: {}  managed memory: {}  concurrent managed access: {}  pageable memory access: {} (host page tables: {})",
            d.integrated, d.managed_memory, d.concurrent_managed_access, d.pageable_memory_access,
            d.pageable_memory_uses_host_page_tables);
        let _ = writeln!(
            s,
            "    native FP4 tensor cores: {}{}  usable by this build: {}",
            d.native_fp4,
            d.native_fp4_target
                .map(|t| format!(" (q4 kernel target {t})"))
                .unwrap_or_default(),
            d.usable
        );
        for k in &d.kernels {
            let _ = writeln!(
                s,
                "    {:<6} decode: {}  prefill: {}  w4a4: {}",
                k.format, k.plan.decode, k.plan.prefill, k.plan.w4a4
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_like_sysfs_writes_them() {
        assert_eq!(parse_cache_size("48K\n"), Some(48 << 10));
        assert_eq!(parse_cache_size("266240K"), Some(266240 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("1024"), Some(1024));
        assert_eq!(parse_cache_size("12X"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    /// The doctor's name for the tiled GEMM states the dot kernel's actual batch limit.
    #[test]
    fn tiled_gemm_name_states_the_batch_limit() {
        if crate::kernels::cpu::tiles_use_dot_kernel() {
            let name = cpu_kernel_name(CpuKernel::TiledGemm);
            let limit = format!("up to {} rows", crate::kernels::cpu::DOT_MAX_BATCH);
            let wide = format!(
                "up to {} rows over K <= {}, else {}",
                crate::kernels::cpu::DOT_WIDE_MAX_BATCH,
                crate::kernels::cpu::DOT_WIDE_MAX_K,
                crate::kernels::cpu::DOT_MAX_BATCH
            );
            assert!(name.contains(&limit) || name.contains(&wide), "{name}");
        }
    }
}
