//! `shoal generate`: one prompt, one node, tokens streamed to stdout.

use crate::catalog;
use anyhow::Result;
use clap::Args;
use shoal_model::{ChatMessage, GenerateOptions, Prompt, SamplingParams, ShardOptions, ThreadPool};
use shoal_types::SeqId;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `shoal generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model name from the catalogue, or a path to a GGUF file.
    #[arg(long, default_value = catalog::DEFAULT_MODEL)]
    model: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Minimum probability relative to the most likely token.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (default: every core).
    #[arg(long, env = crate::env::SHOAL_THREADS)]
    threads: Option<usize>,
    /// Print timing figures to stderr.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    keys: crate::cmd_model::ModelKeyArgs,
    /// Manifest to check the model file against (default: `<file>.manifest.json` if present).
    #[arg(long)]
    manifest: Option<PathBuf>,
}

/// Runs `shoal generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let path = catalog::resolve(&args.model, true)?;
    let keys = args.keys.provider()?;
    let t0 = Instant::now();
    let (model, _) = crate::cmd_model::open(&path, keys.as_deref(), args.manifest.as_deref())?;
    let load = t0.elapsed();
    let pool = Arc::new(ThreadPool::new(crate::threads_or_default(args.threads))?);
    let mut rt = model.whole(pool, ShardOptions::default())?;
    let prompt = if args.chat {
        let mut msgs = Vec::new();
        if let Some(sys) = args.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: sys,
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: args.prompt,
        });
        Prompt::Chat(msgs)
    } else {
        Prompt::Text(args.prompt)
    };
    let tokens = model.encode(&prompt)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repeat_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: args.stop,
        ..GenerateOptions::default()
    };
    let mut stdout = std::io::stdout().lock();
    let gen_out = shoal_model::generate(
        &mut rt,
        model.tokenizer(),
        SeqId(0),
        &tokens,
        &opts,
        |text| {
            // A closed stdout (e.g. `| head`) ends the generation rather than failing it.
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .is_ok()
        },
    )?;
    let _ = writeln!(stdout);
    if args.stats {
        let decode = gen_out.elapsed.saturating_sub(gen_out.time_to_first_token);
        let n = gen_out.tokens.len();
        eprintln!(
            "load {:.1} ms | prompt {} tokens, first token after {:.1} ms | {} tokens, {:.1} tok/s decode | finish {:?}",
            load.as_secs_f64() * 1e3,
            gen_out.prompt_tokens,
            gen_out.time_to_first_token.as_secs_f64() * 1e3,
            n,
            if n > 1 {
                (n - 1) as f64 / decode.as_secs_f64()
            } else {
                0.0
            },
            gen_out.finish
        );
    }
    Ok(())
}
