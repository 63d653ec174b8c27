//! Per-sequence KV caches. Keys and values are stored as f16, one contiguous run per layer,
//! position-major (`[pos][kv_head][head_dim]`), growing in chunks so a decode step does not
//! allocate.

use half::f16;

/// Tokens added to a cache's capacity each time it grows.
const GROW_TOKENS: usize = 256;

/// One layer's keys and values for one sequence.
#[derive(Debug, Default)]
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f16>,
    pub(crate) v: Vec<f16>,
}

/// The KV cache of one sequence over the layers of one shard.
#[derive(Debug)]
pub(crate) struct SeqKv {
    pub(crate) layers: Vec<LayerKv>,
    /// Tokens stored.
    pub(crate) len: usize,
    /// Tokens that fit without growing.
    capacity: usize,
    kv_dim: usize,
}

impl SeqKv {
    pub(crate) fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerKv::default()).collect(),
            len: 0,
            capacity: 0,
            kv_dim,
        }
    }

    /// Capacity in tokens needed to hold `tokens`, rounded up to the growth chunk.
    pub(crate) fn capacity_for(tokens: usize) -> usize {
        tokens.div_ceil(GROW_TOKENS) * GROW_TOKENS
    }

    /// Bytes held for `capacity` tokens.
    pub(crate) fn bytes_for(&self, capacity: usize) -> usize {
        self.layers.len() * 2 * capacity * self.kv_dim * std::mem::size_of::<f16>()
    }

    /// Bytes currently held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes_for(self.capacity)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Grows storage to hold `capacity` tokens (a no-op when it already does).
    pub(crate) fn reserve(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        let elems = capacity * self.kv_dim;
        for l in &mut self.layers {
            l.k.resize(elems, f16::ZERO);
            l.v.resize(elems, f16::ZERO);
        }
        self.capacity = capacity;
    }

    /// Forgets every token from `len` on (for rollback); storage is kept.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
