//! Bad input is a clear error, never a panic: corrupt or inconsistent model files, prompts that
//! are empty or longer than the context, invalid sampling parameters, malformed batches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_gguf::{GgufFile, GgufWriter, MetaValue};
use shoal_model::{
    GenerateOptions, Model, ModelError, SamplingParams, SeqStep, ShardInput, ShardOptions,
    ShardRuntime, ThreadPool,
};
use shoal_synth::SynthSpec;
use shoal_types::{LayerRange, SeqId};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tiny(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    shoal_synth::write_model(&SynthSpec::tiny_llama(), &path).unwrap();
    path
}

/// Copies `src` to `dst` with metadata and tensors edited by the closures.
fn rewrite(
    src: &Path,
    dst: &Path,
    meta: impl Fn(&str, &MetaValue) -> Option<MetaValue>,
    dims: impl Fn(&str, &[u64]) -> Option<Vec<u64>>,
) {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata().iter() {
        if k == "general.alignment" {
            continue;
        }
        if let Some(v) = meta(k, v) {
            w.add_metadata(k, v).unwrap();
        }
    }
    for t in f.tensors() {
        if let Some(d) = dims(&t.name, &t.dims) {
            let data = f.tensor(&t.name).unwrap().data.to_vec();
            let n_old: u64 = t.dims.iter().product();
            let n_new: u64 = d.iter().product();
            // Keep the byte size consistent with the new shape so the container stays valid.
            let data = if n_new == n_old {
                data
            } else {
                vec![0u8; t.dtype.row_bytes(d[0] as usize).unwrap() * (n_new / d[0]) as usize]
            };
            w.add_tensor(&t.name, t.dtype, &d, data).unwrap();
        }
    }
    w.write_file(dst).unwrap();
}

fn open_err(path: &Path) -> ModelError {
    Model::open(path).expect_err("the model must be refused")
}

#[test]
fn corrupt_and_inconsistent_models_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny(dir.path());
    let bad = dir.path().join("bad.gguf");

    // Truncated.
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(open_err(&bad), ModelError::File(_)));
    // Not a GGUF at all.
    std::fs::write(&bad, b"definitely not a model").unwrap();
    assert!(matches!(open_err(&bad), ModelError::File(_)));

    let keep_meta = |_: &str, v: &MetaValue| Some(v.clone());
    let keep_dims = |_: &str, d: &[u64]| Some(d.to_vec());

    rewrite(
        &good,
        &bad,
        |k, v| {
            if k == "general.architecture" {
                Some("gpt9".into())
            } else {
                Some(v.clone())
            }
        },
        keep_dims,
    );
    assert!(matches!(open_err(&bad), ModelError::UnknownArchitecture(a) if a == "gpt9"));

    rewrite(&good, &bad, keep_meta, |n, d| {
        (n != "blk.2.ffn_up.weight").then(|| d.to_vec())
    });
    assert!(
        matches!(open_err(&bad), ModelError::MissingTensor { name } if name == "blk.2.ffn_up.weight")
    );

    rewrite(&good, &bad, keep_meta, |n, d| {
        Some(if n == "blk.1.attn_k.weight" {
            vec![d[0], d[1] * 2]
        } else {
            d.to_vec()
        })
    });
    assert!(
        matches!(open_err(&bad), ModelError::TensorShape { name, .. } if name == "blk.1.attn_k.weight")
    );

    rewrite(
        &good,
        &bad,
        |k, v| {
            if k == "llama.attention.head_count" {
                Some(MetaValue::U32(5))
            } else {
                Some(v.clone())
            }
        },
        keep_dims,
    );
    let err = open_err(&bad);
    assert!(
        matches!(err, ModelError::Metadata(ref m) if m.contains("head_count")),
        "{err}"
    );

    rewrite(
        &good,
        &bad,
        |k, v| (k != "llama.block_count").then(|| v.clone()),
        keep_dims,
    );
    assert!(
        matches!(open_err(&bad), ModelError::File(_)),
        "a missing required key names the key"
    );
    assert!(open_err(&bad).to_string().contains("llama.block_count"));
}

fn runtime(model: &Model) -> shoal_model::CpuShard {
    model
        .whole(
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions::default(),
        )
        .unwrap()
}

