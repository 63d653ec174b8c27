//! A single-sequence generation loop over a whole-model runtime: chunked prefill, sampling,
//! streaming detokenization, stop tokens and stop strings. Used by `shoal generate` and as the
//! reference the cluster's schedulers are tested against.

use crate::ModelError;
use crate::exec::{SeqStep, ShardInput, ShardOutput, ShardRuntime};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopScan};
use shoal_tokenizer::{StreamDecoder, Tokenizer};
use shoal_types::SeqId;
use std::time::{Duration, Instant};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            prefill_chunk: 512,
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (including a final end-of-generation token, if one was sampled).
    pub tokens: Vec<u32>,
    /// Generated text, without stop strings or end-of-generation tokens.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Time to process the prompt and produce the first token.
    pub time_to_first_token: Duration,
    /// Total time.
    pub elapsed: Duration,
}

/// Generates from `prompt` on a whole-model runtime, calling `on_text` with each piece of text as
/// it becomes final. `on_text` returns `false` to cancel. The sequence's cache is released at the end.
pub fn generate(
    rt: &mut dyn ShardRuntime,
    tok: &Tokenizer,
    seq: SeqId,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation, ModelError> {
    let result = run(rt, tok, seq, prompt, opts, &mut on_text);
    rt.release(seq);
    result
}

fn run(
    rt: &mut dyn ShardRuntime,
    tok: &Tokenizer,
    seq: SeqId,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation, ModelError> {
    let cfg = rt.config().clone();
    let range = rt.layers();
    if !range.is_first() || !range.is_last(cfg.n_layers) {
        return Err(ModelError::BadBatch(format!(
            "generation needs the whole model, this runtime runs {range}"
        )));
    }
    if prompt.is_empty() {
        return Err(ModelError::InvalidRequest("the prompt is empty".into()));
    }
    let context = cfg.context_length;
    if prompt.len() >= context as usize {
        return Err(ModelError::ContextOverflow {
            seq,
            needed: prompt.len() as u32 + 1,
            context,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let start = Instant::now();
    let chunk = opts.prefill_chunk.max(1);

    // Prefill: logits only for the prompt's last token.
    let mut logits = Vec::new();
    let mut pos = 0usize;
    for part in prompt.chunks(chunk) {
        let last = pos + part.len() == prompt.len();
        let step = SeqStep {
            seq,
            pos: pos as u32,
            n_tokens: part.len() as u32,
            logits: last,
        };
        if let ShardOutput::Logits(l) = rt.forward(&[step], ShardInput::Tokens(part))?
            && last
        {
            logits.clear();
            logits.extend_from_slice(l);
        }
        pos += part.len();
    }

    let eog = tok.end_of_generation_tokens();
    let mut history: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut decoder = StreamDecoder::new(tok, true);
    let mut stops = StopMatcher::new(&opts.stop);
    let mut ttft = None;
    let mut finish = FinishReason::Length;
    let room = (context as usize - prompt.len()).min(opts.max_tokens as usize);
    while tokens.len() < room {
        if logits.len() != cfg.vocab {
            return Err(ModelError::BadBatch(format!(
                "expected {} logits, got {}",
                cfg.vocab,
                logits.len()
            )));
        }
        let next = sampler.sample(&logits, &history, tokens.len() as u64);
        ttft.get_or_insert_with(|| start.elapsed());
        tokens.push(next);
        history.push(next);
        if !opts.ignore_eos && eog.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        let piece = decoder.push(next)?;
        match stops.push(&piece) {
            StopScan::Continue(t) => {
                text.push_str(&t);
                if !t.is_empty() && !on_text(&t) {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            StopScan::Stopped(t) => {
                text.push_str(&t);
                if !t.is_empty() {
                    on_text(&t);
                }
                finish = FinishReason::Stop;
                break;
            }
        }
        if tokens.len() == room {
            break;
        }
        let step = SeqStep {
            seq,
            pos: (prompt.len() + tokens.len() - 1) as u32,
            n_tokens: 1,
            logits: true,
        };
        match rt.forward(&[step], ShardInput::Tokens(&[next]))? {
            ShardOutput::Logits(l) => {
                logits.clear();
                logits.extend_from_slice(l);
            }
            ShardOutput::Hidden(_) => {
                return Err(ModelError::BadBatch(
                    "whole model returned hidden states".into(),
                ));
            }
        }
    }
    if finish == FinishReason::Length {
        let mut tail = decoder.finish();
        let (StopScan::Continue(t) | StopScan::Stopped(t)) = stops.push(&tail);
        tail = t;
        tail.push_str(&stops.finish());
        if !tail.is_empty() {
            on_text(&tail);
            text.push_str(&tail);
        }
    }
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_tokens: prompt.len(),
        time_to_first_token: ttft.unwrap_or_default(),
        elapsed: start.elapsed(),
    })
}
