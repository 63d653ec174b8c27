//! Token-for-token agreement with llama.cpp on the recorded reference tokenizations
//! (tests/data, written by scripts/reference/tokenizer_golden.py).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use common::{Golden, golden, unhex};
use shoal_tokenizer::Tokenizer;

/// Checks every case of a golden file and reports all disagreements at once.
fn check(tokenizer: &Tokenizer, golden: &Golden) {
    let mut failures = Vec::new();
    for case in &golden.cases {
        let label = format!(
            "{:?} (add_special={}, parse_special={})",
            case.text, case.add_special, case.parse_special
        );
        match tokenizer.encode(&case.text, case.add_special, case.parse_special) {
            Ok(ids) if ids == case.ids => {}
            Ok(ids) => failures.push(format!(
                "encode {label}:\n  got      {ids:?}\n  expected {:?}",
                case.ids
            )),
            Err(e) => failures.push(format!("encode {label}: error {e}")),
        }
        match tokenizer.decode(&case.ids, false) {
            Ok(text) if text == case.decoded => {}
            other => failures.push(format!(
                "decode {label}: got {other:?}, expected {:?}",
                case.decoded
            )),
        }
        match tokenizer.decode(&case.ids, true) {
            Ok(text) if text == case.decoded_skip_special => {}
            other => failures.push(format!(
                "decode skipping special {label}: got {other:?}, expected {:?}",
                case.decoded_skip_special
            )),
        }
    }
    for (id, hex) in &golden.pieces {
        let expected = unhex(hex);
        match tokenizer.token_bytes(*id) {
            Ok(bytes) if bytes == expected.as_slice() => {}
            other => failures.push(format!(
                "token_bytes({id}): got {other:?}, expected {expected:?}"
            )),
        }
    }
    if tokenizer.end_of_generation_tokens() != golden.eog_ids {
        failures.push(format!(
            "end of generation tokens: got {:?}, expected {:?}",
            tokenizer.end_of_generation_tokens(),
            golden.eog_ids
        ));
    }
    assert!(
        failures.is_empty(),
        "{} disagreement(s) with {}:\n{}",
        failures.len(),
        golden.source,
        failures.join("\n")
    );
}

fn check_bpe(file: &str) {
    let golden = golden(file);
    let tokenizer = Tokenizer::new(golden.bpe_spec()).unwrap();
    check(&tokenizer, &golden);
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_bpe("bpe_smollm.json");
}

#[test]
fn gpt2_pre_tokenizer_matches_llama_cpp() {
    check_bpe("bpe_gpt_2.json");
}

#[test]
fn default_pre_tokenizer_matches_llama_cpp() {
    check_bpe("bpe_default.json");
}

#[test]
fn llama3_pre_tokenizer_matches_llama_cpp() {
    check_bpe("bpe_llama_bpe.json");
}

#[test]
fn qwen2_pre_tokenizer_matches_llama_cpp() {
    check_bpe("bpe_qwen2.json");
}

fn check_spm(file: &str) {
    let golden = golden(file);
    let spec = golden.vocab.as_ref().unwrap().spec();
    let tokenizer = Tokenizer::new(spec).unwrap();
    check(&tokenizer, &golden);
}

#[test]
fn sentencepiece_matches_llama_cpp() {
    check_spm("spm.json");
}

#[test]
fn sentencepiece_without_space_prefix_matches_llama_cpp() {
    check_spm("spm_noprefix.json");
}

#[test]
fn golden_files_tell_the_pre_tokenizers_apart() {
    // Guards the guard: if two pre-tokenizers produced identical goldens, the tests above could
    // not notice one being swapped for the other.
    let files = [
        "bpe_smollm.json",
        "bpe_gpt_2.json",
        "bpe_default.json",
        "bpe_llama_bpe.json",
        "bpe_qwen2.json",
    ];
    let goldens: Vec<Golden> = files.iter().map(|f| golden(f)).collect();
    for (i, a) in goldens.iter().enumerate() {
        for (j, b) in goldens.iter().enumerate().skip(i + 1) {
            let differ = a.cases.iter().zip(&b.cases).any(|(x, y)| x.ids != y.ids);
            assert!(
                differ,
                "{} and {} record identical tokenizations",
                files[i], files[j]
            );
            let tokenizer = Tokenizer::new(a.bpe_spec()).unwrap();
            let disagrees = b.cases.iter().any(|c| {
                tokenizer
                    .encode(&c.text, c.add_special, c.parse_special)
                    .unwrap()
                    != c.ids
            });
            assert!(
                disagrees,
                "the {:?} tokenizer also passes {}",
                a.pre, files[j]
            );
        }
    }
}
