//! Chat templates render exactly what Hugging Face transformers (jinja2 with trim_blocks and
//! lstrip_blocks) renders; outputs recorded by scripts/reference/tokenizer_golden.py.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use std::collections::BTreeMap;

use serde::Deserialize;
use shoal_tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
    expected: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ChatGolden {
    templates: BTreeMap<String, String>,
    conversations: BTreeMap<String, Vec<Message>>,
    cases: Vec<Case>,
}

fn load() -> ChatGolden {
    let text = std::fs::read_to_string(common::data_path("chat_template.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn templates_render_like_jinja2() {
    let golden = load();
    let mut failures = Vec::new();
    for case in &golden.cases {
        let template = ChatTemplate::new(&golden.templates[&case.template]).unwrap();
        let messages: Vec<ChatMessage> = golden.conversations[&case.conversation]
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let label = format!(
            "{} / {} / add_generation_prompt={}",
            case.template, case.conversation, case.add_generation_prompt
        );
        let got = template.render(
            &messages,
            case.add_generation_prompt,
            &case.bos_token,
            &case.eos_token,
        );
        match (&got, &case.expected, &case.error) {
            (Ok(text), Some(expected), _) if text == expected => {}
            (Err(TokenizerError::TemplateException { message }), None, Some(error))
                if message == error => {}
            _ => failures.push(format!(
                "{label}:\n  got      {got:?}\n  expected {:?} / error {:?}",
                case.expected, case.error
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_model_ships_the_recorded_smollm2_template() {
    let golden = load();
    let tokenizer = Tokenizer::new(common::smollm_spec(None)).unwrap();
    assert_eq!(
        tokenizer.chat_template(),
        Some(golden.templates["smollm2"].as_str())
    );
}

#[test]
fn smollm2_prompt_tokenizes_with_chat_markers_as_single_tokens() {
    let tokenizer = Tokenizer::new(common::smollm_spec(None)).unwrap();
    let template = ChatTemplate::new(tokenizer.chat_template().unwrap()).unwrap();
    let prompt = template
        .render(&[ChatMessage::new("user", "Hi")], true, "", "")
        .unwrap();
    let ids = tokenizer.encode(&prompt, true, true).unwrap();
    let im_start = tokenizer.token_id("<|im_start|>").unwrap();
    let im_end = tokenizer.token_id("<|im_end|>").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 2);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), prompt);
    assert!(tokenizer.is_end_of_generation(im_end));
}
