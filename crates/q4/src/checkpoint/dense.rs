//! Dense (not 4-bit) tensors: typed access to mapped bytes and dtype conversion.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use half::{bf16, f16};
use q4_formats::scalar::{e4m3, e8m0};
use safetensors::Dtype;

use super::safetensors_io::RawTensor;
use crate::error::{Error, Result};
use crate::host_bytes::HostBytes;

/// A dense tensor: stored bytes (usually a view of a mapped file) plus dtype and shape.
#[derive(Clone, Debug)]
pub struct DenseView {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: HostBytes,
    /// Where it came from, for error messages.
    pub file: Arc<str>,
}

/// Elements of a floating tensor the quantizers accept, borrowed when the bytes are aligned.
pub enum FloatSlice<'a> {
    F32(Cow<'a, [f32]>),
    BF16(Cow<'a, [bf16]>),
    F16(Cow<'a, [f16]>),
}

/// Reinterprets little-endian bytes as `T`, without a copy when aligned.
fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    // safetensors data is little-endian, like every host q4 supports.
    const _: () = assert!(cfg!(target_endian = "little"));
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

impl DenseView {
    pub(crate) fn from_raw(t: RawTensor) -> Self {
        DenseView {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            data: t.bytes,
            file: t.file,
        }
    }

    /// Copies a candle tensor into a dense view (the hook for sources that are not safetensors,
    /// e.g. tensors a GGUF reader produced).
    pub fn from_tensor(name: impl Into<String>, t: &Tensor) -> Result<Self> {
        let name = name.into();
        let flat = t
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .contiguous()?;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (Dtype::F32, bytes_of(&flat.to_vec1::<f32>()?)),
            DType::BF16 => (Dtype::BF16, bytes_of(&flat.to_vec1::<bf16>()?)),
            DType::F16 => (Dtype::F16, bytes_of(&flat.to_vec1::<f16>()?)),
            DType::F64 => (Dtype::F64, bytes_of(&flat.to_vec1::<f64>()?)),
            DType::I64 => (Dtype::I64, bytes_of(&flat.to_vec1::<i64>()?)),
            DType::U32 => (Dtype::U32, bytes_of(&flat.to_vec1::<u32>()?)),
            DType::U8 => (Dtype::U8, flat.to_vec1::<u8>()?),
            other => {
                return Err(Error::msg(format!(
                    "tensor `{name}`: candle dtype {other:?} cannot be stored"
                )))
            }
        };
        Ok(DenseView {
            name,
            dtype,
            shape: t.dims().to_vec(),
            data: HostBytes::owned(data),
            file: "<memory>".into(),
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Context string for errors about this tensor.
    pub fn at(&self) -> String {
        format!("{}: tensor `{}`", self.file, self.name)
    }

    /// Whether the elements are floating point (they can be converted to f32).
    pub fn is_floating(&self) -> bool {
        float_dtype(self.dtype)
    }

    /// Whether the quantizers take this dtype directly or after a lossless widening.
    pub fn is_quantizable(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64
        )
    }

    /// The elements as the quantizers take them (F64 is narrowed to F32).
    pub fn float_slice(&self) -> Result<FloatSlice<'_>> {
        Ok(match self.dtype {
            Dtype::F32 => FloatSlice::F32(cast(&self.data)),
            Dtype::BF16 => FloatSlice::BF16(cast(&self.data)),
            Dtype::F16 => FloatSlice::F16(cast(&self.data)),
            Dtype::F64 => FloatSlice::F32(Cow::Owned(self.to_f32()?)),
            d => {
                return Err(Error::msg(format!(
                    "{}: dtype {d} cannot be quantized; expected F32, BF16, F16 or F64",
                    self.at()
                )))
            }
        })
    }

    /// All elements widened (or for F64 narrowed) to f32. Floating dtypes only.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = &self.data[..];
        Ok(match self.dtype {
            Dtype::F32 => cast::<f32>(b).into_owned(),
            Dtype::BF16 => cast::<bf16>(b).iter().map(|x| x.to_f32()).collect(),
            Dtype::F16 => cast::<f16>(b).iter().map(|x| x.to_f32()).collect(),
            Dtype::F64 => cast::<f64>(b).iter().map(|&x| x as f32).collect(),
            Dtype::F8_E4M3 => b.iter().map(|&x| e4m3::decode(x)).collect(),
            // E5M2 is the upper byte of an IEEE half.
            Dtype::F8_E5M2 => b
                .iter()
                .map(|&x| f16::from_bits((x as u16) << 8).to_f32())
                .collect(),
            Dtype::F8_E8M0 => b.iter().map(|&x| e8m0::decode(x)).collect(),
            d => {
                return Err(Error::msg(format!(
                    "{}: dtype {d} is not floating point",
                    self.at()
                )))
            }
        })
    }

    /// The amount of stored bytes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
}

/// Whether a safetensors dtype holds floating-point numbers q4 can decode.
pub fn float_dtype(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F32
            | Dtype::BF16
            | Dtype::F16
            | Dtype::F64
            | Dtype::F8_E4M3
            | Dtype::F8_E5M2
            | Dtype::F8_E8M0
    )
}

/// The torch name bitsandbytes writes into its quant-state JSON for a source dtype.
pub fn torch_dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F64 => "float64",
        _ => "float32",
    }
}

/// Little-endian bytes of a slice of plain numbers.
pub fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_bytes_are_copied_not_misread() {
        let v = [1.5f32, -2.0, 3.25];
        let mut bytes = vec![0u8];
        bytes.extend(bytes_of(&v));
        let d = DenseView {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![3],
            data: HostBytes::owned(bytes[1..].to_vec()),
            file: "mem".into(),
        };
        assert_eq!(d.to_f32().unwrap(), v);
        let odd = cast::<f32>(&bytes[1..]);
        assert_eq!(&odd[..], &v);
    }

    #[test]
    fn fp8_dense_decodes() {
        let d = DenseView {
            name: "x".into(),
            dtype: Dtype::F8_E4M3,
            shape: vec![3],
            data: HostBytes::owned(vec![0x38, 0x7e, 0xb8]),
            file: "mem".into(),
        };
        assert!(d.is_floating() && !d.is_quantizable());
        assert_eq!(d.to_f32().unwrap(), vec![1.0, 448.0, -1.0]);
        assert!(d.float_slice().is_err());
    }

    #[test]
    fn from_candle_tensor() {
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
        let d = DenseView::from_tensor("w", &t).unwrap();
        assert_eq!(d.shape, vec![2, 2]);
        assert_eq!(d.to_f32().unwrap(), vec![1., 2., 3., 4.]);
    }
}
