//! GGUF files (llama.cpp): every tensor is dequantized to f32 and presented under HF names.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// A GGUF model file (architecture `llama`).
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<GgufSource> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        let arch = md_str(&content, "general.architecture")
            .with_context(|| format!("GGUF file {}", path.display()))?;
        if arch != "llama" {
            bail!(
                "unsupported GGUF architecture `{arch}` in {} (supported: llama)",
                path.display()
            );
        }
        let num_heads = md_usize(&content, "llama.attention.head_count")?;
        let num_kv_heads = md_usize(&content, "llama.attention.head_count_kv").unwrap_or(num_heads);
        Ok(GgufSource {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
            num_heads,
            num_kv_heads,
        })
    }

    /// Metadata (for the tokenizer).
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn read_f32(&self, gguf_name: &str) -> Result<Tensor> {
        Ok(self.read_quantized(gguf_name)?.dequantize(&Device::Cpu)?)
    }

    /// A tensor as stored (any GGML type).
    fn read_quantized(&self, gguf_name: &str) -> Result<QTensor> {
        let mut reader = self.reader.lock().expect("GGUF reader lock poisoned");
        self.content
            .tensor(&mut *reader, gguf_name, &Device::Cpu)
            .with_context(|| {
                format!(
                    "cannot read tensor `{gguf_name}` from {}",
                    self.path.display()
                )
            })
    }

    /// The GGUF name of an HF tensor name that this file holds.
    fn stored_name(&self, name: &str) -> Result<String> {
        match gguf_name(name).filter(|g| self.content.tensor_infos.contains_key(g)) {
            Some(g) => Ok(g),
            None => bail!("tensor `{name}` not found in {}", self.path.display()),
        }
    }

    /// convert_hf_to_gguf.py permutes q/k rows so that llama.cpp can rotate adjacent pairs; our
    /// RoPE rotates halves like HF. The head count to undo it with, for the tensors it touched.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
            Some(self.num_heads)
        } else if name.ends_with("self_attn.k_proj.weight")
            || name.ends_with("self_attn.k_proj.bias")
        {
            Some(self.num_kv_heads)
        } else {
            None
        }
    }
}

impl WeightSource for GgufSource {
    fn location(&self) -> &Path {
        &self.path
    }

    fn config(&self) -> Result<ModelConfig> {
        let mut cfg = config_from_metadata(&self.content)
            .with_context(|| format!("bad GGUF metadata in {}", self.path.display()))?;
        // Llama 3 GGUFs carry their frequency scaling as a tensor.
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let f = self
                .read_f32("rope_freqs.weight")?
                .flatten_all()?
                .to_vec1::<f32>()?;
            cfg.rope_scaling = Some(RopeScaling::FreqFactors(f));
        }
        Ok(cfg)
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_gguf(&self.content)
            .with_context(|| format!("cannot build the tokenizer of {}", self.path.display()))
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn int8_table(&self, name: &str) -> Result<q4::Int8Table> {
        Ok(match self.sliced(name)? {
            Sliced::Whole(t) => q4::Int8Table::quantize(&t)?,
            // Straight from f32 slices into the int8 table.
            Sliced::Rows(s) => {
                q4::Int8Table::from_row_chunks(s.rows, s.cols, SLICE_ROWS, |r0, n| {
                    s.get(r0, n)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| q4::Error::msg(e.to_string()))
                })?
            }
        })
    }

    fn tensor_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        if dtype == DType::F32 {
            return self.tensor(name);
        }
        let s = match self.sliced(name)? {
            Sliced::Whole(t) => return Ok(t.to_dtype(dtype)?),
            Sliced::Rows(s) => s,
        };
        let chunk = |r0: usize| -> Result<Tensor> {
            Ok(s.get(r0, SLICE_ROWS.min(s.rows - r0))?.to_dtype(dtype)?)
        };
        if dtype == DType::BF16 {
            // Straight into the final buffer: no second copy of the table either.
            let mut out: Vec<half::bf16> = Vec::with_capacity(s.rows * s.cols);
            for r0 in (0..s.rows).step_by(SLICE_ROWS) {
                out.extend(chunk(r0)?.flatten_all()?.to_vec1::<half::bf16>()?);
            }
            return Ok(Tensor::from_vec(out, (s.rows, s.cols), &Device::Cpu)?);
        }
        let parts = (0..s.rows)
            .step_by(SLICE_ROWS)
            .map(chunk)
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.read_f32(&self.stored_name(name)?)?;
        match self.permuted_heads(name) {
            Some(heads) => unpermute_rows(&t, heads),
            None => Ok(t),
        }
    }
}

/// Rows per slice when a large table (the token embeddings) is converted piecewise: the whole
/// table never exists in f32.
const SLICE_ROWS: usize = 1024;

/// A stored tensor for piecewise conversion.
enum Sliced {
    /// 2-D with whole blocks per row: read in slices of rows.
    Rows(Box<RowSlices>),
    /// Anything else (q/k rows to un-permute, other ranks), as one f32 tensor.
    Whole(Tensor),
}

