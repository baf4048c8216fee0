//! Device selection by name.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `cpu` or `cuda` (GPU 0). `cuda` fails clearly when candle was built without CUDA.
pub fn device_from_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context(
            "cannot use --device cuda (build q4 with `--features cuda` on a machine with an \
             NVIDIA GPU)",
        ),
        other => bail!("unknown device `{other}` (expected cpu or cuda)"),
    }
}
