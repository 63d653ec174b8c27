//! Writing a synthetic model: metadata as llama.cpp expects it, then each tensor generated,
//! quantized and streamed to disk in row chunks on all cores. Memory stays at a few chunks
//! whatever the model size, and the bytes do not depend on the thread count.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use shoal_gguf::{GgufWriter, TensorStream};

use crate::vocab::{CHATML_TEMPLATE, ENDOFTEXT_ID, build_vocab};
use crate::weights::{TensorPlan, fill_row, tensor_plan};
use crate::{SynthError, SynthSpec};

/// Target bytes of quantized output per worker per chunk.
const CHUNK_BYTES: usize = 4 << 20;

/// The metadata and tensor declarations of `spec`, ready to stream.
pub fn gguf_skeleton(spec: &SynthSpec) -> Result<(GgufWriter, Vec<TensorPlan>), SynthError> {
    spec.validate()?;
    let arch = spec.arch.name();
    let mut w = GgufWriter::new();
    let mut kv = |key: String, value: shoal_gguf::MetaValue| w.add_metadata(key, value);
    let u = |n: usize| shoal_gguf::MetaValue::U32(n as u32);
    kv("general.architecture".into(), arch.into())?;
    kv("general.name".into(), spec.name.as_str().into())?;
    kv(format!("{arch}.context_length"), u(spec.context_length))?;
    kv(format!("{arch}.embedding_length"), u(spec.hidden))?;
    kv(format!("{arch}.block_count"), u(spec.n_layers))?;
    kv(format!("{arch}.feed_forward_length"), u(spec.ffn))?;
    kv(format!("{arch}.attention.head_count"), u(spec.n_heads))?;
    kv(
        format!("{arch}.attention.head_count_kv"),
        u(spec.n_kv_heads),
    )?;
    kv(format!("{arch}.rope.dimension_count"), u(spec.head_dim()))?;
    kv(format!("{arch}.rope.freq_base"), spec.rope_base.into())?;
    kv(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        spec.rms_norm_eps.into(),
    )?;
    kv(format!("{arch}.vocab_size"), u(spec.vocab.size()))?;

    let vocab = build_vocab(&spec.vocab);
    kv("tokenizer.ggml.model".into(), "gpt2".into())?;
    kv(
        "tokenizer.ggml.pre".into(),
        spec.arch.tokenizer_pre().into(),
    )?;
    kv("tokenizer.ggml.tokens".into(), vocab.tokens.into())?;
    kv("tokenizer.ggml.token_type".into(), vocab.token_types.into())?;
    kv("tokenizer.ggml.merges".into(), vocab.merges.into())?;
    kv("tokenizer.ggml.bos_token_id".into(), ENDOFTEXT_ID.into())?;
    kv("tokenizer.ggml.eos_token_id".into(), ENDOFTEXT_ID.into())?;
    kv("tokenizer.ggml.add_bos_token".into(), false.into())?;
    kv("tokenizer.chat_template".into(), CHATML_TEMPLATE.into())?;

    let plan = tensor_plan(spec);
    for t in &plan {
        w.declare_tensor(&t.name, t.dtype, &t.dims)?;
    }
    Ok((w, plan))
}

/// Writes the complete model `spec` describes to `path` (replaced if present).
///
/// The file is written next to `path` with a `.partial` suffix and renamed into place only when
/// complete, so an interrupted or failed write never leaves a truncated model behind.
pub fn write_model(spec: &SynthSpec, path: &Path) -> Result<(), SynthError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = write_to(spec, &partial).and_then(|()| {
        std::fs::rename(&partial, path).map_err(|source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        // Best effort: the write error is the one worth reporting.
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn write_to(spec: &SynthSpec, path: &Path) -> Result<(), SynthError> {
    let io_err = |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (writer, plan) = gguf_skeleton(spec)?;
    let file = File::create(path).map_err(io_err)?;
    let mut stream = writer.begin(BufWriter::with_capacity(1 << 20, file))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for t in &plan {
        write_tensor(&mut stream, spec.seed, t, threads)?;
    }
    let file = stream
        .finish()?
        .into_inner()
        .map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)
}

/// Quantizes rows `rows` of `t` into `out`.
fn quantize_rows(
    seed: u64,
    t: &TensorPlan,
    rows: std::ops::Range<usize>,
    out: &mut Vec<u8>,
) -> Result<(), SynthError> {
    let mut row = vec![0.0f32; t.row_len()];
    for r in rows {
        fill_row(seed, t, r, &mut row);
        shoal_kernels::quantize_row(t.dtype, &row, out).map_err(|source| SynthError::Quantize {
            tensor: t.name.clone(),
            dtype: t.dtype,
            source,
        })?;
    }
    Ok(())
}

fn write_tensor<W: Write>(
    stream: &mut TensorStream<W>,
    seed: u64,
    t: &TensorPlan,
    threads: usize,
) -> Result<(), SynthError> {
    let n_rows = t.n_rows();
    let row_bytes = t
        .dtype
        .row_bytes(t.row_len())
        .ok_or_else(|| SynthError::InvalidSpec {
            field: "weight_dtype",
            reason: format!("{} rows are not whole {} blocks", t.name, t.dtype),
        })?;
    let rows_per_worker = (CHUNK_BYTES / row_bytes.max(1)).clamp(1, n_rows.max(1));
    let mut sink = stream.begin_tensor(&t.name)?;
    let mut bufs: Vec<Vec<u8>> = (0..threads).map(|_| Vec::new()).collect();
    let mut next = 0;
    while next < n_rows {
        let ranges: Vec<_> = (0..threads)
            .map(|k| {
                let start = (next + k * rows_per_worker).min(n_rows);
                start..(start + rows_per_worker).min(n_rows)
            })
            .collect();
        next = ranges.last().map_or(n_rows, |r| r.end);
        let results: Vec<Result<(), SynthError>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranges
                .iter()
                .cloned()
                .zip(bufs.iter_mut())
                .filter(|(r, _)| !r.is_empty())
                .map(|(r, buf)| {
                    buf.clear();
                    s.spawn(move || quantize_rows(seed, t, r, buf))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(SynthError::WorkerPanicked)))
                .collect()
        });
        for r in results {
            r?;
        }
        for (range, buf) in ranges.iter().zip(&bufs) {
            if !range.is_empty() {
                sink.write(buf)?;
            }
        }
    }
    sink.finish()?;
    Ok(())
}
