//! Glue between candle tensors and raw kernel launches.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};

static POISON: AtomicBool = AtomicBool::new(false);

/// Tests turn this on: every output buffer q4 allocates is filled with 0xFF bytes (NaN for
/// floats) before the kernel runs, so an element a kernel forgets to write cannot pass a check.
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// candle's CUDA device behind a `Device`.
pub fn cuda_device(d: &Device) -> Result<&CudaDevice> {
    match d {
        Device::Cuda(c) => Ok(c),
        other => Err(Error::msg(format!("expected a CUDA device, got {other:?}"))),
    }
}

/// Raw device address of a contiguous tensor's first element.
///
/// The address stays valid while `t` lives. Kernels that use it are enqueued on candle's stream,
/// and candle frees device memory stream-ordered on that same stream, so dropping `t` right
/// after a launch cannot free memory a queued kernel still reads.
pub fn device_ptr(t: &Tensor) -> Result<u64> {
    if !t.is_contiguous() {
        return Err(Error::msg("q4 CUDA kernels need contiguous tensors"));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::msg(format!(
            "expected a tensor on a CUDA device, found one on {:?}",
            t.device()
        )));
    };
    storage_ptr(cs, layout.start_offset())
}

/// Raw device address of element `offset` of a CUDA storage.
pub fn storage_ptr(cs: &CudaStorage, offset: usize) -> Result<u64> {
    let stream = cs.device.cuda_stream();
    let base = match cs.dtype() {
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => cs.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<f16>()?.device_ptr(&stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        other => {
            return Err(Error::msg(format!(
                "unsupported dtype {other:?} for a q4 kernel"
            )))
        }
    };
    Ok(base + (offset * cs.dtype().size_in_bytes()) as u64)
}

/// Uninitialised device storage of `n` elements (poisoned when [`poison_outputs`] is on).
pub fn empty_storage(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    let n = n.max(1);
    // SAFETY: the memory is uninitialised; every caller launches a kernel that writes all of it
    // before it is read (tests poison it to prove that).
    let storage = unsafe {
        match dtype {
            DType::U8 => CudaStorage::wrap_cuda_slice(dev.alloc::<u8>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<f16>(n)?, dev.clone()),
            other => {
                return Err(Error::msg(format!(
                    "cannot allocate {other:?} for a q4 kernel"
                )))
            }
        }
    };
    if POISON.load(Ordering::Relaxed) {
        memset(
            &storage_ptr(&storage, 0)?,
            0xff,
            n * dtype.size_in_bytes(),
            dev,
        )?;
    }
    Ok(storage)
}

/// An uninitialised tensor on `dev` (poisoned when [`poison_outputs`] is on).
pub fn empty(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let storage = empty_storage(dev, dtype, shape.elem_count())?;
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

fn memset(ptr: &u64, byte: u8, bytes: usize, dev: &CudaDevice) -> Result<()> {
    let stream = dev.cuda_stream();
    // SAFETY: `ptr` addresses at least `bytes` bytes of a live allocation; stream-ordered.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::result::memset_d8_async(
            *ptr,
            byte,
            bytes,
            stream.cu_stream(),
        )
    }
    .map_err(|e| Error::msg(format!("cuMemsetD8Async failed: {e}")))
}

/// Sets every byte of a (contiguous) tensor.
pub fn fill_bytes(t: &Tensor, byte: u8) -> Result<()> {
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    memset(&device_ptr(t)?, byte, bytes, cuda_device(t.device())?)
}

/// Wraps device storage as a tensor of `shape`.
pub fn tensor_from(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Activations as the matmul kernels see them: a contiguous row-major `[batch, k]` matrix.
pub struct Act<'a> {
    pub dev: &'a CudaDevice,
    pub ptr: u64,
    pub dtype: DType,
    pub batch: usize,
    pub k: usize,
}

impl<'a> Act<'a> {
    /// From a contiguous `[batch, k]` tensor (kept alive by the caller).
    pub fn from_tensor(x: &'a Tensor) -> Result<Self> {
        let (batch, k) = x.dims2()?;
        Ok(Act {
            dev: cuda_device(x.device())?,
            ptr: device_ptr(x)?,
            dtype: x.dtype(),
            batch,
            k,
        })
    }

