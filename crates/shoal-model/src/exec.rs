//! The layer-range executor: runs blocks `[start, end)` of a model for a batch of sequences,
//! each with its own KV cache. The first range embeds tokens; the last applies the final norm
//! and output head. The same code runs a whole model (`[0, n)`) and any pipeline stage, so a
//! split model computes exactly what the whole one does.

use crate::ModelError;
use crate::config::{ModelConfig, RopeStyle};
use crate::kv::SeqKv;
use crate::weights::{LayerWeights, Matrix, ShardWeights};
use shoal_gguf::{GgmlType, GgufFile};
use shoal_kernels::{QuantizedActs, ThreadPool};
use shoal_types::{LayerRange, SeqId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One sequence's share of a batch: `n_tokens` consecutive tokens starting at position `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqStep {
    /// The sequence (its KV cache is created on its first step, at position 0).
    pub seq: SeqId,
    /// Position of the first token; must equal the tokens already cached for the sequence.
    pub pos: u32,
    /// Tokens of this sequence in the batch (rows of the input, in batch order).
    pub n_tokens: u32,
    /// Whether the last stage returns logits for this step's last token.
    pub logits: bool,
}

/// What a range consumes.
#[derive(Debug, Clone, Copy)]
pub enum ShardInput<'a> {
    /// Token ids, one per row (the first range).
    Tokens(&'a [u32]),
    /// Hidden states, `hidden` floats per row (every later range).
    Hidden(&'a [f32]),
}

/// What a range produces. Borrowed from the runtime's reusable buffers.
#[derive(Debug, Clone, Copy)]
pub enum ShardOutput<'a> {
    /// Hidden states after the range's last block, `hidden` floats per input row.
    Hidden(&'a [f32]),
    /// Logits, `vocab` floats for each step that asked for them, in batch order.
    Logits(&'a [f32]),
}

/// A runtime that executes one contiguous range of a model's layers. Implementations own their
/// KV caches; the trait is synchronous and runs on a compute thread.
pub trait ShardRuntime: Send {
    /// The model's shape.
    fn config(&self) -> &ModelConfig;
    /// The layers this runtime executes.
    fn layers(&self) -> LayerRange;
    /// Runs the range for one batch.
    fn forward(
        &mut self,
        batch: &[SeqStep],
        input: ShardInput<'_>,
    ) -> Result<ShardOutput<'_>, ModelError>;
    /// Drops a finished or cancelled sequence's KV cache.
    fn release(&mut self, seq: SeqId);
    /// Tokens cached for `seq`, if it exists.
    fn seq_len(&self, seq: SeqId) -> Option<u32>;
    /// Forgets `seq`'s tokens from position `len` on (rollback).
    fn truncate(&mut self, seq: SeqId, len: u32);
    /// Bytes of KV cache held.
    fn kv_bytes(&self) -> usize;
    /// Copies `seq`'s keys and values at positions `[from, from + tokens.len())`, which must
    /// be cached, labelled with the tokens at those positions (a checkpoint).
    fn export_kv(
        &self,
        seq: SeqId,
        from: u32,
        tokens: &[u32],
    ) -> Result<crate::KvSnapshot, ModelError>;
    /// Appends `snap` to `seq`'s cache (creating the sequence when it starts at 0): the
    /// positions it covers count as computed, and the next step continues after them.
    fn import_kv(&mut self, seq: SeqId, snap: &crate::KvSnapshot) -> Result<(), ModelError>;
}

/// Options for a CPU shard.
#[derive(Debug, Clone, Default)]
pub struct ShardOptions {
    /// Upper bound on KV cache bytes across sequences; `None` for no bound.
    pub kv_budget: Option<usize>,
    /// Context window, at most the model's; `None` for the model's own.
    pub context: Option<u32>,
}

/// Per-thread attention scratch, locked only by its own thread.
#[derive(Debug, Default)]
struct AttnScratch {
    kernel: shoal_kernels::AttnScratch,
    /// One task's queries: for each row, its heads sharing the task's KV head.
    queries: Vec<f32>,
    /// Positions each query sees.
    lens: Vec<usize>,
    /// Results of this thread's tasks, one after the other.
    out: Vec<f32>,
    /// Why a task failed.
    error: Option<shoal_kernels::KernelError>,
}

/// Reusable activation buffers, grown to the largest batch seen.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    rope: Vec<(f32, f32)>,
    /// For each row: (index of its step in the batch, position).
    rows: Vec<(usize, usize)>,
    /// Attention tasks: (first row, row after the last, KV head).
    attn_tasks: Vec<(usize, usize, usize)>,
    acts: QuantizedActs,
    attn: Vec<Mutex<AttnScratch>>,
}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Executes a layer range on the CPU with the shoal kernels.
#[derive(Debug)]
pub struct CpuShard {
    file: Arc<GgufFile>,
    cfg: ModelConfig,
    range: LayerRange,
    weights: ShardWeights,
    pool: Arc<ThreadPool>,
    seqs: HashMap<SeqId, SeqKv>,
    kv_budget: Option<usize>,
    context: u32,
    s: Scratch,
}

impl CpuShard {
    /// Binds `range` of the model in `file`, computing on `pool`.
    pub fn new(
        file: Arc<GgufFile>,
        cfg: ModelConfig,
        range: LayerRange,
        pool: Arc<ThreadPool>,
        opts: ShardOptions,
    ) -> Result<Self, ModelError> {
        let range = range.check_within(cfg.n_layers)?;
        let weights = ShardWeights::bind(&file, &cfg, range)?;
        let context = opts
            .context
            .map_or(cfg.context_length, |c| c.min(cfg.context_length));
        let s = Scratch {
            attn: (0..pool.n_threads())
                .map(|_| Mutex::new(AttnScratch::default()))
                .collect(),
            ..Scratch::default()
        };
        Ok(Self {
            file,
            cfg,
            range,
            weights,
            pool,
            seqs: HashMap::new(),
            kv_budget: opts.kv_budget,
            context,
            s,
        })
    }

    /// The context window this shard enforces.
    pub fn context(&self) -> u32 {
        self.context
    }

    /// Bytes of weights streamed per forward step.
    pub fn weight_bytes(&self) -> usize {
        self.weights.weight_bytes()
    }

    /// Checks the batch against the input and the caches; returns the number of rows.
    fn validate(&self, batch: &[SeqStep], input: &ShardInput<'_>) -> Result<usize, ModelError> {
        if batch.is_empty() {
            return Err(ModelError::BadBatch("empty batch".into()));
        }
        let mut rows = 0usize;
        for (i, st) in batch.iter().enumerate() {
            if st.n_tokens == 0 {
                return Err(ModelError::BadBatch(format!("{} has no tokens", st.seq)));
            }
            if batch[..i].iter().any(|o| o.seq == st.seq) {
                return Err(ModelError::BadBatch(format!("{} appears twice", st.seq)));
            }
            let have = self.seqs.get(&st.seq).map_or(0, |s| s.len as u32);
            if st.pos != have {
                return Err(ModelError::Position {
                    seq: st.seq,
                    expected: have,
                    got: st.pos,
                });
            }
            let needed = st.pos.saturating_add(st.n_tokens);
            if needed > self.context {
                return Err(ModelError::ContextOverflow {
                    seq: st.seq,
                    needed,
                    context: self.context,
                });
            }
            rows += st.n_tokens as usize;
        }
        let h = self.cfg.hidden;
        match *input {
            ShardInput::Tokens(t) => {
                if !self.range.is_first() {
                    return Err(ModelError::BadBatch(format!(
                        "range {} takes hidden states, not tokens",
                        self.range
                    )));
                }
                if t.len() != rows {
                    return Err(ModelError::BadBatch(format!(
                        "{} tokens for {rows} rows",
                        t.len()
                    )));
                }
                if let Some(&bad) = t.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                    return Err(ModelError::InvalidRequest(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.cfg.vocab
                    )));
                }
            }
            ShardInput::Hidden(x) => {
                if self.range.is_first() {
                    return Err(ModelError::BadBatch(format!(
                        "range {} takes tokens",
                        self.range
                    )));
                }
                if x.len() != rows * h {
                    return Err(ModelError::BadBatch(format!(
                        "{} hidden floats for {rows} rows of {h}",
                        x.len()
                    )));
                }
            }
        }
        Ok(rows)
    }

    /// Creates and grows the batch's caches, within the KV budget.
    fn reserve_kv(&mut self, batch: &[SeqStep]) -> Result<(), ModelError> {
        let (n_layers, kv_dim) = (self.range.len() as usize, self.cfg.kv_dim());
        let mut extra = 0usize;
        for st in batch {
            let want = SeqKv::capacity_for((st.pos + st.n_tokens) as usize);
            match self.seqs.get(&st.seq) {
                Some(s) if s.capacity() >= want => {}
                Some(s) => extra += s.bytes_for(want) - s.bytes(),
                None => extra += SeqKv::new(n_layers, kv_dim).bytes_for(want),
            }
        }
        if let Some(budget) = self.kv_budget
            && self.kv_bytes() + extra > budget
        {
            return Err(ModelError::KvBudget { budget });
        }
        for st in batch {
            let want = SeqKv::capacity_for((st.pos + st.n_tokens) as usize);
            self.seqs
                .entry(st.seq)
                .or_insert_with(|| SeqKv::new(n_layers, kv_dim))
                .reserve(want);
        }
        Ok(())
    }
}

