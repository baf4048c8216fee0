//! bitsandbytes `Linear4bit` state (FORMATS.md §2.6): `K` U8 `[(n+1)/2, 1]`, `K.absmax`
//! (F32, or U8 codes when nested), `K.quant_map` F32 `[16]`, nested `K.nested_absmax` and
//! `K.nested_quant_map`, and `K.quant_state.bitsandbytes__nf4|fp4`: the non-tensor fields as
//! UTF-8 JSON. The JSON names the format and the logical shape; the stored codebook must match.

use std::sync::Arc;

use q4_formats::bnb::{check_block_size, BnbKind, NestedAbsmax};
use q4_formats::Format;
use safetensors::Dtype;
use serde::Deserialize;

use super::detect::{bad, expect_dtype, f32_values, Pool};
use super::view::{Layout, NestedStats, QuantView, ScaleData};
use crate::error::Result;

const STATE_MARK: &str = ".quant_state.bitsandbytes__";

/// `(K, "nf4" | "fp4" | ...)` of a `K.quant_state.bitsandbytes__*` tensor.
pub(super) fn anchor(name: &str) -> Option<(&str, &str)> {
    let (base, kind) = name.split_once(STATE_MARK)?;
    Some((base, kind))
}

/// The packed quant-state fields (`QuantState.as_dict(packed=True)`).
#[derive(Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

pub(super) fn detect(
    pool: &mut Pool,
    base: &str,
    kind: &str,
    state_name: &str,
) -> Result<QuantView> {
    let state = pool.get(state_name).expect("anchor").clone();
    expect_dtype(&state, &[Dtype::U8], "bitsandbytes quant state")?;
    let json: QuantStateJson = std::str::from_utf8(&state.bytes)
        .map_err(|e| bad(&state, format!("quant state is not UTF-8: {e}")))
        .and_then(|s| {
            serde_json::from_str(s)
                .map_err(|e| bad(&state, format!("invalid quant-state JSON: {e}")))
        })?;
    let bnb_kind = match json.quant_type.as_str() {
        "nf4" => BnbKind::Nf4,
        "fp4" => BnbKind::Fp4,
        other => {
            return Err(bad(
                &state,
                format!("unknown layout: bitsandbytes quant_type `{other}` (expected nf4 or fp4)"),
            ))
        }
    };
    if kind != json.quant_type {
        return Err(bad(
            &state,
            format!(
                "the name says `{kind}` but the JSON says quant_type `{}`",
                json.quant_type
            ),
        ));
    }
    check_block_size(json.blocksize).map_err(|e| bad(&state, e))?;
    let numel: usize = json.shape.iter().product();
    let n_blocks = numel.div_ceil(json.blocksize);

    let packed = pool.partner(&state, base, "packed 4-bit")?;
    let absmax = pool.partner(&state, &format!("{base}.absmax"), "absmax")?;
    let quant_map = pool.partner(&state, &format!("{base}.quant_map"), "quant_map")?;
    if packed.bytes.len() != numel.div_ceil(2) {
        return Err(bad(
            &packed,
            format!(
                "{} bytes of codes, but shape {:?} needs {}",
                packed.bytes.len(),
                json.shape,
                numel.div_ceil(2)
            ),
        ));
    }
    expect_dtype(&quant_map, &[Dtype::F32], "quant_map")?;
    let map = f32_values(&quant_map);
    if BnbKind::from_codebook(&map) != Some(bnb_kind) || map.len() != 16 {
        return Err(bad(
            &quant_map,
            format!(
                "does not hold the bitsandbytes {} codebook",
                bnb_kind.name()
            ),
        ));
    }
    let mut members = vec![
        pool.claim(&packed),
        pool.claim(&absmax),
        pool.claim(&quant_map),
    ];

    let nested_name = format!("{base}.nested_absmax");
    let (decoded, nested) = match (json.nested_offset, json.nested_blocksize) {
        (None, None) => {
            if let Some(t) = pool.get(&nested_name) {
                return Err(bad(
                    t,
                    "nested statistics, but the quant state is not nested",
                ));
            }
            expect_dtype(&absmax, &[Dtype::F32], "absmax (not nested)")?;
            expect_len(&absmax, n_blocks)?;
            (f32_values(&absmax), None)
        }
        (Some(offset), Some(nbs)) => {
            let nested_absmax = pool.partner(&state, &nested_name, "nested_absmax")?;
            let nested_map = pool.partner(
                &state,
                &format!("{base}.nested_quant_map"),
                "nested_quant_map",
            )?;
            expect_dtype(&absmax, &[Dtype::U8], "absmax codes (nested)")?;
            expect_dtype(&nested_absmax, &[Dtype::F32], "nested_absmax")?;
            expect_dtype(&nested_map, &[Dtype::F32], "nested_quant_map")?;
            expect_len(&absmax, n_blocks)?;
            if nbs == 0 {
                return Err(bad(&state, "nested_blocksize is 0"));
            }
            expect_len(&nested_absmax, n_blocks.div_ceil(nbs))?;
            expect_len(&nested_map, 256)?;
            let stats = NestedStats {
                nested_absmax: f32_values(&nested_absmax),
                code_map: f32_values(&nested_map),
                // The JSON holds Python's repr of the f32 offset, which round-trips exactly.
                offset: offset as f32,
                block_size: nbs,
            };
            let decoded = NestedAbsmax {
                codes: absmax.bytes.to_vec(),
                nested_absmax: stats.nested_absmax.clone(),
                offset: stats.offset,
                code_map: stats.code_map.clone(),
                block_size: nbs,
            }
            .dequantize()
            .map_err(|e| bad(&absmax, e))?;
            members.push(pool.claim(&nested_absmax));
            members.push(pool.claim(&nested_map));
            (decoded, Some(Arc::new(stats)))
        }
        _ => {
            return Err(bad(
                &state,
                "nested_offset and nested_blocksize must appear together",
            ))
        }
    };
    members.push(pool.claim(&state));
    Ok(QuantView {
        name: base.to_string(),
        file: packed.file.clone(),
        layout: Layout::Bitsandbytes,
        format: if bnb_kind == BnbKind::Nf4 {
            Format::Nf4
        } else {
            Format::Fp4
        },
        shape: json.shape,
        block_size: json.blocksize,
        codes: packed.bytes.clone(),
        scales: ScaleData::Absmax {
            stored: absmax.bytes.clone(),
            decoded: Arc::new(decoded),
            nested,
        },
        tensor_scale: None,
        input_scale: None,
        source_dtype: Some(json.dtype),
        members,
    })
}

fn expect_len(t: &super::safetensors_io::RawTensor, n: usize) -> Result<()> {
    if t.numel() == n {
        Ok(())
    } else {
        Err(bad(
            t,
            format!(
                "expected {n} elements, found {} (shape {:?})",
                t.numel(),
                t.shape
            ),
        ))
    }
}
