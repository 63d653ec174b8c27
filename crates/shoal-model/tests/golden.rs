//! Fidelity against llama.cpp: on the default model, prompts tokenize identically and greedy
//! continuations match the committed reference (tests/golden/, made by
//! scripts/reference/golden_generate.py) token for token.
//!
//! llama.cpp does not agree with itself across its own settings at near-ties (the reference
//! records divergences of up to 0.67 logits between two of its own configurations). So a
//! generation that departs from the reference must do so at a step where the reference's own
//! top-1/top-2 gap is below that bound, and most generations must match entirely.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::Value;
use shoal_model::{
    ChatMessage, GenerateOptions, Model, Prompt, SamplingParams, ShardOptions, ThreadPool,
};
use shoal_types::SeqId;
use std::sync::Arc;

/// Largest top-1/top-2 gap at which llama.cpp's own configurations were seen to diverge.
const NEAR_TIE: f64 = 0.7;

fn golden() -> Value {
    let path = common::repo_root().join("tests/golden/smollm2-135m-greedy.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("golden file"))
        .expect("golden JSON")
}

fn prompt_of(case: &Value) -> Prompt {
    match case["kind"].as_str().unwrap() {
        "plain" => Prompt::Text(case["prompt"].as_str().unwrap().to_owned()),
        _ => Prompt::Chat(
            case["messages"]
                .as_array()
                .expect("chat cases carry messages")
                .iter()
                .map(|m| ChatMessage {
                    role: m["role"].as_str().unwrap().to_owned(),
                    content: m["content"].as_str().unwrap().to_owned(),
                })
                .collect(),
        ),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn prompts_tokenize_and_render_like_llama_cpp() {
    let model = Model::open(common::default_model_path()).unwrap();
    let g = golden();
    for case in g["prompts"].as_array().unwrap() {
        let prompt = prompt_of(case);
        if let Prompt::Chat(m) = &prompt {
            assert_eq!(
                model.render_chat(m).unwrap(),
                case["rendered"].as_str().unwrap(),
                "{}",
                case["id"]
            );
        }
        assert_eq!(
            model.encode(&prompt).unwrap(),
            ids(&case["prompt_token_ids"]),
            "{}",
            case["id"]
        );
    }
}

#[test]
fn greedy_generations_match_llama_cpp() {
    let model = Model::open(common::default_model_path()).unwrap();
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let mut rt = model.whole(pool, ShardOptions::default()).unwrap();
    let g = golden();
    let cases = g["prompts"].as_array().unwrap();
    let mut exact = 0;
    let mut report = Vec::new();
    for case in cases {
        let prompt = ids(&case["prompt_token_ids"]);
        let want = ids(&case["generated_token_ids"]);
        let opts = GenerateOptions {
            max_tokens: 64,
            sampling: SamplingParams::greedy(),
            ..GenerateOptions::default()
        };
        let got =
            shoal_model::generate(&mut rt, model.tokenizer(), SeqId(1), &prompt, &opts, |_| {
                true
            })
            .unwrap();
        match got.tokens.iter().zip(&want).position(|(a, b)| a != b) {
            None => {
                assert_eq!(
                    got.tokens.len(),
                    want.len(),
                    "{}: same tokens, different length",
                    case["id"]
                );
                exact += 1;
            }
            Some(step) => {
                let gap = case["top1_top2_gap"][step].as_f64().unwrap();
                report.push(format!(
                    "{} diverges at step {step} (reference gap {gap:.4})",
                    case["id"]
                ));
                assert!(
                    gap < NEAR_TIE,
                    "{} diverges at step {step} where llama.cpp's top-2 gap is {gap}: not a near-tie",
                    case["id"]
                );
            }
        }
    }
    eprintln!(
        "{exact}/{} generations identical to llama.cpp; {}",
        cases.len(),
        report.join("; ")
    );
    assert!(
        exact * 4 >= cases.len() * 3,
        "only {exact} of {} generations match: {report:?}",
        cases.len()
    );
}
