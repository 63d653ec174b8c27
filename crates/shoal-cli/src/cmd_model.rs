//! `shoal model …`: fetch catalogue models, inspect files.

use crate::catalog;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use shoal_model::Model;
use std::time::Instant;

/// Model management.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a catalogue model (default: the default model), verify it and cache it.
    Fetch {
        /// Catalogue name.
        #[arg(default_value = catalog::DEFAULT_MODEL)]
        name: String,
    },
    /// List catalogue models and whether they are cached.
    List,
    /// Measure the inference core beside llama.cpp (prefill, decode, load time, memory).
    Bench(crate::cmd_bench_model::BenchArgs),
    /// Show a model's shape, tensor types and tokenizer.
    Info {
        /// Catalogue name or path.
        #[arg(default_value = catalog::DEFAULT_MODEL)]
        model: String,
    },
}

/// Runs a model subcommand.
pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Fetch { name } => {
            let Some(entry) = catalog::lookup(&name) else {
                bail!("`{name}` is not in the catalogue (see `shoal model list`)");
            };
            let path = catalog::fetch(entry)?;
            println!("{}", path.display());
        }
        ModelCommand::Bench(args) => crate::cmd_bench_model::run(args)?,
        ModelCommand::List => {
            for e in catalog::CATALOG {
                let path = e.cached_path();
                let state = if path.exists() {
                    "cached"
                } else {
                    "not cached"
                };
                println!("{}\t{}\t{}", e.name, state, path.display());
            }
        }
        ModelCommand::Info { model } => {
            let path = catalog::resolve(&model, false)?;
            let t0 = Instant::now();
            let m = Model::open(&path).with_context(|| format!("loading {}", path.display()))?;
            let load = t0.elapsed();
            let c = m.config();
            println!(
                "file        {} ({:.1} MiB)",
                path.display(),
                m.file_bytes() as f64 / (1 << 20) as f64
            );
            println!("arch        {:?}", c.arch);
            println!("layers      {}", c.n_layers);
            println!(
                "hidden      {} (heads {}, kv heads {}, head dim {})",
                c.hidden, c.n_heads, c.n_kv_heads, c.head_dim
            );
            println!("ffn         {}", c.ffn);
            println!("vocab       {}", c.vocab);
            println!("context     {}", c.context_length);
            let mut types = std::collections::BTreeMap::new();
            for t in m.file().tensors() {
                *types.entry(t.dtype.name()).or_insert(0usize) += 1;
            }
            println!("tensors     {types:?}");
            println!("load        {:.1} ms", load.as_secs_f64() * 1e3);
        }
    }
    Ok(())
}