#[test]
fn bad_prompts_and_parameters_are_invalid_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(tiny(dir.path())).unwrap();
    let mut rt = runtime(&model);
    let tok = model.tokenizer();
    let run = |rt: &mut shoal_model::CpuShard, prompt: &[u32], opts: &GenerateOptions| {
        shoal_model::generate(rt, tok, SeqId(1), prompt, opts, |_| true)
    };
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };

    let err = run(&mut rt, &[], &opts).unwrap_err();
    assert!(matches!(err, ModelError::InvalidRequest(_)));
    assert_eq!(err.class(), shoal_types::ErrorClass::InvalidRequest);

    let context = model.config().context_length as usize;
    let err = run(&mut rt, &vec![3; context + 5], &opts).unwrap_err();
    assert!(
        matches!(err, ModelError::ContextOverflow { context: c, .. } if c as usize == context),
        "{err}"
    );
    assert_eq!(err.class(), shoal_types::ErrorClass::InvalidRequest);

    let bad = GenerateOptions {
        sampling: SamplingParams {
            temperature: -1.0,
            top_p: 3.0,
            ..Default::default()
        },
        ..opts.clone()
    };
    let err = run(&mut rt, &[3, 4], &bad).unwrap_err().to_string();
    assert!(
        err.contains("temperature") && err.contains("top_p"),
        "{err}"
    );

    let vocab = model.config().vocab as u32;
    assert!(matches!(
        run(&mut rt, &[vocab + 10], &opts),
        Err(ModelError::InvalidRequest(_))
    ));

    // A prompt that fits but leaves little room ends with `length` at the context's end.
    let long = vec![5; context - 3];
    let out = run(
        &mut rt,
        &long,
        &GenerateOptions {
            max_tokens: 50,
            ignore_eos: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(out.finish, shoal_model::FinishReason::Length);
    assert_eq!(rt.kv_bytes(), 0, "the sequence's cache is released");
}

#[test]
fn malformed_batches_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(tiny(dir.path())).unwrap();
    let pool = Arc::new(ThreadPool::new(1).unwrap());
    let n = model.config().n_layers;
    assert!(matches!(
        model.shard(
            LayerRange::new(0, n + 1).unwrap(),
            pool.clone(),
            ShardOptions::default()
        ),
        Err(ModelError::LayerRange(_))
    ));
    let mut first = model
        .shard(
            LayerRange::new(0, 2).unwrap(),
            pool.clone(),
            ShardOptions::default(),
        )
        .unwrap();
    let mut last = model
        .shard(
            LayerRange::new(2, n).unwrap(),
            pool,
            ShardOptions::default(),
        )
        .unwrap();
    let step = |pos, n_tokens| SeqStep {
        seq: SeqId(7),
        pos,
        n_tokens,
        logits: true,
    };
    assert!(matches!(
        first.forward(&[step(0, 2)], ShardInput::Tokens(&[1])),
        Err(ModelError::BadBatch(_))
    ));
    assert!(matches!(
        first.forward(&[step(3, 1)], ShardInput::Tokens(&[1])),
        Err(ModelError::Position { .. })
    ));
    assert!(matches!(
        last.forward(&[step(0, 1)], ShardInput::Tokens(&[1])),
        Err(ModelError::BadBatch(_))
    ));
    assert!(matches!(
        first.forward(&[step(0, 1)], ShardInput::Hidden(&[0.0; 64])),
        Err(ModelError::BadBatch(_))
    ));
    assert!(matches!(
        first.forward(&[step(0, 1), step(0, 1)], ShardInput::Tokens(&[1, 2])),
        Err(ModelError::BadBatch(_))
    ));
    assert!(matches!(
        first.forward(&[], ShardInput::Tokens(&[])),
        Err(ModelError::BadBatch(_))
    ));

    // A KV budget is enforced as capacity exhaustion.
    let mut tight = model
        .whole(
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions {
                kv_budget: Some(1024),
                context: None,
            },
        )
        .unwrap();
    let err = tight
        .forward(&[step(0, 4)], ShardInput::Tokens(&[1, 2, 3, 4]))
        .unwrap_err();
    assert_eq!(err.class(), shoal_types::ErrorClass::CapacityExhausted);
}