impl ShardRuntime for CpuShard {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn layers(&self) -> LayerRange {
        self.range
    }

    fn forward(
        &mut self,
        batch: &[SeqStep],
        input: ShardInput<'_>,
    ) -> Result<ShardOutput<'_>, ModelError> {
        let n = self.validate(batch, &input)?;
        self.reserve_kv(batch)?;
        let cfg = &self.cfg;
        let h = cfg.hidden;
        let s = &mut self.s;
        let bytes = self.file.bytes();

        s.rows.clear();
        for (i, st) in batch.iter().enumerate() {
            s.rows
                .extend((st.pos..st.pos + st.n_tokens).map(|p| (i, p as usize)));
        }
        rope_table(cfg, &s.rows, &mut s.rope);

        let x = grow(&mut s.x, n * h);
        match input {
            ShardInput::Tokens(tokens) => {
                let embed = self
                    .weights
                    .embed
                    .as_ref()
                    .ok_or_else(|| ModelError::BadBatch("no embedding".into()))?;
                let view = embed.view(bytes)?;
                for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
                    shoal_kernels::dequantize_row(embed.dtype, view.row_data(t as usize), row)?;
                }
            }
            ShardInput::Hidden(hidden) => x.copy_from_slice(hidden),
        }

        for (li, lw) in self.weights.layers.iter().enumerate() {
            let ctx = Ctx {
                cfg,
                pool: &self.pool,
                bytes,
            };
            layer_forward(ctx, lw, li, batch, &mut self.seqs, s, n)?;
        }
        for st in batch {
            if let Some(kv) = self.seqs.get_mut(&st.seq) {
                kv.len = (st.pos + st.n_tokens) as usize;
            }
        }

        let (Some(norm), Some(head)) = (&self.weights.output_norm, &self.weights.output) else {
            return Ok(ShardOutput::Hidden(&s.x[..n * h]));
        };
        // Only rows that asked for logits are normalized and go through the output head.
        let xn = grow(&mut s.xn, n * h);
        let mut m = 0;
        let mut end = 0usize;
        for st in batch {
            end += st.n_tokens as usize;
            if st.logits {
                let (dst, src) = (m * h, (end - 1) * h);
                rms_norm(
                    &s.x[src..src + h],
                    norm,
                    cfg.norm_eps,
                    &mut xn[dst..dst + h],
                );
                m += 1;
            }
        }
        if m == 0 {
            return Ok(ShardOutput::Logits(&[]));
        }
        let logits = grow(&mut s.logits, m * cfg.vocab);
        s.acts
            .quantize(&self.pool, head.dtype, &xn[..m * h], m, h)?;
        shoal_kernels::matmul(&self.pool, &head.view(bytes)?, &s.acts, logits)?;
        Ok(ShardOutput::Logits(&s.logits[..m * cfg.vocab]))
    }

    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn seq_len(&self, seq: SeqId) -> Option<u32> {
        self.seqs.get(&seq).map(|s| s.len as u32)
    }

    fn truncate(&mut self, seq: SeqId, len: u32) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.truncate(len as usize);
        }
    }

    fn kv_bytes(&self) -> usize {
        self.seqs.values().map(SeqKv::bytes).sum()
    }

    fn export_kv(
        &self,
        seq: SeqId,
        from: u32,
        tokens: &[u32],
    ) -> Result<crate::KvSnapshot, ModelError> {
        let kv = self
            .seqs
            .get(&seq)
            .ok_or_else(|| ModelError::Snapshot(format!("{seq} has no cache to export")))?;
        let (a, n) = (from as usize, tokens.len());
        if a + n > kv.len {
            return Err(ModelError::Snapshot(format!(
                "{seq} caches {} positions; positions {a}..{} were asked for",
                kv.len,
                a + n
            )));
        }
        let d = self.cfg.kv_dim();
        let (lo, hi) = (a * d, (a + n) * d);
        Ok(crate::KvSnapshot {
            layers: self.range,
            kv_dim: d,
            start: from,
            tokens: tokens.to_vec(),
            kv: kv
                .layers
                .iter()
                .map(|l| (l.k[lo..hi].to_vec(), l.v[lo..hi].to_vec()))
                .collect(),
        })
    }

    fn import_kv(&mut self, seq: SeqId, snap: &crate::KvSnapshot) -> Result<(), ModelError> {
        snap.check()?;
        let d = self.cfg.kv_dim();
        if snap.layers != self.range || snap.kv_dim != d {
            return Err(ModelError::Snapshot(format!(
                "entries for layers {} × {} do not fit a runtime of layers {} × {d}",
                snap.layers, snap.kv_dim, self.range
            )));
        }
        if snap.is_empty() {
            return Ok(());
        }
        // The same checks and growth a forward step over these positions would make.
        let step = SeqStep {
            seq,
            pos: snap.start,
            n_tokens: snap.len() as u32,
            logits: false,
        };
        let have = self.seqs.get(&seq).map_or(0, |s| s.len as u32);
        if have != snap.start {
            return Err(ModelError::Position {
                seq,
                expected: have,
                got: snap.start,
            });
        }
        let needed = snap.end();
        if needed > self.context {
            return Err(ModelError::ContextOverflow {
                seq,
                needed,
                context: self.context,
            });
        }
        self.reserve_kv(&[step])?;
        let kv = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| ModelError::Snapshot(format!("{seq} has no cache")))?;
        let (lo, hi) = (snap.start as usize * d, needed as usize * d);
        for (l, (k, v)) in kv.layers.iter_mut().zip(&snap.kv) {
            l.k[lo..hi].copy_from_slice(k);
            l.v[lo..hi].copy_from_slice(v);
        }
        kv.len = needed as usize;
        Ok(())
    }
}

