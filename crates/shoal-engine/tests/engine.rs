//! The engine against real (random-weight) models: batched generations equal one-at-a-time
//! generations, cancellation and dropped receivers free KV caches, full queues refuse work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_engine::{
    CheckpointSink, Downstream, Engine, EngineConfig, EngineError, EngineEvent, EngineRequest,
    HeadStep, Opened, TailEvent, TailSender,
};
use shoal_model::{
    FinishReason, GenerateOptions, Model, Sampler, SamplingParams, SeqStep, ShardInput,
    ShardOptions, ShardOutput, ShardRuntime, ThreadPool,
};
use shoal_synth::SynthSpec;
use shoal_types::{LayerRange, RequestId, SeqId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

fn tiny_model(dir: &tempfile::TempDir, spec: SynthSpec) -> Model {
    let path = dir.path().join("tiny.gguf");
    shoal_synth::write_model(&spec, &path).unwrap();
    Model::open(&path).unwrap()
}

fn engine(model: &Model, cfg: EngineConfig) -> Engine {
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let rt = model.whole(pool, ShardOptions::default()).unwrap();
    Engine::start(Box::new(rt), model.tokenizer().clone(), cfg).unwrap()
}

fn request(i: usize, prompt: Vec<u32>, max_tokens: u32, sampling: SamplingParams) -> EngineRequest {
    EngineRequest {
        id: RequestId::new(format!("req-{i}")),
        prompt,
        options: GenerateOptions {
            max_tokens,
            sampling,
            ignore_eos: true,
            ..GenerateOptions::default()
        },
        resume: Vec::new(),
        route: None,
        restore: None,
        checkpoint: None,
    }
}

/// Collects a request's events until it ends; returns the token ids and the final event.
async fn collect(mut rx: mpsc::Receiver<EngineEvent>) -> (Vec<u32>, EngineEvent) {
    let mut ids = Vec::new();
    loop {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("engine event timed out")
            .expect("channel open");
        match ev {
            EngineEvent::Started { .. } | EngineEvent::Progress { .. } => {}
            EngineEvent::Token { id, .. } => ids.push(id),
            other => return (ids, other),
        }
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| {
            (0..(5 + i * 7))
                .map(|j| (3 + (i * 31 + j * 17) % 250) as u32)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generations_equal_sequential_ones() {
    let dir = tempfile::tempdir().unwrap();
    for spec in [SynthSpec::tiny_llama(), SynthSpec::tiny_qwen2()] {
        let model = tiny_model(&dir, spec);
        let samplings = [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 0.9,
                seed: 7,
                ..Default::default()
            },
        ];
        // Reference: each prompt alone through the single-sequence loop.
        let pool = Arc::new(ThreadPool::new(2).unwrap());
        let mut rt = model.whole(pool, ShardOptions::default()).unwrap();
        let mut expected = Vec::new();
        for (i, p) in prompts().iter().enumerate() {
            let opts = GenerateOptions {
                max_tokens: 24,
                sampling: samplings[i % 2].clone(),
                ignore_eos: true,
                ..GenerateOptions::default()
            };
            let g = shoal_model::generate(&mut rt, model.tokenizer(), SeqId(9), p, &opts, |_| true)
                .unwrap();
            expected.push(g.tokens);
        }
        // All at once through the engine, with a small step budget so prefill is chunked.
        let eng = engine(
            &model,
            EngineConfig {
                step_tokens: 16,
                ..EngineConfig::default()
            },
        );
        let rxs: Vec<_> = prompts()
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                eng.submit(
                    request(i, p, 24, samplings[i % 2].clone()),
                    CancellationToken::new(),
                )
                .unwrap()
            })
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let (ids, last) = collect(rx).await;
            assert_eq!(ids, expected[i], "request {i} differs when batched");
            match last {
                EngineEvent::Finished { reason, usage, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    assert_eq!(usage.completion_tokens, 24);
                    assert_eq!(usage.prompt_tokens as usize, prompts()[i].len());
                }
                other => panic!("request {i} ended with {other:?}"),
            }
        }
        assert!(
            eng.stats().steps.load(Ordering::Relaxed) < 6 * 24,
            "requests were not batched together"
        );
        // Every step is counted once in the batch-size histogram, and some ran several
        // sequences at once.
        let batches = eng.stats().batch_sequences.snapshot();
        assert_eq!(batches.count(), eng.stats().steps.load(Ordering::Relaxed));
        assert!(batches.sum > batches.count(), "{batches:?}");
        wait_idle(&eng, 6).await;
    }
}

