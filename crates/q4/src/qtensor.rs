//! `QTensor`: packed 4-bit codes plus block scales, resident on a candle device.
//!
//! Every format decodes the same way once loaded: `value = codebook[nibble] * block_scale`,
//! where the block scale is either a byte looked up in a 256-entry f32 table (NVFP4: E4M3 times
//! the tensor scale; MXFP4: E8M0) or an f32 (bitsandbytes absmax, nested statistics already
//! expanded). Only the nibble order (bitsandbytes: high first) and the block geometry (along
//! rows for NVFP4/MXFP4, over the flat tensor for bitsandbytes) differ.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use half::{bf16, f16};
use q4_formats::bnb::{self, Absmax, BnbKind, BnbOptions, BnbTensor, NestedAbsmax, NestedRounding};
use q4_formats::mxfp4::{self, Mxfp4Options, Mxfp4Tensor, ScaleRule};
use q4_formats::nvfp4::{self, Nvfp4Options, Nvfp4Tensor};
use q4_formats::{scalar, Element, Format, NonFinite};

use crate::error::{Error, Result};
use crate::host_bytes::HostBytes;

/// How to quantize a dense tensor.
#[derive(Clone, Copy, Debug)]
pub struct QuantSpec {
    pub format: Format,
    /// Block size; only bitsandbytes formats may change it (NVFP4 16, MXFP4 32).
    pub block_size: usize,
    /// bitsandbytes double quantization.
    pub double_quant: bool,
    /// MXFP4 shared-exponent rule.
    pub mx_rule: ScaleRule,
    /// NVFP4 tensor scale to use (shared by a fused group) instead of the tensor's own.
    pub scale2: Option<f32>,
    /// Zero-pad rows to whole blocks (NVFP4/MXFP4) instead of refusing.
    pub pad: bool,
    pub non_finite: NonFinite,
}

impl QuantSpec {
    /// Defaults for a format: NVFP4 (ModelOpt), NF4/FP4 block 64 without double quantization,
    /// MXFP4 with RCEIL.
    pub fn new(format: Format) -> Self {
        QuantSpec {
            format,
            block_size: format.default_block_size(),
            double_quant: false,
            mx_rule: ScaleRule::Rceil,
            scale2: None,
            pad: false,
            non_finite: NonFinite::Reject,
        }
    }

    /// The same spec with another block size.
    pub fn with_block(mut self, block_size: usize) -> Self {
        self.block_size = block_size;
        self
    }
}

/// A buffer in host memory or a candle tensor on a device.
#[derive(Clone, Debug)]
pub enum Buffer {
    Host(HostBytes),
    Device(Tensor),
}

/// Per-block scales in the form kernels consume.
#[derive(Clone, Debug)]
pub enum BlockScales {
    /// One byte per block, decoded through `table` (NVFP4 E4M3 x tensor scale, MXFP4 E8M0).
    Table {
        bytes: Buffer,
        table: Arc<[f32; 256]>,
    },
    /// One f32 per block (bitsandbytes absmax).
    F32 {
        host: Option<Arc<Vec<f32>>>,
        device: Option<Tensor>,
    },
}

/// What a checkpoint needs to reproduce the original storage exactly (bitsandbytes nesting).
#[derive(Clone, Debug)]
enum Provenance {
    None,
    Nested(Arc<NestedAbsmax>),
}

struct Inner {
    format: Format,
    block_size: usize,
    shape: Shape,
    codes: Buffer,
    scales: BlockScales,
    /// NVFP4 tensor scale (`weight_scale_2`); 1.0 for other formats.
    scale2: f32,
    /// Largest finite block scale (table value or absmax); GPU kernels with f16 operands factor
    /// a power of two out of the scales with it.
    scale_max: f32,
    /// Scales that kernels may decode by arithmetic (see [`ExactScales`]).
    exact_scales: Option<ExactScales>,
    provenance: Provenance,
    device: Device,
}

/// A quantized tensor. Cheap to clone (shared storage).
#[derive(Clone)]
pub struct QTensor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QTensor({}, block {}, shape {:?}, {:?})",
            self.inner.format, self.inner.block_size, self.inner.shape, self.inner.device
        )
    }
}

