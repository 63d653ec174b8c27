//! Bit-level fidelity on both architectures: the tiny random-weight models (regenerated here
//! from their seeds) give llama.cpp's logits at every prompt position (tests/golden/, made by
//! scripts/reference/make_synth_golden.py with llama.cpp's classic attention path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use shoal_model::{
    Model, SeqStep, ShardInput, ShardOptions, ShardOutput, ShardRuntime, ThreadPool,
};
use shoal_types::SeqId;
use std::sync::Arc;

fn check(preset: &str) {
    let path = common::repo_root().join(format!("tests/golden/{preset}_logits.json"));
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::preset(preset).unwrap(), &file).unwrap();
    let model = Model::open(&file).unwrap();
    let mut rt = model
        .whole(
            Arc::new(ThreadPool::new(2).unwrap()),
            ShardOptions::default(),
        )
        .unwrap();
    let prompt: Vec<u32> = g["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = &g["logits"];
    let rows: Vec<Vec<f64>> = match logits.as_str() {
        Some(text) => serde_json::from_str(text).unwrap(),
        None => serde_json::from_value(logits.clone()).unwrap(),
    };
    assert_eq!(rows.len(), prompt.len());
    for (pos, &t) in prompt.iter().enumerate() {
        let step = SeqStep {
            seq: SeqId(1),
            pos: pos as u32,
            n_tokens: 1,
            logits: true,
        };
        let ShardOutput::Logits(got) = rt.forward(&[step], ShardInput::Tokens(&[t])).unwrap()
        else {
            panic!("whole model returned hidden states")
        };
        let diff = got
            .iter()
            .zip(&rows[pos])
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-3,
            "{preset}: position {pos} differs from llama.cpp by {diff}"
        );
    }
}

#[test]
fn tiny_llama_matches_llama_cpp_at_every_position() {
    check("tiny_llama");
}

#[test]
fn tiny_qwen2_matches_llama_cpp_at_every_position() {
    check("tiny_qwen2");
}