/// Waits until `finished` requests have ended and nothing holds a KV cache.
async fn wait_idle(eng: &Engine, finished: u64) {
    tokio::time::timeout(WAIT, async {
        let s = eng.stats();
        while s.finished.load(Ordering::Relaxed) < finished
            || s.kv_bytes.load(Ordering::Relaxed) != 0
            || s.active.load(Ordering::Relaxed) != 0
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("KV caches were not freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_or_dropping_frees_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    let eng = engine(&model, EngineConfig::default());
    let cancel = CancellationToken::new();
    let mut rx = eng
        .submit(
            request(0, vec![5, 6, 7], 400, SamplingParams::greedy()),
            cancel.clone(),
        )
        .unwrap();
    // Read a few tokens, then cancel.
    let mut seen = 0;
    while seen < 3 {
        if let EngineEvent::Token { .. } = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            seen += 1;
        }
    }
    assert!(eng.stats().kv_bytes.load(Ordering::Relaxed) > 0);
    cancel.cancel();
    wait_idle(&eng, 1).await;

    // A receiver dropped mid-generation does the same.
    let mut rx = eng
        .submit(
            request(1, vec![5, 6, 7], 400, SamplingParams::greedy()),
            CancellationToken::new(),
        )
        .unwrap();
    while !matches!(
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap(),
        EngineEvent::Token { .. }
    ) {}
    drop(rx);
    wait_idle(&eng, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_full_queues_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    let context = model.config().context_length as usize;
    let eng = engine(
        &model,
        EngineConfig {
            max_active: 1,
            max_waiting: 2,
            ..EngineConfig::default()
        },
    );
    let empty = eng.submit(
        request(0, vec![], 4, SamplingParams::greedy()),
        CancellationToken::new(),
    );
    assert!(matches!(empty, Err(EngineError::Invalid(_))));
    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::greedy()
    };
    assert!(matches!(
        eng.submit(request(0, vec![1], 4, bad), CancellationToken::new()),
        Err(EngineError::Invalid(_))
    ));

    let long = eng.submit(
        request(1, vec![3; context + 1], 4, SamplingParams::greedy()),
        CancellationToken::new(),
    );
    let (_, last) = collect(long.unwrap()).await;
    assert!(
        matches!(last, EngineEvent::Failed(EngineError::Invalid(ref m)) if m.contains("context")),
        "{last:?}"
    );

    // Flood: one runs, two wait in the queue, the rest are refused with Busy.
    let mut accepted = Vec::new();
    let mut busy = 0;
    for i in 0..20 {
        match eng.submit(
            request(i, vec![4, 5], 200, SamplingParams::greedy()),
            CancellationToken::new(),
        ) {
            Ok(rx) => accepted.push(rx),
            Err(EngineError::Busy { .. }) => busy += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(busy > 0, "a full queue must refuse work");
    for rx in accepted {
        let (ids, last) = collect(rx).await;
        assert_eq!(ids.len(), 200);
        assert!(matches!(
            last,
            EngineEvent::Finished {
                reason: FinishReason::Length,
                ..
            }
        ));
    }
}

/// Every event after `Started`, in order.
async fn events(mut rx: mpsc::Receiver<EngineEvent>) -> Vec<EngineEvent> {
    let mut out = Vec::new();
    loop {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("engine event timed out")
            .expect("channel open");
        match ev {
            EngineEvent::Started { .. } | EngineEvent::Progress { .. } => {}
            ev @ EngineEvent::Token { .. } => out.push(ev),
            other => {
                out.push(other);
                return out;
            }
        }
    }
}

/// The ids of the token events among `events`.
fn token_ids(events: &[EngineEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

/// A generation resumed after a node failed has a client waiting mid-stream: when every slot
/// is taken, it is admitted before new requests that arrived earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_generation_goes_ahead_of_new_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    // One slot, and a small event buffer: the first request, unread, pauses in its slot.
    let eng = engine(
        &model,
        EngineConfig {
            max_active: 1,
            event_buffer: 4,
            ..EngineConfig::default()
        },
    );
    let prompt: Vec<u32> = (0..9).map(|j| 7 + j * 11).collect();
    let mut running = eng
        .submit(
            request(0, prompt.clone(), 48, SamplingParams::greedy()),
            CancellationToken::new(),
        )
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, running.recv()).await.unwrap(),
        Some(EngineEvent::Started { .. })
    ));
    let mut new = eng
        .submit(
            request(1, prompt.clone(), 8, SamplingParams::greedy()),
            CancellationToken::new(),
        )
        .unwrap();
    let mut resumed_req = request(2, prompt, 8, SamplingParams::greedy());
    resumed_req.resume = vec![3, 4];
    let mut resumed = eng.submit(resumed_req, CancellationToken::new()).unwrap();
    // Reading the first request to its end frees the slot for a waiting one.
    let (_, last) = collect(running).await;
    assert!(matches!(last, EngineEvent::Finished { .. }), "{last:?}");
    assert!(matches!(
        tokio::time::timeout(WAIT, resumed.recv()).await.unwrap(),
        Some(EngineEvent::Started { .. })
    ));
    // One slot: the new request cannot have started while the resumed one runs.
    assert!(
        matches!(new.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
        "the new request started before the resumed one"
    );
    let (_, last) = collect(resumed).await;
    assert!(matches!(last, EngineEvent::Finished { .. }), "{last:?}");
    let (ids, last) = collect(new).await;
    assert!(matches!(last, EngineEvent::Finished { .. }), "{last:?}");
    assert_eq!(ids.len(), 8);
}

/// Among resumed generations, the one with the least left to prefill gets the compute first:
/// one whose checkpoint restored nearly everything does not wait for another's whole
/// re-prefill, although that one arrived first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resumed_generation_with_the_least_to_prefill_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    // Four rows a step: the long one needs about 50 steps of prefill, the short one 3.
    let eng = engine(
        &model,
        EngineConfig {
            step_tokens: 4,
            ..EngineConfig::default()
        },
    );
    let mut long_req = request(
        0,
        (0..200).map(|j| 3 + j % 250).collect(),
        4,
        SamplingParams::greedy(),
    );
    long_req.resume = vec![3, 4];
    let mut short_req = request(
        1,
        (0..10).map(|j| 5 + j * 7).collect(),
        4,
        SamplingParams::greedy(),
    );
    short_req.resume = vec![6];
    let mut long = eng.submit(long_req, CancellationToken::new()).unwrap();
    let short = eng.submit(short_req, CancellationToken::new()).unwrap();
    let short = events(short).await;
    assert_eq!(token_ids(&short).len(), 3, "{short:?}");
    // The long one is still prefilling: no token of it yet.
    let mut so_far = Vec::new();
    while let Ok(ev) = long.try_recv() {
        so_far.push(ev);
    }
    assert!(
        !so_far
            .iter()
            .any(|e| matches!(e, EngineEvent::Token { .. })),
        "the long re-prefill went first: {so_far:?}"
    );
    let rest = events(long).await;
    assert_eq!(token_ids(&rest).len(), 2, "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_generation_continues_exactly_where_the_first_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    let eng = engine(&model, EngineConfig::default());
    let prompt: Vec<u32> = (0..11).map(|j| 5 + j * 13).collect();
    let samplings = [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 1.1,
            top_k: 40,
            repetition_penalty: 1.2,
            seed: 99,
            ..Default::default()
        },
    ];
    for sampling in samplings {
        let full_req = request(0, prompt.clone(), 24, sampling.clone());
        let full = events(eng.submit(full_req, CancellationToken::new()).unwrap()).await;
        let ids = token_ids(&full);
        assert_eq!(ids.len(), 24);
        // Stop strings make the replay matter: take one that spans the middle of the output.
        for stop in [None, Some(())] {
            let mut base = request(1, prompt.clone(), 24, sampling.clone());
            let reference = match stop {
                None => full.clone(),
                Some(()) => {
                    let text: String = full
                        .iter()
                        .filter_map(|e| match e {
                            EngineEvent::Token { text, .. } => Some(text.as_str()),
                            _ => None,
                        })
                        .collect();
                    let chars: Vec<char> = text.chars().collect();
                    if chars.len() < 8 {
                        continue;
                    }
                    let mid = chars.len() / 2;
                    base.options.stop = vec![chars[mid..mid + 3].iter().collect()];
                    events(eng.submit(base.clone(), CancellationToken::new()).unwrap()).await
                }
            };
            let n = reference.len() - 1;
            for k in [0, 1, 2, n / 2, n.saturating_sub(1), n] {
                let mut req = base.clone();
                req.resume = reference[..k]
                    .iter()
                    .map(|e| match e {
                        EngineEvent::Token { id, .. } => *id,
                        other => panic!("not a token: {other:?}"),
                    })
                    .collect();
                let resumed = events(eng.submit(req, CancellationToken::new()).unwrap()).await;
                assert_eq!(
                    resumed,
                    reference[k..].to_vec(),
                    "resumed after {k} of {n} tokens (stop {:?})",
                    base.options.stop
                );
            }
        }
    }
}

/// A generation checkpointed as it runs can be resumed on another engine from the checkpoint:
/// the matching positions are imported instead of prefilled, and the output continues exactly
/// as the original run's. A checkpoint of other tokens is used only as far as it matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_resumed_from_its_checkpoint_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    let first = engine(&model, EngineConfig::default());
    let prompt: Vec<u32> = (0..40).map(|j| 3 + j * 7).collect();
    let sampling = SamplingParams {
        temperature: 0.9,
        seed: 5,
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(64);
    let mut req = request(0, prompt.clone(), 24, sampling.clone());
    req.checkpoint = Some(CheckpointSink::new(8, tx));
    let reference = events(first.submit(req, CancellationToken::new()).unwrap()).await;
    let ids = token_ids(&reference);
    assert_eq!(ids.len(), 24);
    // The snapshots continue one another from position 0; the sink closes with the sequence.
    let mut held = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.start, 0);
    while let Some(next) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        assert!(next.len() >= 8, "a checkpoint of {} positions", next.len());
        held.append(next).unwrap();
    }
    let history = [prompt.clone(), ids.clone()].concat();
    // Every position but the last sampled token's (never computed) at most, and all but the
    // last few at least.
    assert!(held.len() < history.len() && held.len() >= history.len() - 8);
    assert_eq!(held.matching_prefix(&history), held.len());
    assert_eq!(
        first.stats().checkpointed_tokens.load(Ordering::Relaxed),
        held.len() as u64
    );

    let second = engine(&model, EngineConfig::default());
    let mut restored_before = 0;
    for k in [0usize, 5, 12, 23] {
        let mut req = request(1, prompt.clone(), 24, sampling.clone());
        req.resume = ids[..k].to_vec();
        req.restore = Some(held.clone());
        let rows_before = second.stats().step_rows.load(Ordering::Relaxed);
        let resumed = events(second.submit(req, CancellationToken::new()).unwrap()).await;
        assert_eq!(resumed, reference[k..].to_vec(), "resumed after {k} tokens");
        // Imported: every position of prompt + resume but the last.
        let imported = held.len().min(prompt.len() + k - 1);
        let restored = second.stats().restored_tokens.load(Ordering::Relaxed);
        assert_eq!(
            restored - restored_before,
            imported as u64,
            "after {k} tokens"
        );
        restored_before = restored;
        let rows = second.stats().step_rows.load(Ordering::Relaxed) - rows_before;
        assert_eq!(
            rows as usize,
            prompt.len() + k - imported + (24 - k - 1),
            "rows computed after {k} tokens"
        );
    }

    // A checkpoint whose tokens differ from position 10 on: only its first 10 positions count.
    let mut other = held.clone();
    other.tokens[10] ^= 1;
    let mut req = request(2, prompt.clone(), 24, sampling.clone());
    req.resume = ids[..6].to_vec();
    req.restore = Some(other);
    let resumed = events(second.submit(req, CancellationToken::new()).unwrap()).await;
    assert_eq!(resumed, reference[6..].to_vec());
    assert_eq!(
        second.stats().restored_tokens.load(Ordering::Relaxed) - restored_before,
        10
    );
    // One of another model's shape is ignored: everything is prefilled.
    let mut wrong = held.clone();
    wrong.kv_dim += 1;
    let mut req = request(3, prompt.clone(), 24, sampling);
    req.resume = ids[..6].to_vec();
    req.restore = Some(wrong);
    let resumed = events(second.submit(req, CancellationToken::new()).unwrap()).await;
    assert_eq!(resumed, reference[6..].to_vec());
    assert_eq!(
        second.stats().restored_tokens.load(Ordering::Relaxed) - restored_before,
        10
    );
}