/// Host-side view of a QTensor's storage handed to CPU kernels.
pub struct HostView<'a> {
    pub format: Format,
    pub block_size: usize,
    pub rows: usize,
    pub cols: usize,
    pub codes: &'a [u8],
    pub scales: HostScales<'a>,
    /// NVFP4 tensor scale (1.0 for other formats); already folded into the scale table.
    pub scale2: f32,
    /// Block scales a kernel may decode by arithmetic, exactly as the table (verified when the
    /// tensor was built; `None` where not, or not checked).
    pub exact_scales: Option<ExactScales>,
    /// Decode a bitsandbytes codebook (NF4, FP4) rounded to int8
    /// ([`crate::kernels::cpu::Int8Codebook`]), as W4A8 multiplies it; E2M1 codebooks are
    /// integers times 1/2 already and ignore this.
    pub int8_codebook: bool,
}

impl HostView<'_> {
    /// This view with [`HostView::int8_codebook`] set: what every CPU kernel reading it
    /// multiplies in W4A8 mode.
    pub fn with_int8_codebook(mut self) -> Self {
        self.int8_codebook = true;
        self
    }
}

/// What a tensor's byte scales are, checked against its table once when the tensor is built,
/// for kernels that decode scales by arithmetic instead of table lookups.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExactScales {
    /// Every table entry is `e4m3(b) * s2` bit for bit (NaN for NaN), and no block uses a NaN
    /// byte (0x7f, 0xff).
    E4m3 { s2: f32 },
    /// Every table entry is `2^(b - 127)`, and no block uses 0x00 (2^-127, an f32 subnormal) or
    /// 0xff (NaN).
    E8m0,
}

impl ExactScales {
    /// From a table and the bytes its blocks use (`seen[b]`).
    fn of(table: &[f32; 256], seen: &[bool; 256]) -> Option<ExactScales> {
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let s2 = table[0x38]; // E4M3 0x38 is 1.0
        let table_is = |f: &dyn Fn(u8) -> f32| (0..=255u8).all(|b| same(table[b as usize], f(b)));
        if table_is(&|b| scalar::e4m3::decode(b) * s2) && !seen[0x7f] && !seen[0xff] {
            Some(ExactScales::E4m3 { s2 })
        } else if table_is(&scalar::e8m0::decode) && !seen[0] && !seen[0xff] {
            Some(ExactScales::E8m0)
        } else {
            None
        }
    }
}

/// Host-side block scales.
pub enum HostScales<'a> {
    Table {
        bytes: &'a [u8],
        table: &'a [f32; 256],
    },
    F32(&'a [f32]),
}

fn rows_cols(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    let cols = *dims
        .last()
        .ok_or_else(|| Error::msg("a quantized tensor needs at least one dimension"))?;
    Ok((dims[..dims.len() - 1].iter().product(), cols))
}

/// Reads a dense tensor's elements as a host vector of `T`.
fn host_values<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<T>()?)
}

/// Waits until everything queued on `device` (the copies or kernels that wrote a new QTensor's
/// storage) has completed. A QTensor's storage is immutable once built, so kernels may then read
/// it ahead of their stream order (the GEMV, launched early, loads weights before it waits for
/// the kernel before it).
fn settle(device: &Device) -> Result<()> {
    if !device.is_cpu() {
        device.synchronize()?;
    }
    Ok(())
}

