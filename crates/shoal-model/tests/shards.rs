//! A model split into layer ranges computes exactly what the whole model computes: the logits
//! of `[0, k) + [k, n)` equal those of `[0, n)` bit for bit, for prefill and decode steps and for
//! batches of several sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use shoal_model::{
    Model, SeqStep, ShardInput, ShardOptions, ShardOutput, ShardRuntime, ThreadPool,
};
use shoal_types::{LayerRange, SeqId};
use std::sync::Arc;

/// Runs `steps` (batch, tokens) through a chain of runtimes; returns the logits of each step.
fn run_chain(
    chain: &mut [Box<dyn ShardRuntime>],
    steps: &[(Vec<SeqStep>, Vec<u32>)],
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for (batch, tokens) in steps {
        let mut hidden: Vec<f32> = Vec::new();
        for (i, rt) in chain.iter_mut().enumerate() {
            let input = if i == 0 {
                ShardInput::Tokens(tokens)
            } else {
                ShardInput::Hidden(&hidden)
            };
            match rt.forward(batch, input).unwrap() {
                ShardOutput::Hidden(h) => hidden = h.to_vec(),
                ShardOutput::Logits(l) => out.push(l.to_vec()),
            }
        }
    }
    out
}

#[test]
fn split_logits_equal_whole_model_logits_bit_for_bit() {
    let model = Model::open(common::default_model_path()).unwrap();
    let n = model.config().n_layers;
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let (a, b) = (SeqId(1), SeqId(2));
    let p1: Vec<u32> = vec![504, 3575, 282, 4649, 314, 7042, 30];
    let p2: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356];
    let mut steps = vec![(
        vec![
            SeqStep {
                seq: a,
                pos: 0,
                n_tokens: 7,
                logits: true,
            },
            SeqStep {
                seq: b,
                pos: 0,
                n_tokens: 7,
                logits: true,
            },
        ],
        [p1.clone(), p2.clone()].concat(),
    )];
    for i in 0..4u32 {
        steps.push((
            vec![
                SeqStep {
                    seq: a,
                    pos: 7 + i,
                    n_tokens: 1,
                    logits: true,
                },
                SeqStep {
                    seq: b,
                    pos: 7 + i,
                    n_tokens: 1,
                    logits: true,
                },
            ],
            vec![100 + i, 200 + i],
        ));
    }
    let whole: Vec<Box<dyn ShardRuntime>> = vec![Box::new(
        model.whole(pool.clone(), ShardOptions::default()).unwrap(),
    )];
    let reference = run_chain(&mut { whole }, &steps);
    for cuts in [
        vec![1],
        vec![15],
        vec![29],
        vec![10, 20],
        vec![6, 12, 18, 24],
    ] {
        let mut bounds = vec![0];
        bounds.extend(&cuts);
        bounds.push(n);
        let mut chain: Vec<Box<dyn ShardRuntime>> = bounds
            .windows(2)
            .map(|w| {
                let range = LayerRange::new(w[0], w[1]).unwrap();
                Box::new(
                    model
                        .shard(range, pool.clone(), ShardOptions::default())
                        .unwrap(),
                ) as Box<dyn ShardRuntime>
            })
            .collect();
        let got = run_chain(&mut chain, &steps);
        assert_eq!(got.len(), reference.len());
        for (s, (g, r)) in got.iter().zip(&reference).enumerate() {
            let same =
                g.len() == r.len() && g.iter().zip(r).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "split at {cuts:?}: step {s} logits differ from the whole model"
            );
        }
    }
}

/// A row's computation does not depend on how its sequence was cut into steps, on the rows it
/// shares a step with, or on the thread count: a prompt prefilled at once, in 128-token chunks
/// beside another sequence, or token by token gives the same logits bit for bit. A generation
/// re-prefilled on another node after a failover therefore continues exactly.
#[test]
fn a_prompt_gives_the_same_logits_at_once_in_chunks_or_token_by_token() {
    let model = Model::open(common::default_model_path()).unwrap();
    let vocab = model.config().vocab;
    let two = Arc::new(ThreadPool::new(2).unwrap());
    let one = Arc::new(ThreadPool::new(1).unwrap());
    // Longer than one attention block of positions and many attention row groups.
    let n = 300u32;
    let prompt: Vec<u32> = (0..n).map(|i| 100 + (i * 7919) % 30000).collect();
    let (a, other) = (SeqId(1), SeqId(2));
    let step = |pos: u32, len: u32| SeqStep {
        seq: a,
        pos,
        n_tokens: len,
        logits: true,
    };
    let last_of_a = |runtime: &mut dyn ShardRuntime, steps: &[(Vec<SeqStep>, Vec<u32>)]| {
        let mut last = Vec::new();
        for (batch, tokens) in steps {
            match runtime.forward(batch, ShardInput::Tokens(tokens)).unwrap() {
                ShardOutput::Logits(l) => last = l[..vocab].to_vec(),
                ShardOutput::Hidden(_) => panic!("a whole model returns logits"),
            }
        }
        last
    };
    let at_once = last_of_a(
        &mut model.whole(two.clone(), ShardOptions::default()).unwrap(),
        &[(vec![step(0, n)], prompt.clone())],
    );
    // 128-token chunks, each beside another sequence's prefill or decode row.
    let mut chunked = Vec::new();
    let mut other_pos = 0;
    for start in (0..n).step_by(128) {
        let len = (n - start).min(128);
        let other_len = if start == 0 { 5 } else { 1 };
        let mut tokens = prompt[start as usize..(start + len) as usize].to_vec();
        tokens.extend((0..other_len).map(|i| 700 + other_pos + i));
        chunked.push((
            vec![
                step(start, len),
                SeqStep {
                    seq: other,
                    pos: other_pos,
                    n_tokens: other_len,
                    logits: true,
                },
            ],
            tokens,
        ));
        other_pos += other_len;
    }
    let in_chunks = last_of_a(
        &mut model.whole(two, ShardOptions::default()).unwrap(),
        &chunked,
    );
    let one_by_one: Vec<_> = (0..n)
        .map(|i| (vec![step(i, 1)], vec![prompt[i as usize]]))
        .collect();
    let token_by_token = last_of_a(
        &mut model.whole(one, ShardOptions::default()).unwrap(),
        &one_by_one,
    );
    let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(at_once.len(), vocab);
    assert_eq!(bits(&in_chunks), bits(&at_once), "chunked prefill");
    assert_eq!(bits(&token_by_token), bits(&at_once), "token by token");
}