/// A prefill announces each chunk before it runs, and a checkpoint sink whose receiver
/// restarts it (a new holder) gets the whole cache from position 0 next, then continuations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_progress_is_announced_and_a_restarted_checkpoint_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    // Small steps and a small event buffer: unread, the sequence pauses after a few tokens.
    let eng = engine(
        &model,
        EngineConfig {
            step_tokens: 16,
            event_buffer: 8,
            ..EngineConfig::default()
        },
    );
    let prompt: Vec<u32> = (0..40).map(|j| 3 + j * 7).collect();
    let (tx, mut snaps) = mpsc::channel(1);
    let sink = CheckpointSink::new(4, tx);
    let restarts = sink.restarts.clone();
    let mut req = request(0, prompt.clone(), 30, SamplingParams::greedy());
    req.checkpoint = Some(sink);
    let mut rx = eng.submit(req, CancellationToken::new()).unwrap();
    let first = tokio::time::timeout(WAIT, snaps.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.start, first.len()), (0, 16));
    restarts.fetch_add(1, Ordering::SeqCst);

    // Events: Started, the prefill's chunks before any token, then the tokens.
    let mut progress = Vec::new();
    let mut ids = Vec::new();
    let mut held: Option<shoal_model::KvSnapshot> = None;
    let mut continued_before_restart = 0;
    loop {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        match ev {
            EngineEvent::Started { .. } => {}
            EngineEvent::Progress { positions } => {
                assert!(ids.is_empty(), "progress after a token");
                progress.push(positions);
            }
            EngineEvent::Token { id, .. } => ids.push(id),
            EngineEvent::Finished { .. } => break,
            other => panic!("{other:?}"),
        }
        // Reading events lets the sequence go on; snapshots are read as they come.
        while let Ok(snap) = snaps.try_recv() {
            match &mut held {
                // One snapshot made before the restart was seen may still continue the first.
                None if snap.start != 0 => {
                    assert_eq!(snap.start, 16);
                    continued_before_restart += 1;
                }
                None => {
                    assert!(snap.len() > 16, "the restart sent {} positions", snap.len());
                    held = Some(snap);
                }
                Some(h) => h.append(snap).unwrap(),
            }
        }
    }
    assert_eq!(progress, vec![16, 32, 40]);
    assert_eq!(ids.len(), 30);
    assert!(continued_before_restart <= 1);
    while let Some(snap) = tokio::time::timeout(WAIT, snaps.recv()).await.unwrap() {
        held.as_mut()
            .expect("a snapshot from 0")
            .append(snap)
            .unwrap();
    }
    let held = held.expect("a snapshot from position 0 after the restart");
    let history = [prompt, ids].concat();
    assert_eq!(held.start, 0);
    // Past the prompt (a last checkpoint may have found the sink full).
    assert!(held.len() > 40, "{} of {}", held.len(), history.len());
    assert_eq!(held.matching_prefix(&history), held.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resumes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    let eng = engine(&model, EngineConfig::default());
    let mut req = request(0, vec![1, 2, 3], 2, SamplingParams::greedy());
    req.resume = vec![4, 5, 6];
    assert!(matches!(
        eng.submit(req.clone(), CancellationToken::new()),
        Err(EngineError::Invalid(_))
    ));
    req.resume = vec![u32::MAX];
    assert!(matches!(
        eng.submit(req, CancellationToken::new()),
        Err(EngineError::Invalid(_))
    ));
}