/// RMSNorm with the weight applied. The sum of squares is accumulated in f64, as the reference
/// implementation does, so results agree to the last bit more often.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * scale) * g;
    }
}

/// Cosines and sines for every row's position: `rope_dims / 2` pairs per row. The angle for
/// pair `i` is `pos * base^(-2i/d)`, built by repeated multiplication in f32 like the reference.
fn rope_table(cfg: &ModelConfig, rows: &[(usize, usize)], out: &mut Vec<(f32, f32)>) {
    let pairs = cfg.rope_dims / 2;
    out.clear();
    let theta_scale = cfg.rope_base.powf(-2.0 / cfg.rope_dims as f32);
    for &(_, pos) in rows {
        let mut theta = pos as f32;
        for _ in 0..pairs {
            out.push((theta.cos(), theta.sin()));
            theta *= theta_scale;
        }
    }
}

fn apply_rope(style: RopeStyle, v: &mut [f32], table: &[(f32, f32)], rope_dims: usize) {
    let half = rope_dims / 2;
    for (i, &(c, s)) in table.iter().enumerate() {
        let (a, b) = match style {
            RopeStyle::Adjacent => (2 * i, 2 * i + 1),
            RopeStyle::Halves => (i, i + half),
        };
        let (x0, x1) = (v[a], v[b]);
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
    }
}

