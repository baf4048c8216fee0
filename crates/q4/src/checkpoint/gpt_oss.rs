//! gpt-oss MXFP4 (FORMATS.md §5.4), which is also q4's own MXFP4 naming: `X_blocks` U8
//! `[.., G, 16]` (32 E2M1 codes per block, low nibble first) and `X_scales` U8 `[.., G]` (E8M0,
//! bias 127). The original gpt-oss checkpoint spells them `X.blocks` / `X.scales`. The logical
//! tensor `X` has shape `[.., G * 32]`, rows as stored (transformers transposes them later).

use std::sync::Arc;

use q4_formats::{mxfp4, Format};
use safetensors::Dtype;

use super::detect::{bad, expect_dtype, Pool};
use super::modelopt::e2m1_shape;
use super::view::{Layout, QuantView, ScaleData};
use crate::error::Result;

/// The two spellings of the pair.
#[derive(Clone, Copy, Debug)]
pub(super) enum Style {
    /// `X_blocks` / `X_scales` (transformers, q4).
    Underscore,
    /// `X.blocks` / `X.scales` (original gpt-oss).
    Dot,
}

pub(super) fn anchor(name: &str) -> Option<(&str, Style)> {
    if let Some(base) = name.strip_suffix("_blocks") {
        Some((base, Style::Underscore))
    } else {
        name.strip_suffix(".blocks").map(|b| (b, Style::Dot))
    }
}

pub(super) fn detect(pool: &mut Pool, base: &str, style: Style) -> Result<QuantView> {
    let (blocks_name, scales_name) = match style {
        Style::Underscore => (format!("{base}_blocks"), format!("{base}_scales")),
        Style::Dot => (format!("{base}.blocks"), format!("{base}.scales")),
    };
    let blocks = pool.get(&blocks_name).expect("anchor").clone();
    let scales = pool.partner(&blocks, &scales_name, "MXFP4 scale")?;
    expect_dtype(&blocks, &[Dtype::U8], "MXFP4 blocks")?;
    expect_dtype(&scales, &[Dtype::U8, Dtype::F8_E8M0], "MXFP4 scales")?;
    let half_block = mxfp4::BLOCK / 2;
    let packed_shape = match blocks.shape.split_last() {
        Some((&last, lead)) if last == half_block && !lead.is_empty() => {
            let (&g, outer) = lead.split_last().expect("non-empty");
            outer
                .iter()
                .copied()
                .chain([g * half_block])
                .collect::<Vec<_>>()
        }
        _ => {
            return Err(bad(
                &blocks,
                format!(
                    "MXFP4 blocks must be shaped [.., groups, {half_block}], found {:?}",
                    blocks.shape
                ),
            ))
        }
    };
    let shape = e2m1_shape(pool, base, &blocks, &packed_shape, &scales, mxfp4::BLOCK)?;
    let members = vec![pool.claim(&blocks), pool.claim(&scales)];
    Ok(QuantView {
        name: base.to_string(),
        file: blocks.file.clone(),
        layout: Layout::GptOss,
        format: Format::Mxfp4,
        shape,
        block_size: mxfp4::BLOCK,
        codes: blocks.bytes.clone(),
        scales: ScaleData::Bytes {
            bytes: scales.bytes.clone(),
            table: Arc::new(mxfp4::scale_table()),
        },
        tensor_scale: None,
        input_scale: None,
        source_dtype: None,
        members,
    })
}