struct RowSlices {
    q: QTensor,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl RowSlices {
    /// Rows `r0 .. r0 + n` dequantized to f32.
    fn get(&self, r0: usize, n: usize) -> candle_core::Result<Tensor> {
        let raw = self.q.data()?;
        let bytes = &raw[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
        qtensor_from_ggml(self.q.dtype(), bytes, vec![n, self.cols], &Device::Cpu)?
            .dequantize(&Device::Cpu)
    }
}

impl GgufSource {
    /// `name` ready for piecewise conversion (see [`Sliced`]). Permuted q/k rows are undone in
    /// f32 (see `tensor`), so only other tensors convert piecewise.
    fn sliced(&self, name: &str) -> Result<Sliced> {
        if self.permuted_heads(name).is_some() {
            return Ok(Sliced::Whole(self.tensor(name)?));
        }
        let q = self.read_quantized(&self.stored_name(name)?)?;
        let gdt = q.dtype();
        match *q.shape().dims() {
            [rows, cols] if cols % gdt.block_size() == 0 => Ok(Sliced::Rows(Box::new(RowSlices {
                rows,
                cols,
                row_bytes: cols / gdt.block_size() * gdt.type_size(),
                q,
            }))),
            _ => Ok(Sliced::Whole(q.dequantize(&Device::Cpu)?)),
        }
    }
}

/// HF tensor name -> GGUF tensor name (llama.cpp's `LLM_ARCH_LLAMA` naming).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let mapped = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}.{suffix}"))
}

/// Inverse of convert_hf_to_gguf's `permute`: rows `[heads, 2, half]` were stored as
/// `[heads, half, 2]`. Works for weights `[rows, cols]` and biases `[rows]`.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        bail!("cannot undo the q/k permutation: {rows} rows for {heads} heads");
    }
    let half = rows / heads / 2;
    let cols: usize = dims[1..].iter().product();
    let r = t
        .reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(r)
}

fn md<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .with_context(|| format!("missing metadata key `{key}`"))
}

fn md_str(c: &Content, key: &str) -> Result<String> {
    Ok(md(c, key)?
        .to_string()
        .with_context(|| format!("metadata `{key}` is not a string"))?
        .clone())
}

fn md_usize(c: &Content, key: &str) -> Result<usize> {
    let v = md(c, key)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => bail!("metadata `{key}` is not a non-negative integer: {other:?}"),
    };
    Ok(n as usize)
}

fn md_f64(c: &Content, key: &str) -> Result<f64> {
    match md(c, key)? {
        Value::F32(x) => Ok(*x as f64),
        Value::F64(x) => Ok(*x),
        _ => Ok(md_usize(c, key)? as f64),
    }
}

/// Builds the model config from `llama.*` metadata.
pub fn config_from_metadata(c: &Content) -> Result<ModelConfig> {
    let p = "llama";
    let hidden_size = md_usize(c, &format!("{p}.embedding_length"))?;
    let num_heads = md_usize(c, &format!("{p}.attention.head_count"))?;
    let num_kv_heads = md_usize(c, &format!("{p}.attention.head_count_kv")).unwrap_or(num_heads);
    let head_dim =
        md_usize(c, &format!("{p}.attention.key_length")).unwrap_or(hidden_size / num_heads.max(1));
    let vocab_size = md_usize(c, &format!("{p}.vocab_size"))
        .or_else(|_| {
            md(c, "tokenizer.ggml.tokens")?
                .to_vec()
                .map(|v| v.len())
                .map_err(anyhow::Error::from)
        })
        .context("cannot tell the vocabulary size")?;
    let rope_scaling = match md_str(c, &format!("{p}.rope.scaling.type")).ok().as_deref() {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: md_f64(c, &format!("{p}.rope.scaling.factor"))?,
        }),
        Some(other) => bail!("unsupported rope scaling type `{other}` (supported: linear, llama3)"),
    };
    let cfg = ModelConfig {
        arch: Arch::Llama,
        hidden_size,
        intermediate_size: md_usize(c, &format!("{p}.feed_forward_length"))?,
        num_layers: md_usize(c, &format!("{p}.block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rope_theta: md_f64(c, &format!("{p}.rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        rms_norm_eps: md_f64(c, &format!("{p}.attention.layer_norm_rms_epsilon"))?,
        max_position_embeddings: md_usize(c, &format!("{p}.context_length"))?,
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: c.tensor_infos.contains_key("blk.0.ffn_gate.bias"),
        qk_norm: false,
        bos_token_id: md_usize(c, "tokenizer.ggml.bos_token_id")
            .ok()
            .map(|x| x as u32),
        eos_token_ids: md_usize(c, "tokenizer.ggml.eos_token_id")
            .ok()
            .map(|x| vec![x as u32])
            .unwrap_or_default(),
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// convert_hf_to_gguf.py's `LlamaModel.permute`, written out with explicit indices.
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let half = rows / heads / 2;
        let mut out = vec![0.0; w.len()];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..half {
                    let src = h * 2 * half + s * half + j; // HF row
                    let dst = h * 2 * half + j * 2 + s; // GGUF row
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 5, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let permuted = llama_cpp_permute(&w, rows, cols, heads);
        let t = Tensor::from_vec(permuted, (rows, cols), &Device::Cpu).unwrap();
        let back = unpermute_rows(&t, heads).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w);
        // Biases too.
        let b: Vec<f32> = (0..rows).map(|i| i as f32).collect();
        let pb = llama_cpp_permute(&b, rows, 1, heads);
        let back = unpermute_rows(&Tensor::new(pb, &Device::Cpu).unwrap(), heads).unwrap();
        assert_eq!(back.to_vec1::<f32>().unwrap(), b);
    }

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.0.foo.weight"), None);
    }
}
