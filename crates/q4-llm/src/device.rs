//! Device selection by name.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `cpu` or `cuda` (GPU 0). `cuda` fails clearly when candle was built without CUDA.
pub fn device_from_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0).context(
            "cannot use --device cuda (build q4 with `--features cuda` on a machine with an \
             NVIDIA GPU)",
        ),
        other => bail!("unknown device `{other}` (expected cpu or cuda)"),
    }
}

/// GPU `ordinal` on a stream of its own, which the decode step can capture as a CUDA graph
/// (candle's default device runs on the per-thread default stream).
#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    let dev = candle_core::cuda_backend::CudaDevice::new_with_stream(ordinal)?;
    // SAFETY: the runner does all of a device's work on this one stream, so candle's
    // cross-stream synchronisation events (which a stream capture cannot contain) are not
    // needed: nothing is freed, read or written on another stream.
    unsafe { dev.disable_event_tracking() };
    Ok(Device::Cuda(dev))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    Device::new_cuda(ordinal)
}
