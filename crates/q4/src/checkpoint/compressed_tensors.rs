//! compressed-tensors / llm-compressor NVFP4 ("nvfp4-pack-quantized", FORMATS.md §3.3): the
//! ModelOpt bytes under other names, with reciprocal global scales:
//! `P.weight_packed` U8 `[N, K/2]`, `P.weight_scale` F8_E4M3 `[N, K/16]`,
//! `P.weight_global_scale` F32 (= 1 / weight_scale_2), optional `P.input_global_scale`.

use std::sync::Arc;

use q4_formats::scalar::e4m3;
use q4_formats::{nvfp4, Format};
use safetensors::Dtype;

use super::detect::{bad, expect_dtype, scalar_f32, Pool};
use super::modelopt::e2m1_shape;
use super::view::{Layout, QuantView, ScaleData};
use crate::error::Result;

/// The module prefix of a `P.weight_packed` tensor.
pub(super) fn anchor(name: &str) -> Option<&str> {
    name.strip_suffix(".weight_packed")
}

pub(super) fn detect(pool: &mut Pool, prefix: &str) -> Result<QuantView> {
    let packed = pool
        .get(&format!("{prefix}.weight_packed"))
        .expect("anchor")
        .clone();
    let scale = pool.partner(
        &packed,
        &format!("{prefix}.weight_scale"),
        "NVFP4 block-scale",
    )?;
    let global = pool.partner(
        &packed,
        &format!("{prefix}.weight_global_scale"),
        "NVFP4 global-scale",
    )?;
    expect_dtype(&packed, &[Dtype::U8], "packed NVFP4 codes")?;
    expect_dtype(&scale, &[Dtype::F8_E4M3, Dtype::U8], "NVFP4 block scales")?;
    let gs = scalar_f32(&global, "NVFP4 global scale")?;
    if !(gs.is_finite() && gs > 0.0) {
        return Err(bad(&global, format!("invalid NVFP4 global scale {gs}")));
    }
    let name = format!("{prefix}.weight");
    let mut shape = e2m1_shape(pool, &name, &packed, &packed.shape, &scale, nvfp4::BLOCK)?;
    let mut members = vec![pool.claim(&packed), pool.claim(&scale), pool.claim(&global)];

    // Some compressors also store the dense shape.
    if let Some(ws) = pool.get(&format!("{prefix}.weight_shape")).cloned() {
        expect_dtype(&ws, &[Dtype::I64], "weight shape")?;
        let dims: Vec<i64> = bytemuck::pod_collect_to_vec(&ws.bytes);
        let dims: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
        let fits = dims.len() == shape.len()
            && dims[..dims.len() - 1] == shape[..shape.len() - 1]
            && dims.last().is_some_and(|&c| {
                c > 0 && nvfp4::padded_cols(c) == *shape.last().expect("rank >= 1")
            });
        if !fits {
            return Err(bad(
                &ws,
                format!("{dims:?} does not fit the packed shape {shape:?}"),
            ));
        }
        shape = dims;
        members.push(pool.claim(&ws));
    }
    let input_scale = match pool.get(&format!("{prefix}.input_global_scale")).cloned() {
        Some(t) => {
            let v = scalar_f32(&t, "NVFP4 input global scale")?;
            members.push(pool.claim(&t));
            Some(1.0 / v)
        }
        None => None,
    };
    // compressed-tensors divides the block scale by the global scale.
    let mut table = [0f32; 256];
    for (b, v) in table.iter_mut().enumerate() {
        *v = e4m3::decode(b as u8) / gs;
    }
    Ok(QuantView {
        name,
        file: packed.file.clone(),
        layout: Layout::CompressedTensors,
        format: Format::Nvfp4,
        shape,
        block_size: nvfp4::BLOCK,
        codes: packed.bytes.clone(),
        scales: ScaleData::Bytes {
            bytes: scale.bytes.clone(),
            table: Arc::new(table),
        },
        tensor_scale: Some(1.0 / gs),
        input_scale,
        source_dtype: None,
        members,
    })
}
