//! Exact emulation of NVFP4 W4A4 (the semantics of Blackwell's block-scaled FP4 matmul).
//!
//! Activations are quantized to NVFP4 with ModelOpt's arithmetic, using the calibrated
//! `input_scale` (static) or `amax(x) / 2688` of the call (dynamic) as their tensor scale. The
//! product is then what an ideal block-scaled tensor core computes:
//!
//! `y[m, n] = alpha * sum_b (sum_{i in b} ex_i * ew_i) * Sx_b * Sw_b`,  `alpha = s2x * s2w`,
//!
//! with `ex, ew` the E2M1 values and `Sx, Sw` the E4M3 block scales. Every term is an integer
//! multiple of 2^-20 below 2^48, so the sum is accumulated *exactly* in i64 and rounded once to
//! f32, then scaled by `alpha`. The result is therefore independent of summation order:
//! identical on every thread count, SIMD width and device.

use candle_core::{Device, Tensor};
use q4_formats::nvfp4::{self, Nvfp4Options, Nvfp4Tensor};
use q4_formats::scalar::e4m3;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::qlinear::ActQuant;
use crate::qtensor::{HostScales, HostView};

/// Twice the E2M1 value of each code, as an integer (code 8, "-0", is 0).
const E2M1_X2: [i32; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// E4M3 value times 2^9 as an integer (every finite E4M3 value is a multiple of 2^-9);
/// NaN bytes map to `None`.
fn e4m3_x512(b: u8) -> Option<i64> {
    let v = e4m3::decode(b);
    v.is_finite().then_some((v * 512.0) as i64)
}

/// The activation tensor scale for `x` under `act`.
pub fn activation_scale(x: &[f32], act: ActQuant) -> Result<f32> {
    match act {
        ActQuant::None => Err(Error::msg("activation quantization is off")),
        ActQuant::Int8 => Err(Error::msg(
            "int8 activations (W4A8) have no NVFP4 tensor scale",
        )),
        ActQuant::Nvfp4Static { input_scale } => {
            if !(input_scale.is_finite() && input_scale > 0.0) {
                return Err(Error::msg(format!(
                    "input_scale {input_scale} must be a positive finite number"
                )));
            }
            Ok(input_scale)
        }
        ActQuant::Nvfp4Dynamic => Ok(nvfp4::tensor_scale(nvfp4::amax(
            x,
            q4_formats::NonFinite::Reject,
        )?)),
    }
}

/// Quantizes activations `x` (`batch x k`) to NVFP4 with the scale `act` selects.
pub fn quantize_activations(x: &[f32], k: usize, act: ActQuant) -> Result<Nvfp4Tensor> {
    let s2 = activation_scale(x, act)?;
    Ok(nvfp4::quantize(
        x,
        k,
        &Nvfp4Options {
            scale2: Some(s2),
            pad: true,
            ..Default::default()
        },
    )?)
}

/// Quantize-dequantize of activations (`[batch, k]` f32), as the reference path uses it.
pub fn fake_quantize_activations(x: &Tensor, act: ActQuant) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let host = x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let q = quantize_activations(&host, k, act)?;
    let d: Vec<f32> = q.dequantize()?;
    Ok(Tensor::from_vec(d, x.shape().clone(), x.device())?)
}

/// `y[m, n]` of the exact W4A4 product for an NVFP4 weight `w` and quantized activations `xq`.
pub fn matmul_exact(w: &HostView<'_>, xq: &Nvfp4Tensor, y: &mut [f32]) -> Result<()> {
    let HostScales::Table {
        bytes: w_scales, ..
    } = w.scales
    else {
        return Err(Error::msg("W4A4 needs an NVFP4 weight"));
    };
    if xq.cols != w.cols {
        return Err(Error::msg(format!(
            "activations have {} features, the weight {}",
            xq.cols, w.cols
        )));
    }
    let (n, batch) = (w.rows, xq.rows);
    let blocks = w.cols.div_ceil(nvfp4::BLOCK);
    let row_bytes = blocks * nvfp4::BLOCK / 2;
    let alpha = xq.scale2 * w.scale2;
    // Activation codes widened once: [m][block][16] integers, block scales x 2^9.
    let x_codes: Vec<i32> = xq
        .packed
        .iter()
        .flat_map(|&b| [E2M1_X2[(b & 15) as usize], E2M1_X2[(b >> 4) as usize]])
        .collect();
    let x_scales: Vec<Option<i64>> = xq.scales.iter().map(|&b| e4m3_x512(b)).collect();
    let mut yt = vec![0f32; n * batch];
    yt.par_chunks_mut(batch).enumerate().for_each(|(row, out)| {
        let wc = &w.codes[row * row_bytes..(row + 1) * row_bytes];
        let ws = &w_scales[row * blocks..(row + 1) * blocks];
        let mut w_codes = [0i32; nvfp4::BLOCK];
        for (m, o) in out.iter_mut().enumerate() {
            let mut acc: i64 = 0;
            let mut nan = false;
            for b in 0..blocks {
                for (j, &byte) in wc[b * 8..(b + 1) * 8].iter().enumerate() {
                    w_codes[2 * j] = E2M1_X2[(byte & 15) as usize];
                    w_codes[2 * j + 1] = E2M1_X2[(byte >> 4) as usize];
                }
                let xb =
                    &x_codes[(m * blocks + b) * nvfp4::BLOCK..(m * blocks + b + 1) * nvfp4::BLOCK];
                let dot: i32 = xb.iter().zip(&w_codes).map(|(a, c)| a * c).sum();
                match (x_scales[m * blocks + b], e4m3_x512(ws[b])) {
                    (Some(sx), Some(sw)) => acc += dot as i64 * sx * sw,
                    _ => nan = true,
                }
            }
            // acc counts units of 2^-2 (E2M1 x2 squared) * 2^-18 (two E4M3 x 2^9) = 2^-20.
            *o = if nan {
                f32::NAN
            } else {
                (acc as f32) * (1.0 / (1u64 << 20) as f32) * alpha
            };
        }
    });
    super::transpose_into(&yt, n, batch, y);
    Ok(())
}
