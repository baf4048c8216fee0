//! Per-device codebook cache: each (device, format) pair gets its 16-entry codebook (and, on
//! accelerators, a device-resident copy for the kernels) created once and shared afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, DeviceLocation, Tensor};

use crate::error::Result;
use crate::kernels::cpu::rows::codebook;
use crate::Format;

/// A format's codebook on one device.
#[derive(Debug)]
pub struct DeviceLut {
    pub format: Format,
    /// Host copy, used by CPU kernels.
    pub host: &'static [f32; 16],
    /// The same 16 values resident on the device (`None` on the CPU).
    pub device: Option<Tensor>,
}

type Key = (DeviceLocation, Format);

fn cache() -> &'static Mutex<HashMap<Key, Arc<DeviceLut>>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<DeviceLut>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The codebook of `format` on `device`, created on first use.
pub fn get(device: &Device, format: Format) -> Result<Arc<DeviceLut>> {
    let key = (device.location(), format);
    let mut map = cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = map.get(&key) {
        return Ok(l.clone());
    }
    let host = codebook(format);
    let device_copy = match device {
        Device::Cpu => None,
        d => Some(Tensor::from_slice(host, 16, d)?),
    };
    let lut = Arc::new(DeviceLut {
        format,
        host,
        device: device_copy,
    });
    map.insert(key, lut.clone());
    Ok(lut)
}

/// Number of cached entries (for diagnostics and tests).
pub fn len() -> usize {
    cache().lock().unwrap_or_else(|e| e.into_inner()).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_per_device_and_format() {
        let a = get(&Device::Cpu, Format::Nf4).unwrap();
        let b = get(&Device::Cpu, Format::Nf4).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = get(&Device::Cpu, Format::Nvfp4).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.host[7], 6.0);
        assert_eq!(a.host[0], -1.0);
        assert!(len() >= 2);
    }
}