impl QTensor {
    /// Quantizes a dense tensor (f32, bf16 or f16; other dtypes are converted to f32 first).
    pub fn quantize(t: &Tensor, spec: &QuantSpec) -> Result<QTensor> {
        #[cfg(feature = "cuda")]
        if t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return crate::kernels::cuda::quant::quantize(t, spec);
        }
        let shape = t.shape().clone();
        let (_, cols) = rows_cols(&shape)?;
        let device = t.device().clone();
        match t.dtype() {
            DType::BF16 => {
                Self::quantize_values(&host_values::<bf16>(t)?, shape, cols, spec, &device)
            }
            DType::F16 => {
                Self::quantize_values(&host_values::<f16>(t)?, shape, cols, spec, &device)
            }
            DType::F32 => {
                Self::quantize_values(&host_values::<f32>(t)?, shape, cols, spec, &device)
            }
            DType::F64 => Self::quantize_values(
                &host_values::<f32>(&t.to_dtype(DType::F32)?)?,
                shape,
                cols,
                spec,
                &device,
            ),
            other => Err(Error::msg(format!(
                "cannot quantize a tensor of dtype {other:?}; expected f32, bf16 or f16"
            ))),
        }
    }

    fn quantize_values<T: Element>(
        v: &[T],
        shape: Shape,
        cols: usize,
        spec: &QuantSpec,
        device: &Device,
    ) -> Result<QTensor> {
        let q = match spec.format {
            Format::Nvfp4 => {
                check_fixed_block(spec, nvfp4::BLOCK)?;
                let opts = Nvfp4Options {
                    scale2: spec.scale2,
                    pad: spec.pad,
                    non_finite: spec.non_finite,
                };
                Self::from_nvfp4(nvfp4::quantize(v, cols, &opts)?, shape, &Device::Cpu)?
            }
            Format::Mxfp4 => {
                check_fixed_block(spec, mxfp4::BLOCK)?;
                let opts = Mxfp4Options {
                    rule: spec.mx_rule,
                    pad: spec.pad,
                    non_finite: spec.non_finite,
                };
                Self::from_mxfp4(mxfp4::quantize(v, cols, &opts)?, shape, &Device::Cpu)?
            }
            Format::Nf4 | Format::Fp4 => {
                let kind = if spec.format == Format::Nf4 {
                    BnbKind::Nf4
                } else {
                    BnbKind::Fp4
                };
                let opts = BnbOptions {
                    kind,
                    block_size: spec.block_size,
                    double_quant: spec.double_quant,
                    nested_rounding: NestedRounding::Exact,
                    non_finite: spec.non_finite,
                };
                Self::from_bnb(bnb::quantize(v, &opts)?, shape, &Device::Cpu)?
            }
        };
        q.to_device(device)
    }

    /// Wraps an NVFP4 tensor (`shape`'s last dimension is the logical column count).
    pub fn from_nvfp4(t: Nvfp4Tensor, shape: impl Into<Shape>, device: &Device) -> Result<QTensor> {
        let shape = shape.into();
        check_rows_cols(&shape, t.rows, t.cols)?;
        t.validate()?;
        let table = Arc::new(nvfp4::scale_table(t.scale2));
        Self::from_host_parts(
            Format::Nvfp4,
            nvfp4::BLOCK,
            shape,
            HostBytes::owned(t.packed),
            BlockScales::Table {
                bytes: Buffer::Host(HostBytes::owned(t.scales)),
                table,
            },
            t.scale2,
            device,
        )
    }

    /// Wraps an MXFP4 tensor.
    pub fn from_mxfp4(t: Mxfp4Tensor, shape: impl Into<Shape>, device: &Device) -> Result<QTensor> {
        let shape = shape.into();
        check_rows_cols(&shape, t.rows, t.cols)?;
        t.validate()?;
        Self::from_host_parts(
            Format::Mxfp4,
            mxfp4::BLOCK,
            shape,
            HostBytes::owned(t.packed),
            BlockScales::Table {
                bytes: Buffer::Host(HostBytes::owned(t.scales)),
                table: Arc::new(mxfp4::scale_table()),
            },
            1.0,
            device,
        )
    }

    /// Wraps a bitsandbytes tensor (nested statistics are expanded to f32 for the kernels and
    /// kept for saving).
    pub fn from_bnb(t: BnbTensor, shape: impl Into<Shape>, device: &Device) -> Result<QTensor> {
        let shape: Shape = shape.into();
        if shape.elem_count() != t.numel {
            return Err(Error::msg(format!(
                "shape {shape:?} has {} elements but the 4-bit data holds {}",
                shape.elem_count(),
                t.numel
            )));
        }
        t.validate()?;
        let format = if t.kind == BnbKind::Nf4 {
            Format::Nf4
        } else {
            Format::Fp4
        };
        let absmax = t.absmax.to_f32()?;
        let provenance = match t.absmax {
            Absmax::Nested(n) => Provenance::Nested(Arc::new(n)),
            Absmax::Plain(_) => Provenance::None,
        };
        let mut q = Self::from_host_parts(
            format,
            t.block_size,
            shape,
            HostBytes::owned(t.packed),
            BlockScales::F32 {
                host: Some(Arc::new(absmax)),
                device: None,
            },
            1.0,
            &Device::Cpu,
        )?;
        Arc::get_mut(&mut q.inner).expect("fresh").provenance = provenance;
        q.to_device(device)
    }

    /// Builds a QTensor from host parts without copying them (the bytes may be a view of a
    /// memory-mapped checkpoint). Lengths are validated against the shape.
    pub fn from_host_parts(
        format: Format,
        block_size: usize,
        shape: Shape,
        codes: HostBytes,
        scales: BlockScales,
        scale2: f32,
        device: &Device,
    ) -> Result<QTensor> {
        let (rows, cols) = rows_cols(&shape)?;
        let (code_len, n_scales) = storage_lengths(format, block_size, rows, cols);
        if codes.len() != code_len {
            return Err(Error::msg(format!(
                "{format} codes for shape {shape:?} need {code_len} bytes, found {}",
                codes.len()
            )));
        }
        let found = match &scales {
            BlockScales::Table {
                bytes: Buffer::Host(b),
                ..
            } => b.len(),
            BlockScales::F32 { host: Some(v), .. } => v.len(),
            _ => return Err(Error::msg("from_host_parts takes host scales")),
        };
        if found != n_scales {
            return Err(Error::msg(format!(
                "{format} scales for shape {shape:?}: expected {n_scales}, found {found}"
            )));
        }
        let (scale_max, exact_scales) = scale_stats(&scales)?;
        let q = QTensor {
            inner: Arc::new(Inner {
                format,
                block_size,
                shape,
                codes: Buffer::Host(codes),
                scales,
                scale2,
                scale_max,
                exact_scales,
                provenance: Provenance::None,
                device: Device::Cpu,
            }),
        };
        q.to_device(device)
    }

    /// Builds a QTensor from parts already on a device (made by the device quantizers):
    /// `codes` (U8) and device scales; `nested` keeps bitsandbytes double-quantized statistics
    /// for saving. Lengths are validated against the shape.
    pub fn from_device_parts(
        format: Format,
        block_size: usize,
        shape: Shape,
        codes: Tensor,
        scales: BlockScales,
        scale2: f32,
        nested: Option<NestedAbsmax>,
    ) -> Result<QTensor> {
        let (rows, cols) = rows_cols(&shape)?;
        let (code_len, n_scales) = storage_lengths(format, block_size, rows, cols);
        let found = match &scales {
            BlockScales::Table {
                bytes: Buffer::Device(b),
                ..
            } => b.elem_count(),
            BlockScales::F32 {
                device: Some(t), ..
            } => t.elem_count(),
            _ => return Err(Error::msg("from_device_parts takes device scales")),
        };
        if codes.elem_count() != code_len || found != n_scales {
            return Err(Error::msg(format!(
                "{format} storage for shape {shape:?} needs {code_len} code bytes and {n_scales} \
                 scales, found {} and {found}",
                codes.elem_count()
            )));
        }
        let device = codes.device().clone();
        let (scale_max, exact_scales) = scale_stats(&scales)?;
        settle(&device)?;
        Ok(QTensor {
            inner: Arc::new(Inner {
                format,
                block_size,
                shape,
                codes: Buffer::Device(codes),
                scales,
                scale2,
                scale_max,
                exact_scales,
                provenance: match nested {
                    Some(n) => Provenance::Nested(Arc::new(n)),
                    None => Provenance::None,
                },
                device,
            }),
        })
    }

    /// Copies the storage to `device` (no-op when already there).
    pub fn to_device(&self, device: &Device) -> Result<QTensor> {
        if self.inner.device.same_device(device) {
            return Ok(self.clone());
        }
        let move_buf = |b: &Buffer| -> Result<Buffer> {
            Ok(match (b, device) {
                (Buffer::Host(h), Device::Cpu) => Buffer::Host(h.clone()),
                (Buffer::Host(h), d) => Buffer::Device(Tensor::from_slice(h, h.len(), d)?),
                (Buffer::Device(t), Device::Cpu) => {
                    Buffer::Host(HostBytes::owned(t.to_vec1::<u8>()?))
                }
                (Buffer::Device(t), d) => Buffer::Device(t.to_device(d)?),
            })
        };
        let scales = match &self.inner.scales {
            BlockScales::Table { bytes, table } => BlockScales::Table {
                bytes: move_buf(bytes)?,
                table: table.clone(),
            },
            BlockScales::F32 { host, device: dev } => {
                let host_vec = match (host, dev) {
                    (Some(h), _) => h.clone(),
                    (None, Some(t)) => Arc::new(t.to_vec1::<f32>()?),
                    (None, None) => return Err(Error::msg("QTensor without scales")),
                };
                match device {
                    Device::Cpu => BlockScales::F32 {
                        host: Some(host_vec),
                        device: None,
                    },
                    d => BlockScales::F32 {
                        device: Some(Tensor::from_slice(&host_vec, host_vec.len(), d)?),
                        host: None,
                    },
                }
            }
        };
        let codes = move_buf(&self.inner.codes)?;
        settle(device)?;
        Ok(QTensor {
            inner: Arc::new(Inner {
                format: self.inner.format,
                block_size: self.inner.block_size,
                shape: self.inner.shape.clone(),
                codes,
                scales,
                scale2: self.inner.scale2,
                scale_max: self.inner.scale_max,
                exact_scales: self.inner.exact_scales,
                provenance: self.inner.provenance.clone(),
                device: device.clone(),
            }),
        })
    }

    pub fn format(&self) -> Format {
        self.inner.format
    }
    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }
    pub fn shape(&self) -> &Shape {
        &self.inner.shape
    }
    pub fn device(&self) -> &Device {
        &self.inner.device
    }
    /// NVFP4 tensor scale (1.0 for other formats).
    pub fn scale2(&self) -> f32 {
        self.inner.scale2
    }
    /// Largest finite block scale (a table value or an absmax).
    pub fn scale_max(&self) -> f32 {
        self.inner.scale_max
    }
    /// `(rows, cols)`: all leading dimensions folded into rows.
    pub fn rows_cols(&self) -> (usize, usize) {
        rows_cols(&self.inner.shape).expect("validated at construction")
    }
    /// Raw storage (codes and scales).
    pub fn buffers(&self) -> (&Buffer, &BlockScales) {
        (&self.inner.codes, &self.inner.scales)
    }

    /// Bytes of storage (codes + scales as stored).
    pub fn storage_bytes(&self) -> usize {
        let (rows, cols) = self.rows_cols();
        let (code_len, n_scales) =
            storage_lengths(self.inner.format, self.inner.block_size, rows, cols);
        let scale_bytes = match (&self.inner.scales, &self.inner.provenance) {
            (BlockScales::Table { .. }, _) => n_scales,
            (BlockScales::F32 { .. }, Provenance::Nested(n)) => {
                n.codes.len() + 4 * n.nested_absmax.len() + 4
            }
            (BlockScales::F32 { .. }, Provenance::None) => 4 * n_scales,
        };
        code_len + scale_bytes
    }

    /// Host view for CPU kernels; `None` unless the storage is in host memory.
    pub fn host_view(&self) -> Option<HostView<'_>> {
        let Buffer::Host(codes) = &self.inner.codes else {
            return None;
        };
        let scales = match &self.inner.scales {
            BlockScales::Table {
                bytes: Buffer::Host(b),
                table,
            } => HostScales::Table { bytes: b, table },
            BlockScales::F32 { host: Some(v), .. } => HostScales::F32(v),
            _ => return None,
        };
        let (rows, cols) = self.rows_cols();
        Some(HostView {
            format: self.inner.format,
            block_size: self.inner.block_size,
            rows,
            cols,
            codes,
            scales,
            scale2: self.inner.scale2,
            exact_scales: self.inner.exact_scales,
            int8_codebook: false,
        })
    }

    /// Back to the q4-formats representation (host copy), e.g. to save it.
    pub fn to_formats(&self) -> Result<Quantized> {
        let host = self.to_device(&Device::Cpu)?;
        let view = host.host_view().expect("host tensor");
        let (rows, cols) = (view.rows, view.cols);
        Ok(match (view.format, view.scales) {
            (Format::Nvfp4, HostScales::Table { bytes, .. }) => Quantized::Nvfp4(Nvfp4Tensor {
                rows,
                cols,
                packed: view.codes.to_vec(),
                scales: bytes.to_vec(),
                scale2: self.inner.scale2,
            }),
            (Format::Mxfp4, HostScales::Table { bytes, .. }) => Quantized::Mxfp4(Mxfp4Tensor {
                rows,
                cols,
                packed: view.codes.to_vec(),
                scales: bytes.to_vec(),
            }),
            (f @ (Format::Nf4 | Format::Fp4), HostScales::F32(am)) => {
                let absmax = match &self.inner.provenance {
                    Provenance::Nested(n) => Absmax::Nested((**n).clone()),
                    Provenance::None => Absmax::Plain(am.to_vec()),
                };
                Quantized::Bnb(BnbTensor {
                    kind: if f == Format::Nf4 {
                        BnbKind::Nf4
                    } else {
                        BnbKind::Fp4
                    },
                    block_size: view.block_size,
                    numel: rows * cols,
                    packed: view.codes.to_vec(),
                    absmax,
                })
            }
            _ => unreachable!("scale kind matches the format"),
        })
    }

    /// Stacks tensors of the same format, block size and column count along rows, so that
    /// layers reading the same input (q/k/v, gate/up) run as one matmul. NVFP4 parts must share
    /// their tensor scale (ModelOpt exports fused groups that way); bitsandbytes parts must hold
    /// whole blocks per row. No values change.
    pub fn concat_rows(parts: &[QTensor]) -> Result<QTensor> {
        let first = parts
            .first()
            .ok_or_else(|| Error::msg("concat_rows needs at least one tensor"))?;
        let (format, block) = (first.format(), first.block_size());
        let cols = first.rows_cols().1;
        let mut rows = 0;
        for p in parts {
            let (r, c) = p.rows_cols();
            if p.format() != format || p.block_size() != block || c != cols {
                return Err(Error::msg(format!(
                    "cannot stack {} (block {}, {c} columns) onto {format} (block {block}, {cols} columns)",
                    p.format(),
                    p.block_size()
                )));
            }
            if format == Format::Nvfp4 && p.scale2().to_bits() != first.scale2().to_bits() {
                return Err(Error::msg(format!(
                    "NVFP4 tensors with different tensor scales ({} vs {}) cannot share one scale table",
                    p.scale2(),
                    first.scale2()
                )));
            }
            if matches!(format, Format::Nf4 | Format::Fp4) && cols % block != 0 {
                return Err(Error::msg(format!(
                    "bitsandbytes blocks of {block} straddle rows of {cols}; cannot stack"
                )));
            }
            rows += r;
        }
        let hosts: Vec<QTensor> = parts
            .iter()
            .map(|p| p.to_device(&Device::Cpu))
            .collect::<Result<_>>()?;
        let views: Vec<HostView<'_>> = hosts
            .iter()
            .map(|h| h.host_view().expect("host tensor"))
            .collect();
        let codes: Vec<u8> = views.iter().flat_map(|v| v.codes.iter().copied()).collect();
        let scales = match &first.inner.scales {
            BlockScales::Table { table, .. } => {
                let bytes: Vec<u8> = views
                    .iter()
                    .flat_map(|v| match v.scales {
                        HostScales::Table { bytes, .. } => bytes.to_vec(),
                        HostScales::F32(_) => unreachable!("same format, same scale kind"),
                    })
                    .collect();
                BlockScales::Table {
                    bytes: Buffer::Host(HostBytes::owned(bytes)),
                    table: table.clone(),
                }
            }
            BlockScales::F32 { .. } => {
                let v: Vec<f32> = views
                    .iter()
                    .flat_map(|v| match v.scales {
                        HostScales::F32(f) => f.to_vec(),
                        HostScales::Table { .. } => unreachable!("same format, same scale kind"),
                    })
                    .collect();
                BlockScales::F32 {
                    host: Some(Arc::new(v)),
                    device: None,
                }
            }
        };
        Self::from_host_parts(
            format,
            block,
            Shape::from((rows, cols)),
            HostBytes::owned(codes),
            scales,
            first.scale2(),
            first.device(),
        )
    }

    /// Rows `ids` of a 2-D tensor, decoded to f32 (`[ids.len(), cols]`, on the tensor's device):
    /// an embedding lookup that never decodes the rest of the table.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (rows, cols) = self.rows_cols();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(Error::msg(format!(
                "row {bad} is outside the {rows} rows of this tensor"
            )));
        }
        let host = self.to_device(&Device::Cpu)?;
        let view = host.host_view().expect("host tensor");
        let r = crate::kernels::cpu::Rows::new(&view);
        let mut out = vec![0f32; ids.len() * cols];
        for (o, &i) in out.chunks_exact_mut(cols).zip(ids) {
            r.decode_row(i as usize, o);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), self.device())?)
    }

    /// Dense copy on the same device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.inner.device.is_cuda() {
            return crate::kernels::cuda::dequant::dequantize(self, dtype);
        }
        self.dequantize_on_host(dtype, false)
    }

    /// The values W4A8 multiplies ([`crate::ActQuant::Int8`]): [`QTensor::dequantize`], with a
    /// bitsandbytes codebook rounded to int8 ([`crate::kernels::cpu::Int8Codebook`], decoded on
    /// the host).
    pub fn dequantize_w4a8(&self, dtype: DType) -> Result<Tensor> {
        if crate::kernels::cpu::int8_codebook(self.inner.format).is_none() {
            return self.dequantize(dtype);
        }
        self.dequantize_on_host(dtype, true)
    }

    /// Decodes a host copy (with the int8 codebook where asked), back on this tensor's device.
    fn dequantize_on_host(&self, dtype: DType, int8_codebook: bool) -> Result<Tensor> {
        let host = self.to_device(&Device::Cpu)?;
        let mut view = host.host_view().expect("host tensor");
        if int8_codebook {
            view = view.with_int8_codebook();
        }
        let n = view.rows * view.cols;
        let mut out = vec![0f32; n];
        crate::kernels::cpu::dequantize_into(&view, &mut out);
        let t = Tensor::from_vec(out, self.inner.shape.clone(), &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(&self.inner.device)?)
    }
}