fn add_bias(x: &mut [f32], bias: Option<&Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
}

/// What every step of a forward pass reads: the shape, the compute pool, the weights' bytes.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    cfg: &'a ModelConfig,
    pool: &'a ThreadPool,
    bytes: &'a [u8],
}

/// `out = w · xs` for `n` rows, quantizing the activations for `w`'s type unless they already are.
fn project(
    ctx: Ctx<'_>,
    acts: &mut QuantizedActs,
    quantized_for: &mut Option<GgmlType>,
    w: &Matrix,
    xs: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), ModelError> {
    if *quantized_for != Some(w.dtype) {
        acts.quantize(ctx.pool, w.dtype, xs, n, w.cols)?;
        *quantized_for = Some(w.dtype);
    }
    shoal_kernels::matmul(ctx.pool, &w.view(ctx.bytes)?, acts, out)?;
    Ok(())
}

/// One transformer block over the batch's `n` rows in `s.x`.
fn layer_forward(
    ctx: Ctx<'_>,
    lw: &LayerWeights,
    li: usize,
    batch: &[SeqStep],
    seqs: &mut HashMap<SeqId, SeqKv>,
    s: &mut Scratch,
    n: usize,
) -> Result<(), ModelError> {
    let cfg = ctx.cfg;
    let (h, kvd, hd) = (cfg.hidden, cfg.kv_dim(), cfg.head_dim);
    let pairs = cfg.rope_dims / 2;

    // Attention.
    let xn = grow(&mut s.xn, n * h);
    for (src, dst) in s.x[..n * h].chunks_exact(h).zip(xn.chunks_exact_mut(h)) {
        rms_norm(src, &lw.attn_norm, cfg.norm_eps, dst);
    }
    let mut qf = None;
    let q = grow(&mut s.q, n * h);
    project(ctx, &mut s.acts, &mut qf, &lw.wq, xn, n, q)?;
    let k = grow(&mut s.k, n * kvd);
    project(ctx, &mut s.acts, &mut qf, &lw.wk, xn, n, k)?;
    let v = grow(&mut s.v, n * kvd);
    project(ctx, &mut s.acts, &mut qf, &lw.wv, xn, n, v)?;
    add_bias(q, lw.bq.as_ref());
    add_bias(k, lw.bk.as_ref());
    add_bias(v, lw.bv.as_ref());
    for r in 0..n {
        let table = &s.rope[r * pairs..(r + 1) * pairs];
        for head in q[r * h..(r + 1) * h].chunks_exact_mut(hd) {
            apply_rope(cfg.rope_style, head, table, cfg.rope_dims);
        }
        for head in k[r * kvd..(r + 1) * kvd].chunks_exact_mut(hd) {
            apply_rope(cfg.rope_style, head, table, cfg.rope_dims);
        }
    }
    // Append this step's keys and values to each sequence's cache.
    for (r, &(bi, pos)) in s.rows.iter().enumerate() {
        let Some(kv) = seqs.get_mut(&batch[bi].seq) else {
            return Err(ModelError::BadBatch(format!(
                "{} has no cache",
                batch[bi].seq
            )));
        };
        let layer = &mut kv.layers[li];
        shoal_kernels::f32_to_f16(
            &k[r * kvd..(r + 1) * kvd],
            &mut layer.k[pos * kvd..(pos + 1) * kvd],
        );
        shoal_kernels::f32_to_f16(
            &v[r * kvd..(r + 1) * kvd],
            &mut layer.v[pos * kvd..(pos + 1) * kvd],
        );
    }
    attention(ctx, li, batch, seqs, s, n)?;

    let mut of = None;
    let tmp = grow(&mut s.tmp, n * h);
    project(ctx, &mut s.acts, &mut of, &lw.wo, &s.att[..n * h], n, tmp)?;
    for (x, &t) in s.x[..n * h].iter_mut().zip(tmp.iter()) {
        *x += t;
    }

    // Feed-forward (SwiGLU).
    let xn = grow(&mut s.xn, n * h);
    for (src, dst) in s.x[..n * h].chunks_exact(h).zip(xn.chunks_exact_mut(h)) {
        rms_norm(src, &lw.ffn_norm, cfg.norm_eps, dst);
    }
    let mut ff = None;
    let gate = grow(&mut s.gate, n * cfg.ffn);
    project(ctx, &mut s.acts, &mut ff, &lw.gate, xn, n, gate)?;
    let up = grow(&mut s.up, n * cfg.ffn);
    project(ctx, &mut s.acts, &mut ff, &lw.up, xn, n, up)?;
    for (g, &u) in gate.iter_mut().zip(up.iter()) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    let mut df = None;
    let tmp = grow(&mut s.tmp, n * h);
    project(ctx, &mut s.acts, &mut df, &lw.down, gate, n, tmp)?;
    for (x, &t) in s.x[..n * h].iter_mut().zip(tmp.iter()) {
        *x += t;
    }
    Ok(())
}

