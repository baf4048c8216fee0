//! ModelOpt NVFP4 (FORMATS.md §3.3), which is also q4's own NVFP4 naming:
//! `K` U8 `[.., N, K/2]`, `K_scale` F8_E4M3 `[.., N, K/16]`, `K_scale_2` F32 `[]`, and for
//! `P.weight` an optional activation scale `P.input_scale` F32 `[]`.

use std::sync::Arc;

use q4_formats::{nvfp4, Format};
use safetensors::Dtype;

use super::detect::{bad, expect_dtype, scalar_f32, Pool};
use super::safetensors_io::RawTensor;
use super::view::{Layout, QuantView, ScaleData};
use crate::error::Result;

/// The packed tensor a `*_scale_2` (or a `*_scale` next to a U8 tensor) belongs to.
pub(super) fn anchor<'a>(pool: &Pool, name: &'a str) -> Option<&'a str> {
    if let Some(base) = name.strip_suffix("_scale_2") {
        return Some(base);
    }
    let base = name.strip_suffix("_scale")?;
    match pool.get(base) {
        Some(t) if t.dtype == Dtype::U8 => Some(base),
        _ => None,
    }
}

pub(super) fn detect(pool: &mut Pool, base: &str) -> Result<QuantView> {
    let scale_name = format!("{base}_scale");
    let scale2_name = format!("{base}_scale_2");
    let Some(packed) = pool.get(base).cloned() else {
        let other = pool
            .get(&scale2_name)
            .or_else(|| pool.get(&scale_name))
            .expect("anchored on one of them")
            .clone();
        return Err(bad(
            &other,
            format!("missing packed NVFP4 weight tensor `{base}`"),
        ));
    };
    let scale = pool.partner(&packed, &scale_name, "NVFP4 block-scale")?;
    let scale2 = pool.partner(&packed, &scale2_name, "NVFP4 tensor-scale")?;
    expect_dtype(&packed, &[Dtype::U8], "packed NVFP4 codes")?;
    // U8 is accepted too: the reference vectors store raw E4M3 bytes as U8.
    expect_dtype(&scale, &[Dtype::F8_E4M3, Dtype::U8], "NVFP4 block scales")?;
    let s2 = scalar_f32(&scale2, "NVFP4 tensor scale")?;
    if !(s2.is_finite() && s2 >= 0.0) {
        return Err(bad(&scale2, format!("invalid NVFP4 tensor scale {s2}")));
    }
    let shape = e2m1_shape(pool, base, &packed, &packed.shape, &scale, nvfp4::BLOCK)?;

    let input_scale = match base.strip_suffix(".weight") {
        Some(prefix) => match pool.get(&format!("{prefix}.input_scale")).cloned() {
            Some(t) => {
                let v = scalar_f32(&t, "NVFP4 input scale")?;
                Some((v, pool.claim(&t)))
            }
            None => None,
        },
        None => None,
    };
    let mut members = vec![pool.claim(&packed), pool.claim(&scale), pool.claim(&scale2)];
    members.extend(input_scale.as_ref().map(|(_, m)| m.clone()));
    Ok(QuantView {
        name: base.to_string(),
        file: packed.file.clone(),
        layout: Layout::ModelOpt,
        format: Format::Nvfp4,
        shape,
        block_size: nvfp4::BLOCK,
        codes: packed.bytes.clone(),
        scales: ScaleData::Bytes {
            bytes: scale.bytes.clone(),
            table: Arc::new(nvfp4::scale_table(s2)),
        },
        tensor_scale: Some(s2),
        input_scale: input_scale.map(|(v, _)| v),
        source_dtype: None,
        members,
    })
}

/// Logical shape of E2M1 codes packed as `[.., P]` bytes with one scale byte per `block`
/// elements (`scale` shaped `[.., 2P / block]`): `[.., 2P]`, or the narrower shape q4 recorded
/// under `name` when it padded rows.
pub(super) fn e2m1_shape(
    pool: &Pool,
    name: &str,
    packed: &RawTensor,
    packed_shape: &[usize],
    scale: &RawTensor,
    block: usize,
) -> Result<Vec<usize>> {
    let Some((&p, lead)) = packed_shape.split_last() else {
        return Err(bad(packed, "packed codes need at least one dimension"));
    };
    let stored_cols = 2 * p;
    let expected: Vec<usize> = lead.iter().copied().chain([stored_cols / block]).collect();
    if stored_cols % block != 0 || scale.shape != expected {
        return Err(bad(
            scale,
            format!(
                "shape {:?} does not match packed codes `{}` {:?}: expected {expected:?} \
                 (one scale per {block} elements)",
                scale.shape, packed.name, packed.shape,
            ),
        ));
    }
    let mut shape = packed_shape.to_vec();
    *shape.last_mut().expect("non-empty") = stored_cols;
    if let Some(logical) = pool.logical_shape(name) {
        let fits = logical.len() == shape.len()
            && logical[..lead.len()] == *lead
            && logical
                .last()
                .is_some_and(|&c| c > 0 && c.div_ceil(block) * block == stored_cols);
        if !fits {
            return Err(bad(
                packed,
                format!("recorded logical shape {logical:?} does not fit the stored {shape:?}"),
            ));
        }
        shape = logical.clone();
    }
    Ok(shape)
}
