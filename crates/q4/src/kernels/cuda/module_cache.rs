//! NVRTC compilation of q4's CUDA C at first use, for the running device's own architecture,
//! cached per device and per variant for the life of the process, and on disk between
//! processes ([`disk`]).
//!
//! Each kernel family is one `.cu` source; variants (format, operand and output type, tile
//! counts) are preprocessor defines, so only the variants a program uses are ever compiled.
//! Compilation goes straight to a CUBIN (no driver-side PTX JIT), and every failure becomes an
//! error that names the kernel, the target and NVRTC's log.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};
use candle_core::cuda_backend::CudaDevice;

use crate::error::{Error, Result};

pub const COMMON: &str = include_str!("cu/common.cuh");
pub const DEQUANT: &str = include_str!("cu/dequant.cu");
pub const QUANT: &str = include_str!("cu/quant.cu");
pub const GEMV: &str = include_str!("cu/gemv.cu");
pub const GEMM_SM90: &str = include_str!("cu/gemm_sm90.cu");
pub const W4A4: &str = include_str!("cu/w4a4.cu");
pub const SM120: &str = include_str!("cu/blackwell_sm120.cu");

/// Codebooks and thresholds as exact bit patterns, generated from q4-formats.
fn tables_header() -> String {
    use q4_formats::codebook::{
        BNB_FP4, BNB_FP4_SORTED_CODES, BNB_FP4_THRESHOLDS, NF4, NF4_THRESHOLDS,
    };
    use q4_formats::scalar::E2M1_VALUES;
    let hex = |v: &[f32]| {
        v.iter()
            .map(|x| format!("0x{:08x}u", x.to_bits()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut e2m1_pos = E2M1_VALUES;
    e2m1_pos[8] = 0.0;
    let sorted = BNB_FP4_SORTED_CODES
        .iter()
        .map(|c| format!("{c}u"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "__constant__ unsigned CB_BITS[4][16] = {{{{{}}}, {{{}}}, {{{}}}, {{{}}}}};\n\
         __constant__ unsigned NF4_TH_BITS[15] = {{{}}};\n\
         __constant__ unsigned FP4_TH_BITS[15] = {{{}}};\n\
         __constant__ unsigned FP4_SORTED[16] = {{{}}};\n",
        hex(&e2m1_pos),
        hex(&E2M1_VALUES),
        hex(&NF4),
        hex(&BNB_FP4),
        hex(&NF4_THRESHOLDS),
        hex(&BNB_FP4_THRESHOLDS),
        sorted
    )
}

/// The full source of a family with its defines: tables, common helpers, then the kernel.
pub fn source(family_src: &str, defines: &[(&str, i64)]) -> String {
    let mut s = String::new();
    for (k, v) in defines {
        s.push_str(&format!("#define {k} {v}\n"));
    }
    s.push_str(COMMON);
    s.push_str(&tables_header());
    s.push_str(family_src);
    s
}

/// `sm_XY` for a compute capability (the plain target: runs on that architecture only).
pub fn arch_for(cc: (u32, u32)) -> String {
    format!("sm_{}{}", cc.0, cc.1)
}

/// NVRTC's options for `arch`.
fn compile_options(arch: &str) -> [String; 6] {
    [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // Bit-exactness: IEEE division, no flush-to-zero, no contraction into FMA.
        "--ftz=false".to_string(),
        "--prec-div=true".to_string(),
        "--fmad=false".to_string(),
        "-default-device".to_string(),
    ]
}

/// Compiles `src` to a CUBIN for `arch` (e.g. `sm_90`, `sm_120a`). Needs NVRTC, not a GPU.
pub fn compile_cubin(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    let csrc = CString::new(src).map_err(|_| Error::msg("kernel source contains a NUL byte"))?;
    let cname = CString::new(name).map_err(|_| Error::msg("kernel name contains a NUL byte"))?;
    let prog = nvrtc::create_program(&csrc, Some(&cname))
        .map_err(|e| Error::msg(format!("NVRTC could not create program `{name}`: {e:?}")))?;
    let opts = compile_options(arch);
    // SAFETY: `prog` was just created and is destroyed exactly once below; the option strings
    // outlive the call; the log and CUBIN buffers are sized by NVRTC's own size queries.
    let out = unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let result = match compiled {
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(Error::msg(format!(
                    "NVRTC failed to compile q4 kernel `{name}` for {arch} ({e:?}): {}",
                    log.trim()
                )))
            }
            Ok(()) => {
                let mut size = 0usize;
                let rc = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size);
                if rc != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(Error::msg(format!(
                        "NVRTC produced no CUBIN for `{name}` ({arch}): {rc:?}"
                    )))
                } else {
                    let mut buf = vec![0u8; size];
                    let rc = nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast());
                    if rc == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
                        Ok(buf)
                    } else {
                        Err(Error::msg(format!(
                            "nvrtcGetCUBIN failed for `{name}`: {rc:?}"
                        )))
                    }
                }
            }
        };
        let _ = nvrtc::destroy_program(prog);
        result
    };
    if let (Ok(cubin), Some(dir)) = (&out, std::env::var_os("Q4_CUDA_DUMP_DIR")) {
        dump_cubin(std::path::Path::new(&dir), name, arch, src, cubin);
    }
    out
}

