//! `QLinear`: `y = x Wᵀ (+ b)` over a dense or 4-bit weight, usable as a `candle_nn::Module`.

use candle_core::{CpuStorage, DType, Layout, Module, Shape, Tensor};

use crate::error::{Error, Result};
use crate::kernels::cpu::w4a8::{round_trip_in_place, ACT_BLOCK};
use crate::qtensor::{QTensor, QuantSpec};
use crate::Format;

/// The weight of a linear layer, `[out_features, in_features]`.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    Dense(Tensor),
    Quant(QTensor),
}

/// Activation quantization (NVFP4 "W4A4", the semantics of Blackwell's block-scaled matmul).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum ActQuant {
    /// Weight-only (W4A16): activations stay in their dtype.
    #[default]
    None,
    /// Activations quantized to NVFP4 with a calibrated tensor scale (`input_scale`).
    Nvfp4Static { input_scale: f32 },
    /// Activations quantized to NVFP4 with the tensor scale `amax(x) / 2688` of each call.
    Nvfp4Dynamic,
    /// W4A8: activations quantized to int8 per 32 values with an f32 scale (`amax / 127`), as
    /// llama.cpp's quantized matmuls do, and multiplied in integers (BENCHMARKS.md). The result
    /// is the weight-only product with the activations replaced by their int8 round trip; for
    /// E2M1 weights (NVFP4, MXFP4, integers times 1/2) the weights are exact, bitsandbytes
    /// codebooks (NF4, FP4) are rounded to int8 (`Int8Codebook`: multiples of 1/112.03 for
    /// NF4, 1/120 for FP4, each value within half a step of its block's absmax, about the int8
    /// activations' own bound). On the CPU only for bitsandbytes weights.
    Int8,
}

/// A linear layer whose weight may be 4-bit.
#[derive(Clone, Debug)]
pub struct QLinear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    act: ActQuant,
    out_features: usize,
    in_features: usize,
}

