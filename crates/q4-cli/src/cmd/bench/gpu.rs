//! GPU timing for the CUDA benchmarks: CUDA events around a batch of calls queued behind a spin
//! kernel (so host launch overhead never lands between the events), median of several batches,
//! and the device-to-device copy bandwidth of the same process.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream, LaunchConfig, PushKernelArg};
use candle_core::Device;
use q4::kernels::cuda::module_cache::{self, DeviceKernels};

pub const KERNELS: &str = include_str!("gpu_kernels.cu");

pub struct Gpu {
    pub device: Device,
    pub stream: Arc<CudaStream>,
    pub kernels: Arc<DeviceKernels>,
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::from_device(Device::new_cuda(ordinal).context("opening the CUDA device")?)
    }

    /// A device with its own (capturable) stream and no cross-stream event tracking, for
    /// CUDA-graph capture.
    pub fn with_own_stream(ordinal: usize) -> Result<Self> {
        let cuda = candle_core::cuda_backend::CudaDevice::new_with_stream(ordinal)
            .context("opening the CUDA device")?;
        // SAFETY: this device's tensors are only ever used on its one stream, so the
        // cross-stream synchronisation events are not needed (and cannot be captured).
        unsafe { cuda.disable_event_tracking() };
        Self::from_device(Device::Cuda(cuda))
    }

    fn from_device(device: Device) -> Result<Self> {
        let Device::Cuda(cuda) = &device else {
            unreachable!("new_cuda returns a CUDA device")
        };
        let stream = cuda.cuda_stream();
        let kernels = module_cache::for_device(cuda)?;
        Ok(Gpu {
            device,
            stream,
            kernels,
        })
    }

    /// Queues a kernel that keeps the GPU busy for `us` microseconds.
    pub fn spin(&self, us: u64) -> Result<()> {
        let f = self.kernels.function("bench", KERNELS, &[], "spin")?;
        let ns = us * 1000;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(&ns);
        // SAFETY: `spin` takes one u64 and touches no memory.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Median over `batches` of the device time per call of `f` (called `calls` times per batch,
    /// with the call index), in seconds.
    pub fn time<F: FnMut(usize) -> Result<()>>(
        &self,
        warmup: usize,
        calls: usize,
        batches: usize,
        mut f: F,
    ) -> Result<f64> {
        for i in 0..warmup {
            f(i)?;
        }
        self.stream.synchronize()?;
        let mut samples = Vec::with_capacity(batches);
        let mut i = warmup;
        for _ in 0..batches {
            // Enough head start for the host to queue all calls.
            self.spin(2000 + 50 * calls as u64)?;
            let start = self
                .stream
                .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            for _ in 0..calls {
                f(i)?;
                i += 1;
            }
            let end = self
                .stream
                .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            end.synchronize()?;
            samples.push(start.elapsed_ms(&end)? as f64 / 1e3 / calls as f64);
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    }

    /// Device-to-device copy bandwidth (bytes read + bytes written per second) of a `bytes`
    /// buffer.
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        let src = self.stream.alloc_zeros::<u8>(bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes)?;
        let t = self.time(2, 10, 5, |_| {
            self.stream.memcpy_dtod(&src, &mut dst)?;
            Ok(())
        })?;
        Ok(2.0 * bytes as f64 / t)
    }
}

/// Random normal values (mean 0, std `std`) as a device tensor of `shape`, never zeros.
pub fn randn(dev: &Device, shape: (usize, usize), std: f64) -> Result<candle_core::Tensor> {
    Ok(candle_core::Tensor::randn(0f32, std as f32, shape, dev)?)
}