/// Kernel development aid (`Q4_CUDA_DUMP_DIR`): keeps each compiled CUBIN, with its source, for
/// `nvdisasm` / `cuobjdump -sass`. Best effort: a failed write is only logged.
fn dump_cubin(dir: &std::path::Path, name: &str, arch: &str, src: &str, cubin: &[u8]) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    let stem = dir.join(format!("{name}-{arch}-{:016x}", h.finish()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(stem.with_extension("cubin"), cubin))
        .and_then(|_| std::fs::write(stem.with_extension("cu"), src));
    if let Err(e) = written {
        tracing::warn!("could not dump {}: {e}", stem.display());
    }
}

fn load_error(key: &str, ordinal: usize, e: impl std::fmt::Display) -> Error {
    Error::msg(format!(
        "loading q4 kernel module `{key}` on device {ordinal} failed: {e}"
    ))
}

/// The CUBIN of `src` for `arch`: from the kernel cache in `dir` where it holds one and `reuse`
/// allows it (`true`), else compiled with NVRTC and kept there, replacing any kept file
/// (`false`). Without a `dir`, always compiled.
pub fn cached_cubin(
    name: &str,
    src: &str,
    arch: &str,
    dir: Option<&std::path::Path>,
    reuse: bool,
) -> Result<(Vec<u8>, bool)> {
    let Some(dir) = dir else {
        return Ok((compile_cubin(name, src, arch)?, false));
    };
    let key = disk::key(src, arch);
    if let Some(cubin) = reuse.then(|| disk::load(dir, name, arch, &key)).flatten() {
        return Ok((cubin, true));
    }
    let cubin = compile_cubin(name, src, arch)?;
    disk::store(dir, name, arch, &key, &cubin);
    Ok((cubin, false))
}

/// Compiled CUBINs kept on disk, so that a process does not compile again what an earlier one
/// did (NVRTC takes 0.1-0.3 s per kernel variant; a model's first forward uses dozens). Files
/// are `<family>-<arch>-<key>.cubin` in `$Q4_CUDA_CACHE_DIR`, else `$Q4_HOME/kernels` (see
/// [`crate::cache_home`]); `Q4_CUDA_CACHE=0` turns the cache off. The key hashes everything the
/// CUBIN depends on: the full source (defines, tables, helpers), the target, NVRTC's options and
/// version. Each file ends with the SHA-256 of its CUBIN, checked on every load; files are
/// written to a temporary name and renamed into place, so a reader never sees half of one.
/// The cache is best effort: a file that cannot be read or written only means a compile.
pub mod disk {
    use sha2::{Digest, Sha256};
    use std::path::{Path, PathBuf};