impl QLinear {
    /// A dense layer (`weight` is `[out, in]`).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        check_bias(&bias, out_features)?;
        Ok(QLinear {
            weight: LinearWeight::Dense(weight),
            bias,
            act: ActQuant::None,
            out_features,
            in_features,
        })
    }

    /// A layer over a 4-bit weight of shape `[out, in]`.
    pub fn new(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let dims = weight.shape().dims().to_vec();
        if dims.len() != 2 {
            return Err(Error::msg(format!(
                "a linear weight must be 2-D [out, in], got shape {dims:?}"
            )));
        }
        check_bias(&bias, dims[0])?;
        Ok(QLinear {
            weight: LinearWeight::Quant(weight),
            bias,
            act: ActQuant::None,
            out_features: dims[0],
            in_features: dims[1],
        })
    }

    /// Quantizes a dense weight with `spec`, or keeps it dense when `spec` is `None`.
    pub fn from_dense(
        weight: &Tensor,
        bias: Option<Tensor>,
        spec: Option<&QuantSpec>,
    ) -> Result<Self> {
        match spec {
            None => Self::dense(weight.clone(), bias),
            Some(spec) => Self::new(QTensor::quantize(weight, spec)?, bias),
        }
    }

    /// Selects activation quantization: the NVFP4 modes need an NVFP4 weight, `Int8` a 4-bit
    /// weight whose input width is a multiple of 32.
    pub fn with_act_quant(mut self, act: ActQuant) -> Result<Self> {
        let (what, need, formats): (&str, &str, &[Format]) = match act {
            ActQuant::None => {
                self.act = act;
                return Ok(self);
            }
            ActQuant::Int8 => (
                "int8 activation quantization (W4A8)",
                "a 4-bit weight",
                &Format::ALL,
            ),
            _ => (
                "W4A4 activation quantization",
                "an NVFP4 weight",
                &[Format::Nvfp4],
            ),
        };
        match &self.weight {
            LinearWeight::Quant(q) if formats.contains(&q.format()) => {}
            LinearWeight::Quant(q) => {
                return Err(Error::msg(format!(
                    "{what} needs {need}, this one is {}",
                    q.format()
                )))
            }
            LinearWeight::Dense(_) => {
                return Err(Error::msg(format!(
                    "{what} needs {need}, this one is dense"
                )))
            }
        }
        if act == ActQuant::Int8 && !self.in_features.is_multiple_of(ACT_BLOCK) {
            return Err(Error::msg(format!(
                "{what} needs an input width that is a multiple of {ACT_BLOCK}, this layer has {}",
                self.in_features
            )));
        }
        self.act = act;
        Ok(self)
    }

    /// One layer computing several layers that read the same input, their outputs
    /// concatenated along the last dimension in the order given.
    /// Weights are stacked without changing any value; missing biases count as zero.
    pub fn fuse(layers: &[QLinear]) -> Result<QLinear> {
        let first = layers
            .first()
            .ok_or_else(|| Error::msg("fuse needs at least one layer"))?;
        if layers
            .iter()
            .any(|l| l.in_features != first.in_features || l.act != first.act)
        {
            return Err(Error::msg(
                "fused layers must share their input width and activation mode",
            ));
        }
        let weight = match &first.weight {
            LinearWeight::Dense(_) => {
                let ws = layers
                    .iter()
                    .map(|l| match &l.weight {
                        LinearWeight::Dense(w) => Ok(w.clone()),
                        LinearWeight::Quant(_) => {
                            Err(Error::msg("cannot fuse dense and quantized layers"))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                LinearWeight::Dense(Tensor::cat(&ws, 0)?)
            }
            LinearWeight::Quant(_) => {
                let qs = layers
                    .iter()
                    .map(|l| match &l.weight {
                        LinearWeight::Quant(q) => Ok(q.clone()),
                        LinearWeight::Dense(_) => {
                            Err(Error::msg("cannot fuse dense and quantized layers"))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                LinearWeight::Quant(QTensor::concat_rows(&qs)?)
            }
        };
        let bias = if layers.iter().any(|l| l.bias.is_some()) {
            let parts = layers
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.to_dtype(DType::F32)?),
                    None => Ok(Tensor::zeros(l.out_features, DType::F32, first.device())?),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        let out_features = layers.iter().map(|l| l.out_features).sum();
        Ok(QLinear {
            weight,
            bias,
            act: first.act,
            out_features,
            in_features: first.in_features,
        })
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &candle_core::Device {
        match &self.weight {
            LinearWeight::Dense(w) => w.device(),
            LinearWeight::Quant(q) => q.device(),
        }
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn act_quant(&self) -> ActQuant {
        self.act
    }
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Checks the input before any kernel runs.
    fn check_input(&self, x: &Tensor) -> Result<()> {
        let k = x.dims().last().copied().unwrap_or(0);
        if x.rank() == 0 || k != self.in_features {
            return Err(Error::msg(format!(
                "linear layer expects inputs [..., {}], got shape {:?}",
                self.in_features,
                x.dims()
            )));
        }
        match x.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => Ok(()),
            other => Err(Error::msg(format!(
                "linear layer activations must be f32, bf16 or f16, got {other:?}"
            ))),
        }
    }

    /// The reference computation: dequantize, then a dense matmul.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(x.dtype())?,
            // W4A8's bitsandbytes weights are their int8-rounded codebook.
            LinearWeight::Quant(q) if self.act == ActQuant::Int8 => q.dequantize_w4a8(x.dtype())?,
            LinearWeight::Quant(q) => q.dequantize(x.dtype())?,
        };
        let x = match self.act {
            ActQuant::None => x.clone(),
            ActQuant::Int8 => fake_quantize_int8(x)?,
            act => {
                crate::kernels::cpu::w4a4::fake_quantize_activations(&x.to_dtype(DType::F32)?, act)?
                    .to_dtype(x.dtype())?
            }
        };
        self.add_bias(x.broadcast_matmul(&w.t()?)?)
    }
}

/// The int8 round trip of activations `[..., k]` (k a multiple of 32) on any device, with the
/// arithmetic of `Int8Acts::quantize`: `d = amax / 127`, `q = round(x * (127 / amax))` (blocks
/// with amax below 2^-100 scaled by 2^64 first).
pub fn fake_quantize_int8(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let dtype = x.dtype();
    let xb = x
        .to_dtype(DType::F32)?
        .reshape(((), k / ACT_BLOCK, ACT_BLOCK))?;
    let amax = xb.abs()?.max_keepdim(candle_core::D::Minus1)?;
    let zero = amax.eq(0f64)?;
    // All-zero blocks quantize to 0 with scale 0 (divide by 1 instead of 0).
    let safe = zero.where_cond(&amax.ones_like()?, &amax)?;
    // Tiny blocks are scaled by 2^64 first, as on the CPU path (127 / amax would overflow).
    let ones = amax.ones_like()?;
    let pre = amax
        .lt(crate::kernels::cpu::w4a8::TINY_BLOCK as f64)?
        .where_cond(
            &(&ones * crate::kernels::cpu::w4a8::TINY_PRESCALE as f64)?,
            &ones,
        )?;
    let inv = ((safe.ones_like()? * 127.0)? / (&safe * &pre)?)?;
    let q = xb
        .broadcast_mul(&pre)?
        .broadcast_mul(&inv)?
        .round()?
        .clamp(-127f32, 127f32)?;
    // A zero block's codes are all 0, so its (nonzero) scale leaves it 0.
    let d = (&safe / (amax.ones_like()? * 127.0)?)?;
    Ok(q.broadcast_mul(&d)?.reshape(dims)?.to_dtype(dtype)?)
}

fn check_bias(bias: &Option<Tensor>, out: usize) -> Result<()> {
    if let Some(b) = bias {
        if b.dims() != [out] {
            return Err(Error::msg(format!(
                "bias must have shape [{out}], got {:?}",
                b.dims()
            )));
        }
    }
    Ok(())
}

impl QLinear {
    /// `y = x Wᵀ (+ b)` with the fused kernels; `x` is `[..., in_features]`.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let q = match &self.weight {
            LinearWeight::Dense(w)
                if w.dtype() == DType::BF16 && w.device().is_cpu() && x.device().is_cpu() =>
            {
                // candle's CPU bf16 matmul is slow; widen the weights in registers instead.
                let dims = x.dims().to_vec();
                let batch: usize = dims[..dims.len() - 1].iter().product();
                let xf = x
                    .reshape((batch, self.in_features))?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                let y = xf.apply_op1_no_bwd(&Bf16MatMul { weight: w.clone() })?;
                let mut out_dims = dims;
                *out_dims.last_mut().expect("rank >= 1") = self.out_features;
                // Bias added in f32, then one rounding to the activations' dtype.
                return Ok(self.add_bias(y.reshape(out_dims)?)?.to_dtype(x.dtype())?);
            }
            LinearWeight::Dense(w) => {
                let y = x.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)?;
                return self.add_bias(y);
            }
            LinearWeight::Quant(q) => q,
        };
        if !q.device().same_device(x.device()) {
            return Err(Error::msg(format!(
                "activations are on {:?} but the weight is on {:?}; move one of them explicitly",
                x.device(),
                q.device()
            )));
        }
        let dims = x.dims().to_vec();
        let batch: usize = dims[..dims.len() - 1].iter().product();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            // CUDA kernels take f32/bf16/f16 activations as they are and return that dtype.
            let x2 = x.reshape((batch, self.in_features))?.contiguous()?;
            let y = match self.act {
                // Through the custom op, so `QMatMul::cuda_fwd` serves every CUDA matmul.
                ActQuant::None => x2.apply_op1_no_bwd(&QMatMul { weight: q.clone() })?,
                ActQuant::Int8 if crate::kernels::cpu::int8_codebook(q.format()).is_some() => {
                    return Err(Error::msg(format!(
                        "W4A8 on a bitsandbytes codebook ({}) multiplies the codebook rounded to \
                         int8, which only the CPU kernels do: run this layer on the CPU, or \
                         without W4A8",
                        q.format()
                    )))
                }
                ActQuant::Int8 => {
                    fake_quantize_int8(&x2)?.apply_op1_no_bwd(&QMatMul { weight: q.clone() })?
                }
                act => crate::kernels::cuda::w4a4::matmul(q, &x2, act)?,
            };
            let mut out_dims = dims;
            *out_dims.last_mut().expect("rank >= 1") = self.out_features;
            return self.add_bias(y.reshape(out_dims)?);
        }
        let xf = x
            .reshape((batch, self.in_features))?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let y = match self.act {
            ActQuant::None => xf.apply_op1_no_bwd(&QMatMul { weight: q.clone() })?,
            ActQuant::Int8 => self.forward_int8(q, &xf)?,
            act => self.forward_w4a4(q, &xf, act)?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.out_features;
        // Bias added in f32, then one rounding to the activations' dtype: rounding the product
        // and the bias to bf16 first loses the result where they nearly cancel.
        Ok(self.add_bias(y.reshape(out_dims)?)?.to_dtype(x.dtype())?)
    }

    /// `out = x Wᵀ (+ b)` written into `out`, a contiguous tensor shaped as [`Self::forward`]'s
    /// result, of `x`'s dtype and device; `out`'s storage is overwritten in place (as by
    /// [`Tensor::slice_set`], which other views of it see). On CUDA the fused GEMV (batches up
    /// to 64, no bias, no activation quantization) writes it directly and allocates nothing,
    /// so that a captured CUDA graph keeps its kernels adjacent (each GEMV then starts while
    /// the kernel before it finishes); everything else computes [`Self::forward`] and copies.
    pub fn forward_into(&self, x: &Tensor, out: &Tensor) -> Result<()> {
        self.check_input(x)?;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_features;
        if out.dims() != out_dims.as_slice() || out.dtype() != x.dtype() || !out.is_contiguous() {
            return Err(Error::msg(format!(
                "linear layer output buffer must be a contiguous {out_dims:?} {:?} tensor, got \
                 {:?} {:?}",
                x.dtype(),
                out.dims(),
                out.dtype()
            )));
        }
        #[cfg(feature = "cuda")]
        if let (LinearWeight::Quant(q), true, None, ActQuant::None) =
            (&self.weight, x.device().is_cuda(), &self.bias, self.act)
        {
            let batch = x.elem_count() / self.in_features;
            let x2 = x.reshape((batch, self.in_features))?;
            let y2 = out.reshape((batch, self.out_features))?;
            if crate::kernels::cuda::matmul_into(q, &x2, &y2)? {
                return Ok(());
            }
        }
        let y = self.forward_fused(x)?;
        out.slice_set(&y, 0, 0)?;
        Ok(())
    }

    /// Exact W4A4 emulation (see `kernels::cpu::w4a4`); `x` is `[batch, k]` f32.
    fn forward_w4a4(&self, q: &QTensor, x: &Tensor, act: ActQuant) -> Result<Tensor> {
        use crate::kernels::cpu::w4a4;
        let host = q.to_device(&candle_core::Device::Cpu)?;
        let view = host.host_view().expect("host tensor");
        let (batch, k) = x.dims2()?;
        let xq = w4a4::quantize_activations(&x.flatten_all()?.to_vec1::<f32>()?, k, act)?;
        let mut y = vec![0f32; batch * self.out_features];
        w4a4::matmul_exact(&view, &xq, &mut y)?;
        Ok(Tensor::from_vec(y, (batch, self.out_features), x.device())?)
    }

    /// W4A8 on the CPU: int8 block sums where the kernel exists, else the f32 kernels over the
    /// dequantized activations (same product up to f32 rounding; bitsandbytes weights with
    /// their int8-rounded codebook in both).
    fn forward_int8(&self, q: &QTensor, x: &Tensor) -> Result<Tensor> {
        let view = q
            .host_view()
            .ok_or_else(|| Error::msg("weight is not in host memory"))?
            .with_int8_codebook();
        let (batch, k) = x.dims2()?;
        // The activations are read where they are (the caller made them contiguous f32 on the
        // CPU); only the fallback, which rounds them in place, copies.
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(Error::msg("W4A8 activations are not in host memory"));
        };
        let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..batch * k];
        let mut y = vec![0f32; batch * self.out_features];
        let rows = crate::kernels::cpu::Rows::new(&view);
        if !crate::kernels::cpu::w4a8::matmul(&rows, xs, batch, &mut y) {
            let mut xs = xs.to_vec();
            round_trip_in_place(&mut xs);
            crate::kernels::cpu::matmul(&view, &xs, batch, &mut y);
        }
        Ok(Tensor::from_vec(y, (batch, self.out_features), x.device())?)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// The fused matmul as a candle custom op on the (f32, contiguous) activations.
struct QMatMul {
    weight: QTensor,
}

impl candle_core::CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "q4-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4-matmul expects f32 activations")
        };
        let (batch, k) = layout.shape().dims2()?;
        let x = match layout.contiguous_offsets() {
            Some((start, end)) => &data[start..end],
            None => candle_core::bail!("q4-matmul expects contiguous activations"),
        };
        let view = self.weight.host_view().ok_or_else(|| {
            candle_core::Error::Msg("q4-matmul: weight is not in host memory".into())
        })?;
        debug_assert_eq!(k, view.cols);
        let n = view.rows;
        let mut y = vec![0f32; batch * n];
        crate::kernels::cpu::matmul(&view, x, batch, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((batch, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let act = crate::kernels::cuda::Act::from_storage(storage, layout)?;
        let n = self.weight.rows_cols().0;
        let y = crate::kernels::cuda::matmul_act(&self.weight, &act)?;
        Ok((y, Shape::from((act.batch, n))))
    }
}

/// A dense bf16 weight times f32 activations on the CPU.
struct Bf16MatMul {
    weight: Tensor,
}

impl candle_core::CustomOp1 for Bf16MatMul {
    fn name(&self) -> &'static str {
        "q4-bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4-bf16-matmul expects f32 activations")
        };
        let (batch, k) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4-bf16-matmul expects contiguous activations")
        };
        let (n, wk) = self.weight.dims2()?;
        debug_assert_eq!(k, wk);
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::BF16(w)) = &*w_storage else {
            candle_core::bail!("q4-bf16-matmul expects a bf16 CPU weight")
        };
        let Some((ws, we)) = w_layout.contiguous_offsets() else {
            candle_core::bail!("q4-bf16-matmul expects a contiguous weight")
        };
        let mut y = vec![0f32; batch * n];
        crate::kernels::cpu::dense::matmul_bf16(&w[ws..we], n, k, &data[start..end], batch, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((batch, n))))
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_fused(x)?)
    }
}
