//! Grouped-query self-attention with RoPE, optional q/k norm (Qwen3) and q/k/v bias (Qwen2).

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use q4::{Format, QLinear};

use super::cpu_ops::causal_softmax;
use super::decode_attention::decode_attention;
use super::fused::LinearGroup;
use super::norm::RmsNorm;
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::rope::Rope;
use crate::weights::{checked_linears, LinearSpec, WeightSource};

#[derive(Clone, Debug)]
pub struct Attention {
    /// q, k and v projections (run as one stacked matmul when possible).
    pub(super) qkv: LinearGroup,
    pub(super) o_proj: QLinear,
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub fn load<S: WeightSource + ?Sized>(
        src: &S,
        cfg: &ModelConfig,
        prefix: &str,
        quant: Option<Format>,
        device: &Device,
    ) -> Result<Attention> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let spec = |name: &str, out_features, in_features, bias| LinearSpec {
            name: format!("{prefix}.{name}"),
            out_features,
            in_features,
            bias,
        };
        let b = cfg.attention_bias;
        // q, k and v read the same input: one group, one shared NVFP4 tensor scale.
        let qkv = checked_linears(
            src,
            &[
                spec("q_proj", q_out, h, b),
                spec("k_proj", kv_out, h, b),
                spec("v_proj", kv_out, h, b),
            ],
            quant,
            device,
        )?;
        let mut o = checked_linears(src, &[spec("o_proj", h, q_out, false)], quant, device)?;
        let (q_norm, k_norm) = if cfg.qk_norm {
            let eps = cfg.rms_norm_eps;
            (
                Some(RmsNorm::load(
                    src,
                    &format!("{prefix}.q_norm.weight"),
                    d,
                    eps,
                    device,
                )?),
                Some(RmsNorm::load(
                    src,
                    &format!("{prefix}.k_norm.weight"),
                    d,
                    eps,
                    device,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            qkv: LinearGroup::new(qkv),
            o_proj: o.pop().expect("one layer"),
            q_norm,
            k_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
        })
    }

    /// Applies `f` to every linear layer.
    pub fn map_linears(self, f: &dyn Fn(QLinear) -> Result<QLinear>) -> Result<Self> {
        Ok(Attention {
            qkv: self.qkv.map(f)?,
            o_proj: f(self.o_proj)?,
            ..self
        })
    }

    /// `x`: `[batch, seq, hidden]` at positions `offset..offset + seq`; `mask`: `[seq, offset +
    /// seq]` additive causal mask (absent for a single new position).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] = self.qkv.forward(x)?.try_into().expect("three projections");
        let q = q.reshape((b, t, nh, hd))?;
        let k = k.reshape((b, t, nkv, hd))?;
        let v = v.reshape((b, t, nkv, hd))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let q = rope.apply(&q.transpose(1, 2)?.contiguous()?, offset)?;
        let k = rope.apply(&k.transpose(1, 2)?.contiguous()?, offset)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let out = match decode_attention(&q, &k, &v, self.scale)? {
            Some(out) => out,
            None => self.batched_attention(&q, &k, &v, mask)?,
        };
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        Ok(self.o_proj.forward(&out)?)
    }

    /// `softmax(q kᵀ * scale + mask) v` with matmuls; `q` `[b, heads, t, hd]`, `k`/`v`
    /// `[b, kv_heads, s, hd]`; returns `[b, heads, t, hd]`.
    fn batched_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (nkv, s) = (self.num_kv_heads, k.dim(2)?);

        // Grouped-query attention without repeating k/v: the query heads that share a kv
        // head are stacked along the sequence axis, [b, kv_heads, n_rep * t, hd].
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?;
        // CPU: scale, causal mask and softmax fused, in place (`mask` is the causal mask of the
        // same positions: query i at s - t + i).
        if let Some(probs) = causal_softmax(scores.clone(), self.scale as f32, t, s - t)? {
            return Ok(probs.matmul(v)?.reshape((b, nh, t, hd))?);
        }
        let scores = (scores * self.scale)?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, nkv, n_rep, t, s))?
                .broadcast_add(m)?
                .reshape((b, nkv, n_rep * t, s))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(v)?.reshape((b, nh, t, hd))?)
    }
}