    /// The cache directory, or `None` where the cache is off or no directory is known.
    pub fn dir() -> Option<PathBuf> {
        if std::env::var_os("Q4_CUDA_CACHE").is_some_and(|v| v == "0") {
            return None;
        }
        std::env::var_os("Q4_CUDA_CACHE_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| crate::cache_home::q4_home().map(|h| h.join("kernels")))
    }

    /// The cache key of `src` compiled for `arch`: 32 hex digits of a SHA-256 over the source,
    /// the target, NVRTC's options and NVRTC's version.
    pub fn key(src: &str, arch: &str) -> String {
        let mut h = Sha256::new();
        for part in [src, arch] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        for opt in super::compile_options(arch) {
            h.update((opt.len() as u64).to_le_bytes());
            h.update(opt.as_bytes());
        }
        let (major, minor) = super::nvrtc_version().unwrap_or((0, 0));
        h.update(major.to_le_bytes());
        h.update(minor.to_le_bytes());
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn path(dir: &Path, name: &str, arch: &str, key: &str) -> PathBuf {
        dir.join(format!("{name}-{arch}-{key}.cubin"))
    }

    /// The kept CUBIN, if its file exists and its checksum holds.
    pub fn load(dir: &Path, name: &str, arch: &str, key: &str) -> Option<Vec<u8>> {
        let p = path(dir, name, arch, key);
        let mut bytes = std::fs::read(&p).ok()?;
        if bytes.len() < 32 {
            tracing::warn!(
                "kernel cache file {} is truncated; ignoring it",
                p.display()
            );
            return None;
        }
        let sum = bytes.split_off(bytes.len() - 32);
        if Sha256::digest(&bytes).as_slice() != sum.as_slice() {
            tracing::warn!(
                "kernel cache file {} fails its checksum; ignoring it",
                p.display()
            );
            return None;
        }
        Some(bytes)
    }

    /// Keeps `cubin` (best effort: a failure is logged, not returned), written beside its place
    /// and renamed into it (`checkpoint::write_atomically`).
    pub fn store(dir: &Path, name: &str, arch: &str, key: &str, cubin: &[u8]) {
        let p = path(dir, name, arch, key);
        let written = std::fs::create_dir_all(dir)
            .map_err(|e| crate::Error::msg(format!("cannot create {}: {e}", dir.display())))
            .and_then(|_| {
                crate::checkpoint::write_atomically(&p, |w| {
                    w.write_all(cubin)
                        .and_then(|_| w.write_all(&Sha256::digest(cubin)))
                        .map_err(|e| crate::Error::msg(e.to_string()))
                })
            });
        // One warning a process (a read-only cache fails for every kernel), the rest at debug.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        match written {
            Ok(()) => tracing::debug!("kept {}", p.display()),
            Err(e) if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) => tracing::warn!(
                "could not keep compiled kernel {} ({e}); kernels will be compiled again in \
                 each process (Q4_CUDA_CACHE_DIR sets another directory, Q4_CUDA_CACHE=0 turns \
                 the cache off)",
                p.display()
            ),
            Err(e) => tracing::debug!("could not keep compiled kernel {}: {e}", p.display()),
        }
    }
}

/// NVRTC's version, e.g. `(13, 0)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let rc = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if rc == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        Ok((major, minor))
    } else {
        Err(Error::msg(format!("nvrtcVersion failed: {rc:?}")))
    }
}

