//! Quantization configs: what a model directory declares (`config.json["quantization_config"]`,
//! `hf_quant_config.json`), what q4 records in a file's `__metadata__`, and the configs q4 writes.

use std::collections::HashMap;
use std::path::Path;

use q4_formats::Format;
use serde_json::{json, Value};

use super::safetensors_io::MappedFile;
use super::view::Layout;
use super::Entry;
use crate::error::{Error, Result};

/// The `__metadata__` key q4 writes.
pub const Q4_METADATA_KEY: &str = "q4";
/// Name of ModelOpt's side config.
pub const HF_QUANT_CONFIG: &str = "hf_quant_config.json";
/// Name of the model config.
pub const CONFIG: &str = "config.json";

/// Logical shapes q4 recorded for tensors whose rows it padded.
pub(super) fn recorded_shapes(f: &MappedFile) -> Result<HashMap<String, Vec<usize>>> {
    let Some(s) = f.metadata.get(Q4_METADATA_KEY) else {
        return Ok(HashMap::new());
    };
    let bad = |e: &dyn std::fmt::Display| {
        Error::msg(format!(
            "{}: invalid `{Q4_METADATA_KEY}` metadata: {e}",
            f.path.display()
        ))
    };
    let v: Value = serde_json::from_str(s).map_err(|e| bad(&e))?;
    match v.get("shapes") {
        None => Ok(HashMap::new()),
        Some(shapes) => serde_json::from_value(shapes.clone()).map_err(|e| bad(&e)),
    }
}

/// The quantization a model directory's config files declare.
#[derive(Clone, Debug, PartialEq)]
pub struct DeclaredQuant {
    /// The file that says so.
    pub file: String,
    /// `quant_method` (`modelopt`, `compressed-tensors`, `bitsandbytes`, `mxfp4`, ...).
    pub method: String,
    /// `quant_algo`, `bnb_4bit_quant_type` or `format`, when given.
    pub detail: Option<String>,
}

impl DeclaredQuant {
    /// The layout this declaration implies, if q4 supports it.
    pub fn layout(&self) -> Option<Layout> {
        let detail = self.detail.as_deref().map(str::to_ascii_lowercase);
        match (self.method.as_str(), detail.as_deref()) {
            ("modelopt", Some("nvfp4") | None) => Some(Layout::ModelOpt),
            ("compressed-tensors", _) => Some(Layout::CompressedTensors),
            ("bitsandbytes", Some("nf4" | "fp4") | None) => Some(Layout::Bitsandbytes),
            ("mxfp4", _) => Some(Layout::GptOss),
            _ => None,
        }
    }

    /// Refuses declarations q4 cannot read; warns where tensors and config disagree.
    pub(super) fn check(&self, entries: &[Entry]) -> Result<()> {
        let Some(layout) = self.layout() else {
            return Err(Error::msg(format!(
                "{}: unknown layout: quantization `{}`{} is not supported (q4 reads modelopt \
                 NVFP4, compressed-tensors NVFP4, bitsandbytes NF4/FP4 and MXFP4)",
                self.file,
                self.method,
                self.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )));
        };
        let mut n_quant = 0;
        for e in entries {
            if let Entry::Quant(q) = e {
                n_quant += 1;
                if q.layout != layout {
                    tracing::warn!(
                        "{}: declares {} but tensor `{}` is stored in the {} layout",
                        self.file,
                        layout,
                        q.name,
                        q.layout
                    );
                }
            }
        }
        if n_quant == 0 {
            tracing::warn!(
                "{}: declares {} quantization but no quantized tensor was found",
                self.file,
                self.method
            );
        }
        Ok(())
    }
}

/// Reads `config.json` and the quantization it (or `hf_quant_config.json`) declares.
pub(super) fn read_declared(dir: &Path) -> Result<(Option<Value>, Option<DeclaredQuant>)> {
    let config = read_json(&dir.join(CONFIG))?;
    if let Some(q) = config.as_ref().and_then(|c| c.get("quantization_config")) {
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        // compressed-tensors' `format` names the packing (e.g. nvfp4-pack-quantized).
        let detail = ["quant_algo", "bnb_4bit_quant_type", "format"]
            .iter()
            .find_map(|k| q.get(*k).and_then(Value::as_str))
            .map(str::to_string);
        let detail = if q.get("load_in_8bit").and_then(Value::as_bool) == Some(true) {
            Some("int8".to_string())
        } else {
            detail
        };
        return Ok((
            config,
            Some(DeclaredQuant {
                file: dir.join(CONFIG).display().to_string(),
                method,
                detail,
            }),
        ));
    }
    let hf = read_json(&dir.join(HF_QUANT_CONFIG))?;
    let declared = hf.map(|h| DeclaredQuant {
        file: dir.join(HF_QUANT_CONFIG).display().to_string(),
        method: "modelopt".into(),
        detail: h
            .pointer("/quantization/quant_algo")
            .and_then(Value::as_str)
            .map(str::to_string),
    });
    Ok((config, declared))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::msg(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::msg(format!("{}: {e}", path.display()))),
    }
}

/// Who wrote the checkpoint (ModelOpt's `producer` field).
fn producer() -> Value {
    json!({"name": "q4", "version": env!("CARGO_PKG_VERSION")})
}

/// `config.json["quantization_config"]` and `hf_quant_config.json` for NVFP4, in ModelOpt's
/// shape (FORMATS.md §3.3). `ignore` lists the modules left unquantized.
pub fn modelopt_configs(ignore: &[String]) -> (Value, Value) {
    let numerics = json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16});
    let quantization_config = json!({
        "config_groups": {
            "group_0": {
                "input_activations": numerics,
                "weights": numerics,
                "targets": ["Linear"],
            }
        },
        "ignore": ignore,
        "quant_algo": "NVFP4",
        "producer": producer(),
        "quant_method": "modelopt",
    });
    let hf_quant_config = json!({
        "producer": producer(),
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": null,
            "group_size": 16,
            "exclude_modules": ignore,
        }
    });
    (quantization_config, hf_quant_config)
}

/// transformers' `BitsAndBytesConfig.to_dict()` for 4-bit loading (FORMATS.md §2.6).
pub fn bnb_config(format: Format, double_quant: bool, compute_dtype: &str) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": format.name(),
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

/// transformers' `Mxfp4Config.to_dict()` (FORMATS.md §5.4).
pub fn mxfp4_config(ignore: &[String]) -> Value {
    json!({"quant_method": "mxfp4", "modules_to_not_convert": ignore})
}
