//! Per-layer key/value cache: one pre-allocated buffer per layer, written in place.

use candle_core::Tensor;

/// Keys and values of every layer, `[batch, kv_heads, positions, head_dim]` each.
///
/// Buffers are allocated for `capacity` positions on first use and grow (by another
/// `capacity`) only when a conversation outlives them, so a decode step copies one position.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
}

impl KvCache {
    /// A cache for `num_layers` layers sized for `capacity` positions.
    pub fn new(num_layers: usize, capacity: usize) -> KvCache {
        let capacity = capacity.max(1);
        KvCache {
            layers: (0..num_layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity))
                .collect(),
        }
    }

    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (buffers are dropped too).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
    }

    /// Appends `k`, `v` (`[batch, kv_heads, new, head_dim]`, contiguous) to layer `layer` and
    /// returns views of all its keys and values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.layers[layer].append(k, v)
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