/// The compiled kernels of one device.
pub struct DeviceKernels {
    pub ctx: Arc<CudaContext>,
    pub cc: (u32, u32),
    pub arch: String,
    pub sm_count: u32,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl DeviceKernels {
    /// The kernel `function` of `family_src` compiled with `defines` (compiled on first use).
    pub fn function(
        &self,
        family: &str,
        family_src: &str,
        defines: &[(&str, i64)],
        function: &str,
    ) -> Result<CudaFunction> {
        self.function_for_arch(family, family_src, defines, function, &self.arch)
    }

    /// As [`Self::function`] for an explicit target (e.g. `sm_120a` for the native FP4 kernels).
    pub fn function_for_arch(
        &self,
        family: &str,
        family_src: &str,
        defines: &[(&str, i64)],
        function: &str,
        arch: &str,
    ) -> Result<CudaFunction> {
        let mut key = format!("{family}@{arch}");
        for (k, v) in defines {
            key.push_str(&format!(":{k}={v}"));
        }
        let fkey = format!("{key}#{function}");
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fkey)
        {
            return Ok(f.clone());
        }
        let module = {
            let mut map = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key) {
                Some(m) => m.clone(),
                None => {
                    let t = std::time::Instant::now();
                    let src = source(family_src, defines);
                    let dir = disk::dir();
                    let (cubin, from_disk) =
                        cached_cubin(family, &src, arch, dir.as_deref(), true)?;
                    let loaded = self.ctx.load_module(Ptx::from_binary(cubin));
                    let m = match (loaded, from_disk) {
                        (Ok(m), _) => m,
                        // A kept CUBIN this driver will not load (written by another driver,
                        // damaged past its checksum's reach): compile afresh and replace it.
                        (Err(e), true) => {
                            tracing::warn!("kept CUBIN of {key} did not load ({e}); recompiling");
                            let (cubin, _) =
                                cached_cubin(family, &src, arch, dir.as_deref(), false)?;
                            self.ctx
                                .load_module(Ptx::from_binary(cubin))
                                .map_err(|e| load_error(&key, self.ctx.ordinal(), e))?
                        }
                        (Err(e), false) => return Err(load_error(&key, self.ctx.ordinal(), e)),
                    };
                    tracing::debug!(
                        "{} {key} in {:.0} ms",
                        if from_disk { "loaded kept" } else { "compiled" },
                        t.elapsed().as_secs_f64() * 1e3
                    );
                    map.insert(key.clone(), m.clone());
                    m
                }
            }
        };
        let f = module.load_function(function).map_err(|e| {
            Error::msg(format!(
                "q4 kernel `{function}` missing from module `{key}`: {e}"
            ))
        })?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fkey, f.clone());
        Ok(f)
    }

    /// Number of compiled modules (diagnostics).
    pub fn module_count(&self) -> usize {
        self.modules.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The per-device kernel cache for candle's CUDA device `dev`.
pub fn for_device(dev: &CudaDevice) -> Result<Arc<DeviceKernels>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<DeviceKernels>>>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let ordinal = ctx.ordinal();
    let mut map = CACHE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(k) = map.get(&ordinal) {
        return Ok(k.clone());
    }
    let (major, minor) = ctx.compute_capability().map_err(|e| {
        Error::msg(format!(
            "cannot read the compute capability of device {ordinal}: {e}"
        ))
    })?;
    let cc = (major as u32, minor as u32);
    if !super::plan::arch_supported(cc) {
        return Err(Error::msg(format!(
            "device {ordinal} has compute capability {major}.{minor}; q4's CUDA kernels need 7.5 or newer"
        )));
    }
    let sm_count = ctx
        .attribute(candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .unwrap_or(1)
        .max(1) as u32;
    let k = Arc::new(DeviceKernels {
        ctx,
        cc,
        arch: arch_for(cc),
        sm_count,
        modules: Mutex::new(HashMap::new()),
        functions: Mutex::new(HashMap::new()),
    });
    map.insert(ordinal, k.clone());
    Ok(k)
}

#[cfg(test)]
mod tests {
    //! The on-disk kernel cache. These need NVRTC (not a GPU): they run in CUDA builds.
    use super::*;

    fn quant_source(extra: i64) -> String {
        source(QUANT, &[("Q4_TEST_VARIANT", extra)])
    }

    fn cubin_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// A variant is compiled once; the next request (as from a new process) reads the kept
    /// CUBIN back, byte for byte; another variant is a miss; nothing but `.cubin` files remain.
    #[test]
    fn the_disk_cache_keeps_what_it_compiled() {
        let dir = tempfile::tempdir().unwrap();
        let src = quant_source(1);
        let (first, hit) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        assert!(!hit);
        let (again, hit) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        assert!(hit);
        assert_eq!(first, again);
        let (_, hit) =
            cached_cubin("quant", &quant_source(2), "sm_90", Some(dir.path()), true).unwrap();
        assert!(!hit);
        let files = cubin_files(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "cubin")));
        // Without a directory nothing is kept.
        let (_, hit) = cached_cubin("quant", &src, "sm_90", None, true).unwrap();
        assert!(!hit);
    }

    /// A kept file that is damaged or cut short is not used: the CUBIN is compiled again and
    /// the file replaced with a good one.
    #[test]
    fn a_damaged_kept_cubin_is_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let src = quant_source(3);
        let (good, _) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        let file = cubin_files(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[100] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();
        let (got, hit) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        assert!(!hit, "a flipped bit must fail the checksum");
        assert_eq!(got, good);
        assert!(
            cached_cubin("quant", &src, "sm_90", Some(dir.path()), true)
                .unwrap()
                .1
        );
        std::fs::write(&file, b"short").unwrap();
        let (got, hit) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        assert!(!hit);
        assert_eq!(got, good);
    }

    /// A cache directory that cannot be created (here: below a file) costs only the keeping:
    /// the CUBIN still comes back, compiled, every time.
    #[test]
    fn an_unusable_cache_directory_only_means_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let bad = file.join("kernels");
        let src = quant_source(6);
        for _ in 0..2 {
            let (cubin, hit) = cached_cubin("quant", &src, "sm_90", Some(&bad), true).unwrap();
            assert!(!hit);
            assert!(!cubin.is_empty());
        }
    }

    /// Without `reuse` the CUBIN is compiled even where one is kept, and replaces it: what the
    /// loader does with a kept file its driver will not load.
    #[test]
    fn compiling_afresh_replaces_the_kept_cubin() {
        let dir = tempfile::tempdir().unwrap();
        let src = quant_source(7);
        let (good, _) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        let file = cubin_files(dir.path()).pop().unwrap();
        std::fs::write(&file, b"not a cubin").unwrap();
        let (got, hit) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), false).unwrap();
        assert!(!hit);
        assert_eq!(got, good);
        let (kept, hit) = cached_cubin("quant", &src, "sm_90", Some(dir.path()), true).unwrap();
        assert!(hit);
        assert_eq!(kept, good);
    }

    /// The key changes with the source and with the target, and only with them.
    #[test]
    fn the_cache_key_follows_source_and_target() {
        let src = quant_source(4);
        let k = disk::key(&src, "sm_90");
        assert_eq!(k, disk::key(&src, "sm_90"));
        assert_eq!(k.len(), 32);
        assert_ne!(k, disk::key(&quant_source(5), "sm_90"));
        assert_ne!(k, disk::key(&src, "sm_89"));
        assert_ne!(k, disk::key(&src, "sm_90a"));
    }
}