/// What the in-process tail of [`pipeline_head_batches_sequences_that_arrive_one_by_one`]
/// receives.
enum TailJob {
    Step(HeadStep),
    Release(SeqId),
}

/// A pipeline's later stage in process: runs the last layers of the same model on its own
/// thread, samples greedily and answers steps in order, each after `delay` (a last stage
/// slower than the head, as the output head makes it). Counts sampled micro-batches in flight.
struct LocalTail {
    jobs: std::sync::mpsc::Sender<TailJob>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

impl LocalTail {
    fn start(
        mut shard: Box<dyn ShardRuntime>,
        tail: TailSender,
        delay: Duration,
        widest: Arc<AtomicUsize>,
    ) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<TailJob>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = in_flight.clone();
        std::thread::spawn(move || {
            let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
            let mut history: HashMap<SeqId, Vec<u32>> = HashMap::new();
            while let Ok(job) = rx.recv() {
                let step = match job {
                    TailJob::Step(step) => step,
                    TailJob::Release(seq) => {
                        shard.release(seq);
                        history.remove(&seq);
                        continue;
                    }
                };
                widest.fetch_max(step.slices.len(), Ordering::SeqCst);
                let batch: Vec<SeqStep> = step
                    .slices
                    .iter()
                    .map(|s| SeqStep {
                        seq: s.seq,
                        pos: s.pos,
                        n_tokens: s.n_tokens,
                        logits: s.sample,
                    })
                    .collect();
                let Ok(ShardOutput::Logits(logits)) =
                    shard.forward(&batch, ShardInput::Hidden(&step.hidden))
                else {
                    panic!("the tail's step failed");
                };
                let vocab = logits.len() / batch.iter().filter(|s| s.logits).count().max(1);
                let mut rows = logits.chunks_exact(vocab);
                let mut tokens = Vec::new();
                for s in &step.slices {
                    let h = history.entry(s.seq).or_default();
                    h.extend_from_slice(&s.tokens);
                    if s.sample {
                        tokens.push((s.seq, sampler.sample(rows.next().unwrap(), h, 0)));
                    }
                }
                std::thread::sleep(delay);
                if !tokens.is_empty() {
                    counter.fetch_sub(1, Ordering::SeqCst);
                }
                for (seq, token) in tokens {
                    if !tail.send(TailEvent::Token { seq, token }) {
                        return;
                    }
                }
            }
        });
        Self {
            jobs,
            in_flight,
            most_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Downstream for LocalTail {
    fn open(
        &mut self,
        _seq: SeqId,
        _req: &EngineRequest,
        _restorable: &[u32],
    ) -> Result<Opened, EngineError> {
        Ok(Opened {
            depth: 1,
            restored: 0,
        })
    }

    fn step(&mut self, step: HeadStep) -> Result<(), EngineError> {
        if step.slices.iter().any(|s| s.sample) {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        }
        self.jobs
            .send(TailJob::Step(step))
            .map_err(|_| EngineError::ShutDown)
    }

    fn release(&mut self, seq: SeqId) {
        let _ = self.jobs.send(TailJob::Release(seq));
    }
}

/// Sequences that reach a two-stage pipeline one at a time (each admitted only after the one
/// before it has its first token, so each starts in a micro-batch of its own) end up sharing
/// steps: the head never has more than one micro-batch per stage in flight, merges the ones
/// that come back while it waits, and every answer is what the whole model gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_head_batches_sequences_that_arrive_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir, SynthSpec::tiny_llama());
    let n_layers = model.config().n_layers;
    let split = n_layers / 2;
    let n = 8;
    let max_tokens = 40;
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            (0..(4 + i))
                .map(|j| (5 + i * 13 + j * 7) as u32 % 250)
                .collect()
        })
        .collect();

