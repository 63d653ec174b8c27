//! The OpenAI-compatible API over the local engine, through a real HTTP client on loopback:
//! what a client receives equals what the model generates directly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_api::{ApiConfig, ApiState};
use shoal_engine::EngineConfig;
use shoal_model::{
    ChatMessage, GenerateOptions, Model, Prompt, SamplingParams, ShardOptions, ThreadPool,
};
use shoal_node::{LocalBackend, LocalBackendConfig};
use shoal_types::{ModelId, SeqId};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

struct Server {
    base: String,
    model: Arc<Model>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &path).unwrap();
    let model = Arc::new(Model::open(&path).unwrap());
    let cfg = LocalBackendConfig {
        model_id: ModelId::new("tiny"),
        threads: 1,
        engine: EngineConfig::default(),
        default_max_tokens: 16,
    };
    let backend = Arc::new(LocalBackend::start(model.clone(), cfg).unwrap());
    let stop = CancellationToken::new();
    let state = ApiState::try_new(ApiConfig::default(), backend, stop.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(shoal_api::serve(
        listener,
        shoal_api::router(state),
        stop.clone(),
    ));
    Server {
        base,
        model,
        stop,
        _dir: dir,
    }
}

/// What the model itself generates for a chat, greedily.
fn direct(model: &Model, user: &str, max_tokens: u32) -> String {
    let prompt = model
        .encode(&Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: user.into(),
        }]))
        .unwrap();
    let mut rt = model
        .whole(
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions::default(),
        )
        .unwrap();
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    shoal_model::generate(&mut rt, model.tokenizer(), SeqId(1), &prompt, &opts, |_| {
        true
    })
    .unwrap()
    .text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_match_the_model_streamed_or_not() {
    let s = start().await;
    let client = reqwest::Client::new();
    let want = direct(&s.model, "the river and the town", 12);
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "the river and the town"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let resp = tokio::time::timeout(
        WAIT,
        client
            .post(format!("{}/v1/chat/completions", s.base))
            .json(&body)
            .send(),
    )
    .await
    .expect("non-streamed completion hung")
    .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        want
    );
    assert_eq!(v["usage"]["completion_tokens"], 12);

    let mut stream_body = body.clone();
    stream_body["stream"] = true.into();
    stream_body["stream_options"] = serde_json::json!({"include_usage": true});
    let text = tokio::time::timeout(WAIT, async {
        client
            .post(format!("{}/v1/chat/completions", s.base))
            .json(&stream_body)
            .send()
            .await
            .unwrap()
            .text()
            .await
    })
    .await
    .expect("streamed completion hung")
    .unwrap();
    let mut content = String::new();
    let mut usage = None;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(delta);
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
    }
    assert_eq!(content, want);
    assert_eq!(usage.expect("a usage chunk")["completion_tokens"], 12);
    assert!(text.trim_end().ends_with("data: [DONE]"));
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_oversized_requests_are_refused() {
    let s = start().await;
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let c = client.clone();
        let url = format!("{}/v1/chat/completions", s.base);
        async move {
            tokio::time::timeout(WAIT, c.post(url).json(&body).send())
                .await
                .expect("request hung")
                .unwrap()
        }
    };
    let r =
        post(serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
            .await;
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");

    let context = s.model.config().context_length;
    let r = post(serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": context})).await;
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "context_length_exceeded");

    let long = "the river ".repeat(context as usize);
    let r =
        post(serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": long}]}))
            .await;
    assert_eq!(r.status(), 400);
    s.stop.cancel();
}
