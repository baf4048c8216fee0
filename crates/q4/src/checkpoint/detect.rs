//! Groups the stored tensors of a checkpoint into logical tensors: each layout claims its
//! members, whatever is left must be plainly dense, and anything that looks like quantization
//! state without a home is an "unknown layout" error.

use std::collections::{BTreeMap, HashMap, HashSet};

use safetensors::Dtype;

use super::dense::DenseView;
use super::safetensors_io::RawTensor;
use super::view::{Member, QuantView};
use super::{bnb, compressed_tensors, gpt_oss, modelopt, Entry};
use crate::error::{Error, Result};

/// The stored tensors of a checkpoint, with the names already claimed by a layout.
pub(crate) struct Pool {
    tensors: BTreeMap<String, RawTensor>,
    claimed: HashSet<String>,
    /// Logical shapes recorded by q4 when it padded rows (`__metadata__["q4"]["shapes"]`).
    logical_shapes: HashMap<String, Vec<usize>>,
}

impl Pool {
    pub fn new(
        tensors: BTreeMap<String, RawTensor>,
        logical_shapes: HashMap<String, Vec<usize>>,
    ) -> Self {
        Pool {
            tensors,
            claimed: HashSet::new(),
            logical_shapes,
        }
    }

    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name)
    }

    pub fn is_claimed(&self, name: &str) -> bool {
        self.claimed.contains(name)
    }

    /// Marks `t` as part of a logical tensor and describes it.
    pub fn claim(&mut self, t: &RawTensor) -> Member {
        self.claimed.insert(t.name.clone());
        Member {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            nbytes: t.bytes.len(),
        }
    }

    /// Logical shape q4 recorded for a padded tensor.
    pub fn logical_shape(&self, name: &str) -> Option<&Vec<usize>> {
        self.logical_shapes.get(name)
    }

    /// A required partner tensor, or an error naming what is missing.
    pub fn partner(&self, of: &RawTensor, name: &str, role: &str) -> Result<RawTensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::msg(format!("{}: missing {role} tensor `{name}`", of.at())))
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

/// An error about one stored tensor.
pub(crate) fn bad(t: &RawTensor, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("{}: {msg}", t.at()))
}

/// Checks a member's dtype.
pub(crate) fn expect_dtype(t: &RawTensor, allowed: &[Dtype], role: &str) -> Result<()> {
    if allowed.contains(&t.dtype) {
        return Ok(());
    }
    let names: Vec<String> = allowed.iter().map(|d| d.to_string()).collect();
    Err(bad(
        t,
        format!(
            "{role} must have dtype {}, found {}",
            names.join(" or "),
            t.dtype
        ),
    ))
}

/// Reads a one-element F32 tensor (shape `[]` or `[1]`).
pub(crate) fn scalar_f32(t: &RawTensor, role: &str) -> Result<f32> {
    expect_dtype(t, &[Dtype::F32], role)?;
    if t.numel() != 1 {
        return Err(bad(
            t,
            format!("{role} must hold one value, found shape {:?}", t.shape),
        ));
    }
    let b: [u8; 4] = t.bytes[..4].try_into().expect("4 bytes");
    Ok(f32::from_le_bytes(b))
}

/// Reads an F32 tensor's values.
pub(crate) fn f32_values(t: &RawTensor) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&t.bytes)
}

/// bitsandbytes state names: never dense.
const BNB_SUFFIXES: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

/// Scale / block names: quantization state when their base tensor exists or when they hold
/// raw bytes (`logit_scale`-style F32 parameters without a base stay dense).
const SCALE_SUFFIXES: [&str; 6] = [
    "_scale_2",
    "_global_scale",
    "_scales",
    "_scale",
    "_blocks",
    "_packed",
];

/// One-element activation / KV-cache scales that are ordinary dense tensors when no
/// quantized weight claims them (e.g. FP8 KV-cache scales).
const ACTIVATION_SCALES: [&str; 5] = [
    "input_scale",
    "k_scale",
    "v_scale",
    "output_scale",
    "input_global_scale",
];

/// Splits every stored tensor into logical entries, sorted by name.
pub(crate) fn detect(mut pool: Pool) -> Result<Vec<Entry>> {
    let mut quant: Vec<QuantView> = Vec::new();
    let names = pool.names();
    // Each layout is found through the tensor that only it has.
    for n in &names {
        if let Some((base, kind)) = bnb::anchor(n) {
            quant.push(bnb::detect(&mut pool, base, kind, n)?);
        }
    }
    for n in &names {
        if let Some(prefix) = compressed_tensors::anchor(n) {
            if !pool.is_claimed(n) {
                quant.push(compressed_tensors::detect(&mut pool, prefix)?);
            }
        }
    }
    for n in &names {
        if let Some((base, style)) = gpt_oss::anchor(n) {
            if !pool.is_claimed(n) {
                quant.push(gpt_oss::detect(&mut pool, base, style)?);
            }
        }
    }
    for n in &names {
        if let Some(base) = modelopt::anchor(&pool, n) {
            if !pool.is_claimed(base) {
                let base = base.to_string();
                quant.push(modelopt::detect(&mut pool, &base)?);
            }
        }
    }

    let mut entries: Vec<Entry> = quant.into_iter().map(Entry::Quant).collect();
    for n in &names {
        if pool.is_claimed(n) {
            continue;
        }
        let t = pool.get(n).expect("listed").clone();
        check_plain_dense(&pool, &t)?;
        entries.push(Entry::Dense(DenseView::from_raw(t)));
    }
    entries.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(entries)
}

/// Refuses tensors that look like quantization state but belong to no layout.
fn check_plain_dense(pool: &Pool, t: &RawTensor) -> Result<()> {
    let leaf = t.name.rsplit('.').next().unwrap_or(&t.name);
    if ACTIVATION_SCALES.contains(&leaf) && t.numel() == 1 {
        return Ok(());
    }
    let byte_like = matches!(
        t.dtype,
        Dtype::U8 | Dtype::F8_E4M3 | Dtype::F8_E8M0 | Dtype::F8_E5M2
    );
    let orphan = |suffix: &str| {
        Err(bad(
            t,
            format!(
                "unknown layout: a `*{suffix}` tensor ({} {:?}) that no supported layout claims \
                 (its partner tensors are missing or of an unsupported kind)",
                t.dtype, t.shape
            ),
        ))
    };
    if let Some(s) = BNB_SUFFIXES.iter().find(|s| t.name.ends_with(*s)) {
        return orphan(s);
    }
    if t.name.contains(".quant_state.") {
        return Err(bad(
            t,
            "unknown layout: unrecognised bitsandbytes quant_state entry",
        ));
    }
    if let Some(s) = SCALE_SUFFIXES.iter().find(|s| t.name.ends_with(*s)) {
        let base = &t.name[..t.name.len() - s.len()];
        if byte_like || pool.get(base).is_some() {
            return orphan(s);
        }
    }
    if t.dtype == Dtype::U8 {
        return Err(bad(
            t,
            format!(
                "unknown layout: a U8 tensor {:?} that fits no supported 4-bit layout \
                 (no scale tensors next to it)",
                t.shape
            ),
        ));
    }
    Ok(())
}