    let whole = engine(&model, EngineConfig::default());
    let mut expected = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let rx = whole
            .submit(
                request(i, p.clone(), max_tokens, SamplingParams::greedy()),
                CancellationToken::new(),
            )
            .unwrap();
        expected.push(collect(rx).await.0);
    }

    let pool = Arc::new(ThreadPool::new(1).unwrap());
    let head = model
        .shard(
            LayerRange::new(0, split).unwrap(),
            pool.clone(),
            ShardOptions::default(),
        )
        .unwrap();
    let tail = model
        .shard(
            LayerRange::new(split, n_layers).unwrap(),
            pool,
            ShardOptions::default(),
        )
        .unwrap();
    let widest = Arc::new(AtomicUsize::new(0));
    let (mut in_flight, mut most) = (None, None);
    let eng = Engine::start_head(
        Box::new(head),
        model.tokenizer().clone(),
        EngineConfig::default(),
        |sender| {
            let t = LocalTail::start(
                Box::new(tail),
                sender,
                Duration::from_millis(3),
                widest.clone(),
            );
            in_flight = Some(t.in_flight.clone());
            most = Some(t.most_in_flight.clone());
            Box::new(t)
        },
    )
    .unwrap();
    let most = most.unwrap();

    // One at a time: the next request only once the previous one has its first token.
    let mut started = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut rx = eng
            .submit(
                request(i, p.clone(), max_tokens, SamplingParams::greedy()),
                CancellationToken::new(),
            )
            .unwrap();
        let first = loop {
            match tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
                Some(EngineEvent::Started { .. } | EngineEvent::Progress { .. }) => {}
                Some(EngineEvent::Token { id, .. }) => break id,
                other => panic!("request {i}: {other:?}"),
            }
        };
        started.push((first, rx));
    }
    for (i, (first, rx)) in started.into_iter().enumerate() {
        let (mut ids, last) = collect(rx).await;
        ids.insert(0, first);
        assert!(matches!(last, EngineEvent::Finished { .. }), "{last:?}");
        assert_eq!(ids, expected[i], "request {i} differs through the pipeline");
    }
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "{} micro-batches were in flight on a two-stage pipeline",
        most.load(Ordering::SeqCst)
    );
    // Eight sequences in at most two micro-batches: one of them carried at least four.
    assert!(
        widest.load(Ordering::SeqCst) >= n / 2,
        "the widest step had {} sequences",
        widest.load(Ordering::SeqCst)
    );
    assert_eq!(in_flight.unwrap().load(Ordering::SeqCst), 0);
    wait_idle(&eng, n as u64).await;
}
