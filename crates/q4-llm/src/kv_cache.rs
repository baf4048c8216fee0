//! Per-layer key/value cache: one pre-allocated buffer per layer, written in place.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

/// Keys and values of every layer, `[batch, kv_heads, positions, head_dim]` each.
///
/// Buffers are allocated for `capacity` positions on first use and grow (by another
/// `capacity`) only when a conversation outlives them, so a decode step copies one position.
/// Every allocation gives the cache a new [`KvCache::generation`]: a captured CUDA decode step
/// (which holds the buffers' addresses) is valid only for the generation it was captured in.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// Positions a buffer holds when first allocated, and what it grows by.
    grow_by: usize,
    generation: u64,
    /// The captured decode step of the CUDA runner (`model::cuda_step`), kept with the
    /// buffers it writes.
    #[cfg(feature = "cuda")]
    pub(crate) cuda_step: Option<crate::model::CudaStepSlot>,
}

#[derive(Clone, Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A clone shares the buffers (as candle tensors do) but not the captured decode step.
impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.clone(),
            grow_by: self.grow_by,
            generation: self.generation,
            #[cfg(feature = "cuda")]
            cuda_step: None,
        }
    }
}

impl KvCache {
    /// A cache for `num_layers` layers sized for `capacity` positions.
    pub fn new(num_layers: usize, capacity: usize) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); num_layers],
            grow_by: capacity.max(1),
            generation: next_generation(),
            #[cfg(feature = "cuda")]
            cuda_step: None,
        }
    }

    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (buffers are dropped too).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerKv::default());
        self.generation = next_generation();
        #[cfg(feature = "cuda")]
        {
            self.cuda_step = None;
        }
    }

    /// Changes whenever a buffer is allocated, grown or dropped.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Positions the buffers hold before they must grow (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map_or(0, |k| k.dims()[2])
    }

    /// Appends `k`, `v` (`[batch, kv_heads, new, head_dim]`, contiguous) to layer `layer` and
    /// returns views of all its keys and values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let (b, heads, _, d) = k.dims4()?;
        self.reserve_layer(layer, (b, heads, d), k.dtype(), k.device(), new)?;
        let l = &mut self.layers[layer];
        let (kb, vb) = (
            l.k.as_ref().expect("reserved"),
            l.v.as_ref().expect("reserved"),
        );
        kb.slice_set(k, 2, l.len)?;
        vb.slice_set(v, 2, l.len)?;
        l.len += new;
        Ok((kb.narrow(2, 0, l.len)?, vb.narrow(2, 0, l.len)?))
    }

    /// Makes room for `extra` more positions in every layer (buffers `[batch, kv_heads, _,
    /// head_dim]` of `dtype` on `device`), allocating or growing them as an append would.
    #[cfg(feature = "cuda")]
    pub(crate) fn reserve(
        &mut self,
        (batch, kv_heads, head_dim): (usize, usize, usize),
        dtype: DType,
        device: &Device,
        extra: usize,
    ) -> candle_core::Result<()> {
        for layer in 0..self.layers.len() {
            self.reserve_layer(layer, (batch, kv_heads, head_dim), dtype, device, extra)?;
        }
        Ok(())
    }

    fn reserve_layer(
        &mut self,
        layer: usize,
        (batch, kv_heads, head_dim): (usize, usize, usize),
        dtype: DType,
        device: &Device,
        extra: usize,
    ) -> candle_core::Result<()> {
        let grow_by = self.grow_by;
        let l = &mut self.layers[layer];
        let fresh = || Tensor::zeros((batch, kv_heads, grow_by, head_dim), dtype, device);
        let mut changed = false;
        if l.k.is_none() {
            l.k = Some(fresh()?);
            l.v = Some(fresh()?);
            changed = true;
        }
        for buf in [&mut l.k, &mut l.v] {
            let t = buf.as_mut().expect("allocated above");
            while l.len + extra > t.dims()[2] {
                *t = Tensor::cat(&[&*t, &fresh()?], 2)?;
                changed = true;
            }
        }
        if changed {
            self.generation = next_generation();
        }
        Ok(())
    }

    /// Layer `layer`'s whole key and value buffers (`[batch, kv_heads, capacity, head_dim]`),
    /// if allocated.
    #[cfg(feature = "cuda")]
    pub(crate) fn buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        let l = &self.layers[layer];
        Some((l.k.as_ref()?, l.v.as_ref()?))
    }

    /// Counts `n` positions written into every layer's buffers by other means (the CUDA
    /// decode step); the caller reserved them.
    #[cfg(feature = "cuda")]
    pub(crate) fn advance(&mut self, n: usize) {
        for l in &mut self.layers {
            l.len += n;
        }
    }

    /// Whether the last CUDA decode step ran as (or was captured into) a CUDA graph for these
    /// buffers (diagnostics and tests).
    #[cfg(feature = "cuda")]
    pub fn decode_graph_captured(&self) -> bool {
        self.cuda_step
            .as_ref()
            .is_some_and(crate::model::CudaStepSlot::has_graph)
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(n: usize, start: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * n * 3).map(|i| start + i as f32).collect();
        Tensor::from_vec(data, (1, 2, n, 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_grow_the_buffers_and_change_the_generation() {
        let mut c = KvCache::new(2, 2);
        let g0 = c.generation();
        let (a, b) = (kv(1, 0.0), kv(2, 100.0));
        c.append(0, &a, &a).unwrap();
        let g1 = c.generation();
        assert_ne!(g0, g1);
        assert_eq!(c.capacity(), 2);
        let (k, _) = c.append(0, &b, &b).unwrap();
        assert_ne!(c.generation(), g1, "growing reallocates");
        assert_eq!(c.capacity(), 4);
        assert_eq!(k.dims(), [1, 2, 3, 3]);
        let want = Tensor::cat(&[&a, &b], 2).unwrap();
        let diff = (k - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // Appending within the capacity keeps the generation.
        let mut c = KvCache::new(1, 8);
        c.append(0, &a, &a).unwrap();
        let g = c.generation();
        c.append(0, &a, &a).unwrap();
        assert_eq!(c.generation(), g);
        c.reset();
        assert_ne!(c.generation(), g);
        assert_eq!((c.len(), c.capacity()), (0, 0));
    }
}