/// Rows of one sequence attended together: their keys and values are read once for all of
/// them (times the query heads sharing a KV head).
const ATTN_ROWS: usize = 16;

/// Causal attention for every row and head, spread over the pool: one task per KV head and run
/// of up to [`ATTN_ROWS`] rows of a sequence. Scores use f16 keys against the query rounded to
/// f16, softmax weights are rounded to f16 before weighting the f16 values: the precision the
/// reference implementation computes with. A row's result does not depend on the rows it
/// shares a step with.
fn attention(
    ctx: Ctx<'_>,
    li: usize,
    batch: &[SeqStep],
    seqs: &HashMap<SeqId, SeqKv>,
    s: &mut Scratch,
    n: usize,
) -> Result<(), ModelError> {
    let (cfg, pool) = (ctx.cfg, ctx.pool);
    let (h, kvd, hd) = (cfg.hidden, cfg.kv_dim(), cfg.head_dim);
    let group = cfg.n_heads / cfg.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Every sequence's cache exists (created by `reserve_kv`); checked here so workers need not.
    if let Some(st) = batch.iter().find(|st| !seqs.contains_key(&st.seq)) {
        return Err(ModelError::BadBatch(format!("{} has no cache", st.seq)));
    }
    let rows = &s.rows[..n];
    let tasks = &mut s.attn_tasks;
    tasks.clear();
    let mut r0 = 0;
    while r0 < n {
        let mut r1 = r0 + 1;
        while r1 < n && r1 - r0 < ATTN_ROWS && rows[r1].0 == rows[r0].0 {
            r1 += 1;
        }
        tasks.extend((0..cfg.n_kv_heads).map(|kvh| (r0, r1, kvh)));
        r0 = r1;
    }
    let tasks = &s.attn_tasks;
    let q = &s.q[..n * h];
    pool.run(|t, nt| {
        let Ok(mut guard) = s.attn[t].lock() else {
            return;
        };
        let AttnScratch {
            kernel,
            queries,
            lens,
            out,
            error,
        } = &mut *guard;
        out.clear();
        *error = None;
        for &(r0, r1, kvh) in tasks.iter().skip(t).step_by(nt) {
            let Some(kv) = seqs.get(&batch[rows[r0].0].seq) else {
                return;
            };
            let layer = &kv.layers[li];
            queries.clear();
            lens.clear();
            for &(_, pos) in &rows[r0..r1] {
                lens.extend(std::iter::repeat_n(pos + 1, group));
            }
            for r in r0..r1 {
                let heads = r * h + kvh * group * hd;
                queries.extend_from_slice(&q[heads..heads + group * hd]);
            }
            let start = out.len();
            out.resize(start + queries.len(), 0.0);
            let head = shoal_kernels::KvHead {
                keys: &layer.k[kvh * hd..],
                values: &layer.v[kvh * hd..],
                stride: kvd,
                dim: hd,
            };
            if let Err(e) =
                shoal_kernels::attend(head, queries, lens, scale, &mut out[start..], kernel)
            {
                *error = Some(e);
                return;
            }
        }
    });
    // Scatter each thread's outputs back into place: thread t did tasks t, t+nt, t+2nt, ...
    let nt = pool.n_threads();
    let att = grow(&mut s.att, n * h);
    for (t, m) in s.attn.iter().enumerate() {
        let mut guard = m
            .lock()
            .map_err(|_| ModelError::BadBatch("attention worker panicked".into()))?;
        if let Some(e) = guard.error.take() {
            return Err(e.into());
        }
        let mut done = guard.out.chunks_exact(group * hd);
        for &(r0, r1, kvh) in s.attn_tasks.iter().skip(t).step_by(nt) {
            for r in r0..r1 {
                let heads = r * h + kvh * group * hd;
                let Some(chunk) = done.next() else {
                    return Err(ModelError::BadBatch("an attention task did not run".into()));
                };
                att[heads..heads + group * hd].copy_from_slice(chunk);
            }
        }
    }
    Ok(())
}