/// A quantized tensor in q4-formats' owned representation.
#[derive(Clone, Debug)]
pub enum Quantized {
    Nvfp4(Nvfp4Tensor),
    Bnb(BnbTensor),
    Mxfp4(Mxfp4Tensor),
}

/// Largest finite block scale, from host or device scales (a table format counts the table
/// values of the bytes it uses), and what its byte scales are ([`ExactScales`]; f32 scales none).
fn scale_stats(scales: &BlockScales) -> Result<(f32, Option<ExactScales>)> {
    let max_finite = |v: &mut dyn Iterator<Item = f32>| {
        v.filter(|x| x.is_finite())
            .fold(0f32, |m, x| m.max(x.abs()))
    };
    Ok(match scales {
        BlockScales::Table { bytes, table } => {
            let mut seen = [false; 256];
            match bytes {
                Buffer::Host(b) => b.iter().for_each(|&x| seen[x as usize] = true),
                Buffer::Device(t) => t
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<u8>()?
                    .into_iter()
                    .for_each(|x| seen[x as usize] = true),
            }
            (
                max_finite(&mut (0..256).filter(|&b| seen[b]).map(|b| table[b])),
                ExactScales::of(table, &seen),
            )
        }
        BlockScales::F32 { host: Some(v), .. } => (max_finite(&mut v.iter().copied()), None),
        BlockScales::F32 {
            device: Some(t), ..
        } => (
            max_finite(
                &mut t
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter(),
            ),
            None,
        ),
        BlockScales::F32 { .. } => return Err(Error::msg("QTensor without scales")),
    })
}

fn check_fixed_block(spec: &QuantSpec, block: usize) -> Result<()> {
    if spec.block_size != block {
        return Err(Error::msg(format!(
            "{} uses blocks of {block}; block size {} is not supported",
            spec.format, spec.block_size
        )));
    }
    Ok(())
}

fn check_rows_cols(shape: &Shape, rows: usize, cols: usize) -> Result<()> {
    let (r, c) = rows_cols(shape)?;
    if (r, c) != (rows, cols) {
        return Err(Error::msg(format!(
            "shape {shape:?} does not match {rows} rows of {cols} columns"
        )));
    }
    Ok(())
}

/// `(code bytes, number of block scales)` of a format's storage for `rows x cols`.
pub fn storage_lengths(format: Format, block: usize, rows: usize, cols: usize) -> (usize, usize) {
    match format {
        Format::Nvfp4 | Format::Mxfp4 => {
            let pc = cols.div_ceil(block) * block;
            (rows * pc / 2, rows * pc / block)
        }
        Format::Nf4 | Format::Fp4 => {
            let n = rows * cols;
            (n.div_ceil(2), n.div_ceil(block))
        }
    }
}
