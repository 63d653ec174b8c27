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

/// The keys and values of one sequence at positions `[start, start + tokens.len())` over a
/// layer range, with the token ids that produced them: what a checkpoint carries to a peer so
/// a generation can continue there without recomputing its prefix.
///
/// KV entries depend on the token at their position and on every token before it, so a
/// snapshot is only valid after exactly the tokens it was made from; [`KvSnapshot::tokens`]
/// lets the importer check that (see [`KvSnapshot::matching_prefix`]).
#[derive(Clone, PartialEq)]
pub struct KvSnapshot {
    /// The layers the entries belong to.
    pub layers: shoal_types::LayerRange,
    /// Floats per position in one layer's keys (and values): KV heads times head size.
    pub kv_dim: usize,
    /// Position of the first entry.
    pub start: u32,
    /// The token at each position covered.
    pub tokens: Vec<u32>,
    /// Per layer, in order: keys then values, `tokens.len() * kv_dim` each, position-major.
    pub kv: Vec<(Vec<f16>, Vec<f16>)>,
}

impl std::fmt::Debug for KvSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSnapshot")
            .field("layers", &self.layers)
            .field("kv_dim", &self.kv_dim)
            .field("start", &self.start)
            .field("positions", &self.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl KvSnapshot {
    /// An empty snapshot starting at `start`.
    pub fn empty(layers: shoal_types::LayerRange, kv_dim: usize, start: u32) -> Self {
        Self {
            layers,
            kv_dim,
            start,
            tokens: Vec::new(),
            kv: (0..layers.len())
                .map(|_| (Vec::new(), Vec::new()))
                .collect(),
        }
    }

    /// Positions covered.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it covers no position.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The position after the last one covered.
    pub fn end(&self) -> u32 {
        self.start.saturating_add(self.tokens.len() as u32)
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers.len() as usize * 2 * self.len() * self.kv_dim * std::mem::size_of::<f16>()
    }

    /// Checks that the entries have the sizes the layer range, `kv_dim` and token count imply.
    pub fn check(&self) -> Result<(), crate::ModelError> {
        let bad = |m: String| Err(crate::ModelError::Snapshot(m));
        if self.kv.len() != self.layers.len() as usize {
            return bad(format!(
                "{} layers of entries for range {}",
                self.kv.len(),
                self.layers
            ));
        }
        let want = self.len() * self.kv_dim;
        if let Some((i, _)) = self
            .kv
            .iter()
            .enumerate()
            .find(|(_, (k, v))| k.len() != want || v.len() != want)
        {
            return bad(format!(
                "layer {} holds the wrong number of entries for {} positions of {}",
                self.layers.start() + i as u32,
                self.len(),
                self.kv_dim
            ));
        }
        if u64::from(self.start) + self.len() as u64 > u64::from(u32::MAX) {
            return bad("positions overflow".into());
        }
        Ok(())
    }

    /// Appends `next`, which must continue this snapshot (same layers and width, starting at
    /// [`KvSnapshot::end`]).
    pub fn append(&mut self, next: KvSnapshot) -> Result<(), crate::ModelError> {
        next.check()?;
        if next.layers != self.layers || next.kv_dim != self.kv_dim {
            return Err(crate::ModelError::Snapshot(format!(
                "entries for {} × {} do not continue a snapshot of {} × {}",
                next.layers, next.kv_dim, self.layers, self.kv_dim
            )));
        }
        if next.start != self.end() {
            return Err(crate::ModelError::Snapshot(format!(
                "entries from position {} do not continue a snapshot ending at {}",
                next.start,
                self.end()
            )));
        }
        self.tokens.extend_from_slice(&next.tokens);
        for ((k, v), (nk, nv)) in self.kv.iter_mut().zip(next.kv) {
            k.extend_from_slice(&nk);
            v.extend_from_slice(&nv);
        }
        Ok(())
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        self.tokens.truncate(len);
        let n = len * self.kv_dim;
        for (k, v) in &mut self.kv {
            k.truncate(n);
            v.truncate(n);
        }
    }

    /// Positions `[from, from + len)` of this snapshot (relative to its start), as a snapshot.
    pub fn slice(&self, from: usize, len: usize) -> KvSnapshot {
        let from = from.min(self.len());
        let len = len.min(self.len() - from);
        let (a, b) = (from * self.kv_dim, (from + len) * self.kv_dim);
        KvSnapshot {
            layers: self.layers,
            kv_dim: self.kv_dim,
            start: self.start + from as u32,
            tokens: self.tokens[from..from + len].to_vec(),
            kv: self
                .kv
                .iter()
                .map(|(k, v)| (k[a..b].to_vec(), v[a..b].to_vec()))
                .collect(),
        }
    }

    /// How many leading positions of this snapshot (which must start at 0) hold exactly the
    /// tokens of `sequence`: the part a sequence with those tokens can import.
    pub fn matching_prefix(&self, sequence: &[u32]) -> usize {
        if self.start != 0 {
            return 0;
        }
        self.tokens
            .iter()
            .zip(sequence)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The entries as little-endian bytes: per layer, keys then values.
    pub fn kv_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes());
        for (k, v) in &self.kv {
            for x in k.iter().chain(v) {
                out.extend_from_slice(&x.to_bits().to_le_bytes());
            }
        }
        out
    }

    /// A snapshot from [`KvSnapshot::kv_bytes`]'s layout.
    pub fn from_kv_bytes(
        layers: shoal_types::LayerRange,
        kv_dim: usize,
        start: u32,
        tokens: Vec<u32>,
        bytes: &[u8],
    ) -> Result<Self, crate::ModelError> {
        // Sizes come from a peer: an overflow is a mismatch, and no positions means nothing
        // to build (a layer range of millions would otherwise cost that many empty vectors).
        let per = tokens.len().checked_mul(kv_dim);
        let want = per.and_then(|p| (layers.len() as usize).checked_mul(p)?.checked_mul(4));
        if tokens.is_empty() || want != Some(bytes.len()) {
            return Err(crate::ModelError::Snapshot(format!(
                "{} bytes of entries do not hold {} positions of {kv_dim} over {layers}",
                bytes.len(),
                tokens.len()
            )));
        }
        let per = tokens.len() * kv_dim;
        let mut halves = bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])));
        let kv = (0..layers.len())
            .map(|_| {
                let k: Vec<f16> = halves.by_ref().take(per).collect();
                let v: Vec<f16> = halves.by_ref().take(per).collect();
                (k, v)
            })
            .collect();
        let snap = Self {
            layers,
            kv_dim,
            start,
            tokens,
            kv,
        };
        snap.check()?;
        Ok(snap)
    }
}