    /// From candle custom-op arguments (contiguous layout).
    pub fn from_storage(cs: &'a CudaStorage, layout: &candle_core::Layout) -> Result<Self> {
        let (batch, k) = layout.shape().dims2()?;
        let Some((start, _)) = layout.contiguous_offsets() else {
            return Err(Error::msg("q4 CUDA matmul expects contiguous activations"));
        };
        Ok(Act {
            dev: &cs.device,
            ptr: storage_ptr(cs, start)?,
            dtype: cs.dtype(),
            batch,
            k,
        })
    }
}

/// A grid-stride launch over `n` work items with `threads` per block.
pub fn grid_for(n: usize, threads: u32, sm_count: u32) -> LaunchConfig {
    let blocks = n
        .div_ceil(threads as usize)
        .clamp(1, (sm_count as usize) * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Element type code of the kernels (T_F32 / T_BF16 / T_F16).
pub fn type_code(dtype: DType) -> Result<i64> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(Error::msg(format!(
            "q4 CUDA kernels take f32, bf16 or f16, got {other:?}"
        ))),
    }
}

/// An integer kernel-development knob from the environment (`None`: unset or not a number);
/// callers read each once.
pub fn knob(name: &str) -> Option<i64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Maps a launch failure to an error naming the kernel.
pub fn launched<T>(
    name: &str,
    r: std::result::Result<T, candle_core::cuda_backend::cudarc::driver::DriverError>,
) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| Error::msg(format!("launching q4 kernel `{name}` failed: {e}")))
}

/// Launches `func` on `stream`; with `early_start`, as a programmatic dependent launch
/// (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, compute capability 9.0 on): its
/// blocks may start once every block of the kernel before it in the stream has run
/// `pdl_trigger()` (common.cuh) or exited, and run up to their `pdl_wait()` while that kernel
/// still runs — so the kernel's start, and whatever it does before the wait, hides behind the
/// previous kernel's tail.
///
/// # Safety
/// `args` point to the kernel's arguments, in its parameter order, each of its parameter's type,
/// alive for the call; the buffers they name are large enough for the launch; with
/// `early_start`, the kernel reads nothing before its `pdl_wait()` that an earlier kernel in the
/// stream may still write, and writes nothing before it at all.
pub unsafe fn launch_ex(
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    args: &mut [*mut std::ffi::c_void],
    early_start: bool,
) -> std::result::Result<(), candle_core::cuda_backend::cudarc::driver::DriverError> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    stream.context().bind_to_thread()?;
    // SAFETY: a plain-old-data C struct; the union member set is the one the id names.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(early_start),
    };
    // SAFETY: FFI call; `config` and `attr` outlive it, the function belongs to the stream's
    // context (bound above), and the caller vouches for `args`.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// Kernel argument pointers for [`launch_ex`], in order: `kernel_args![a, b, c]`.
#[macro_export]
#[doc(hidden)]
macro_rules! kernel_args {
    ($($a:expr),* $(,)?) => {
        [$(($a) as *const _ as *mut ::std::ffi::c_void),*]
    };
}

/// A test's override of a setting that the environment or the plan otherwise decides, so that
/// a test can compare both choices in one process: `None` (the default) leaves the decision
/// alone. One atomic, readable from any thread.
pub struct TestOverride(std::sync::atomic::AtomicUsize);

impl TestOverride {
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicUsize::new(0))
    }

    pub fn set(&self, value: Option<usize>) {
        self.0.store(
            value.map_or(0, |v| v + 1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> Option<usize> {
        self.0
            .load(std::sync::atomic::Ordering::Relaxed)
            .checked_sub(1)
    }

    /// [`Self::set`] for an on / off switch.
    pub fn set_flag(&self, on: Option<bool>) {
        self.set(on.map(usize::from));
    }

    /// [`Self::get`] of an on / off switch.
    pub fn flag(&self) -> Option<bool> {
        self.get().map(|v| v != 0)
    }
}
