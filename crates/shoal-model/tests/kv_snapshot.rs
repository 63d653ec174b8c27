//! KV snapshots: a sequence's cache exported in pieces, carried as bytes and imported into
//! another runtime continues exactly as the original: the next step's logits are equal bit for
//! bit. Snapshots that do not fit are refused with an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use shoal_model::{
    KvSnapshot, Model, ModelError, SeqStep, ShardInput, ShardOptions, ShardOutput, ShardRuntime,
    ThreadPool,
};
use shoal_types::{LayerRange, SeqId};
use std::sync::Arc;

fn logits(rt: &mut dyn ShardRuntime, seq: SeqId, pos: u32, tokens: &[u32]) -> Vec<f32> {
    let step = SeqStep {
        seq,
        pos,
        n_tokens: tokens.len() as u32,
        logits: true,
    };
    match rt.forward(&[step], ShardInput::Tokens(tokens)).unwrap() {
        ShardOutput::Logits(l) => l.to_vec(),
        ShardOutput::Hidden(_) => panic!("a whole model returns logits"),
    }
}

#[test]
fn an_imported_snapshot_continues_exactly_like_the_original_cache() {
    let model = Model::open(common::default_model_path()).unwrap();
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let whole = LayerRange::full(model.config().n_layers).unwrap();
    let mut a = model
        .shard(whole, pool.clone(), ShardOptions::default())
        .unwrap();
    let mut b = model.shard(whole, pool, ShardOptions::default()).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| 300 + 7 * i).collect();
    let (sa, sb) = (SeqId(1), SeqId(9));
    logits(&mut a, sa, 0, &prompt[..25]);
    logits(&mut a, sa, 25, &prompt[25..]);

    // Two checkpoints (0..32, then 32..40), each through the byte form, joined on arrival.
    let first = a.export_kv(sa, 0, &prompt[..32]).unwrap();
    let second = a.export_kv(sa, 32, &prompt[32..]).unwrap();
    assert_eq!(
        first.bytes(),
        32 * 2 * first.kv_dim * 2 * whole.len() as usize
    );
    let wire = |s: &KvSnapshot| {
        KvSnapshot::from_kv_bytes(s.layers, s.kv_dim, s.start, s.tokens.clone(), &s.kv_bytes())
            .unwrap()
    };
    let mut held = wire(&first);
    held.append(wire(&second)).unwrap();
    assert_eq!(held.len(), 40);
    assert_eq!(held.matching_prefix(&prompt), 40);

    b.import_kv(sb, &held).unwrap();
    assert_eq!(b.seq_len(sb), Some(40));
    let next = [4242u32];
    let expected = logits(&mut a, sa, 40, &next);
    assert_eq!(
        logits(&mut b, sb, 40, &next),
        expected,
        "the imported cache must give the original's logits"
    );

    // Importing only a prefix and prefilling the rest gives the same.
    let mut c = model
        .shard(
            whole,
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions::default(),
        )
        .unwrap();
    let mut part = held.clone();
    part.truncate(30);
    assert_eq!(part.matching_prefix(&prompt), 30);
    c.import_kv(SeqId(3), &part).unwrap();
    logits(&mut c, SeqId(3), 30, &prompt[30..]);
    assert_eq!(logits(&mut c, SeqId(3), 40, &next), expected);
}

#[test]
fn snapshots_that_do_not_fit_are_refused() {
    let model = Model::open(common::default_model_path()).unwrap();
    let n = model.config().n_layers;
    let pool = Arc::new(ThreadPool::new(1).unwrap());
    let mut whole = model
        .shard(
            LayerRange::full(n).unwrap(),
            pool.clone(),
            ShardOptions::default(),
        )
        .unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| 500 + i).collect();
    logits(&mut whole, SeqId(1), 0, &prompt);
    let snap = whole.export_kv(SeqId(1), 0, &prompt).unwrap();

    // Positions that are not cached cannot be exported.
    assert!(matches!(
        whole.export_kv(SeqId(1), 4, &prompt),
        Err(ModelError::Snapshot(_))
    ));
    assert!(matches!(
        whole.export_kv(SeqId(2), 0, &prompt),
        Err(ModelError::Snapshot(_))
    ));
    // Another layer range.
    let mut tail = model
        .shard(
            LayerRange::new(n / 2, n).unwrap(),
            pool.clone(),
            ShardOptions::default(),
        )
        .unwrap();
    assert!(matches!(
        tail.import_kv(SeqId(1), &snap),
        Err(ModelError::Snapshot(_))
    ));
    // Not at the sequence's next position.
    let mut other = model
        .shard(
            LayerRange::full(n).unwrap(),
            pool.clone(),
            ShardOptions::default(),
        )
        .unwrap();
    assert!(matches!(
        other.import_kv(SeqId(1), &snap.slice(4, 8)),
        Err(ModelError::Position {
            expected: 0,
            got: 4,
            ..
        })
    ));
    // Bytes of the wrong length, and entries of the wrong size.
    let bytes = snap.kv_bytes();
    assert!(
        KvSnapshot::from_kv_bytes(snap.layers, snap.kv_dim, 0, prompt.clone(), &bytes[1..])
            .is_err()
    );
    // A chunk of no positions over an absurd layer range (what a rogue peer could send).
    let huge = LayerRange::new(0, u32::MAX).unwrap();
    assert!(KvSnapshot::from_kv_bytes(huge, snap.kv_dim, 0, Vec::new(), &[]).is_err());
    assert!(KvSnapshot::from_kv_bytes(huge, usize::MAX, 0, vec![1; 4], &bytes).is_err());
    let mut broken = snap.clone();
    broken.kv[3].1.pop();
    assert!(matches!(
        other.import_kv(SeqId(1), &broken),
        Err(ModelError::Snapshot(_))
    ));
    // Past the context window.
    let mut small = model
        .shard(
            LayerRange::full(n).unwrap(),
            pool,
            ShardOptions {
                context: Some(8),
                ..ShardOptions::default()
            },
        )
        .unwrap();
    assert!(matches!(
        small.import_kv(SeqId(1), &snap),
        Err(ModelError::ContextOverflow { .. })
    ));
    // A snapshot that continues another must start where it ends.
    let mut head = snap.slice(0, 6);
    assert!(head.append(snap.slice(7, 5)).is_err());
    head.append(snap.slice(6, 6)).unwrap();
    assert_eq!(head, snap);
    // What does fit imports, and nothing was half-imported before.
    other.import_kv(SeqId(1), &snap).unwrap();
    assert_eq!(other.seq_len(SeqId(1)), Some(12));
}
