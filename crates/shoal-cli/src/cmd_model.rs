//! `shoal model …`: fetch catalogue models, inspect files, and protect them at rest
//! (manifests, encryption, keys). Also the model-key flags of the commands that open models.

use crate::catalog;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use shoal_model::{KeyProvider, ManifestCheck, Model, OpenOptions, OpenReport};
use shoal_vault::{
    Algorithm, EncryptOptions, EnvKeyProvider, FileKeyProvider, Key, Manifest, VaultError,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
        #[command(flatten)]
        keys: ModelKeyArgs,
    },
    /// Write a manifest (name, size, sha256 of each file) checked before every load: to
    /// `<first file>.manifest.json` unless --out is given.
    Manifest {
        /// The model's files (catalogue names or paths).
        #[arg(required = true)]
        files: Vec<String>,
        /// Where to write the manifest.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The model's id, recorded in the manifest.
        #[arg(long)]
        model_id: Option<String>,
        /// The model's version, recorded in the manifest.
        #[arg(long)]
        model_version: Option<String>,
    },
    /// Check files against a manifest (a `.manifest.json`, or a model file with one beside it).
    Verify {
        /// The manifest or the model file.
        path: PathBuf,
    },
    /// Create a model key: 32 random bytes in a new file readable by its owner only.
    Keygen {
        /// The key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write an encrypted copy of a model (authenticated, chunked); it loads with
    /// --model-key-file and is decrypted into memory only.
    Encrypt(EncryptArgs),
    /// Write the plaintext of an encrypted model to disk (for operators; loading never needs
    /// this).
    Decrypt {
        /// The encrypted model.
        input: PathBuf,
        /// Where to write the plaintext (never overwritten).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        keys: ModelKeyArgs,
    },
}

/// Arguments of `shoal model encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// The model to encrypt (catalogue name or path).
    input: String,
    /// The key file (from `shoal model keygen`).
    #[arg(long)]
    key_file: PathBuf,
    /// Where to write the encrypted model (default: the input's path plus `.enc`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    /// The AEAD: aes-256-gcm or chacha20-poly1305.
    #[arg(long, default_value = "aes-256-gcm", value_parser = parse_algorithm)]
    algorithm: Algorithm,
    /// Plaintext bytes per authenticated chunk.
    #[arg(long, default_value_t = shoal_vault::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// The key's id, written in the header for key providers that hold several keys.
    #[arg(long, default_value = "default")]
    key_id: String,
    /// Also write a manifest of the encrypted file beside it.
    #[arg(long)]
    manifest: bool,
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::from_name(s)
        .ok_or_else(|| format!("unknown algorithm `{s}` (aes-256-gcm or chacha20-poly1305)"))
}

/// The key for encrypted models, for every command that opens a model. The key file wins;
/// else `SHOAL_MODEL_KEY` (the key itself, hex or base64) is used if set.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelKeyArgs {
    /// Key file for encrypted models (32 raw bytes, or hex or base64 text; mode 0600).
    #[arg(long, env = crate::env::SHOAL_MODEL_KEY_FILE)]
    pub model_key_file: Option<PathBuf>,
}

impl ModelKeyArgs {
    /// The key provider these arguments name, read now (start-up), if any.
    pub fn provider(&self) -> Result<Option<Arc<dyn KeyProvider>>> {
        if let Some(path) = &self.model_key_file {
            return Ok(Some(Arc::new(FileKeyProvider::open(path)?)));
        }
        if std::env::var_os(crate::env::SHOAL_MODEL_KEY).is_some() {
            return Ok(Some(Arc::new(EnvKeyProvider::from_env(
                crate::env::SHOAL_MODEL_KEY,
            )?)));
        }
        Ok(None)
    }
}

/// Opens the model at `path` as every command does: decrypted into memory when encrypted,
/// checked against `manifest` or the sidecar manifest when there is one.
pub fn open(
    path: &Path,
    keys: Option<&dyn KeyProvider>,
    manifest: Option<&Path>,
) -> Result<(Model, OpenReport)> {
    let opts = OpenOptions {
        keys,
        manifest: manifest.map_or(ManifestCheck::Sidecar, ManifestCheck::File),
    };
    shoal_model::open_model_with(path, &opts).map_err(|e| {
        let hint = match &e {
            shoal_model::ModelError::Vault(VaultError::KeyRequired { .. }) => format!(
                " (pass --model-key-file or set {})",
                crate::env::SHOAL_MODEL_KEY
            ),
            _ => String::new(),
        };
        anyhow::Error::new(e).context(format!("loading {}{hint}", path.display()))
    })
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
        ModelCommand::Info { model, keys } => {
            let path = catalog::resolve(&model, false)?;
            let keys = keys.provider()?;
            let t0 = Instant::now();
            let (m, report) = open(&path, keys.as_deref(), None)?;
            let load = t0.elapsed();
            let c = m.config();
            println!(
                "file        {} ({:.1} MiB)",
                path.display(),
                m.file_bytes() as f64 / (1 << 20) as f64
            );
            if report.encrypted {
                let h = shoal_vault::read_header(&path)?;
                println!(
                    "encrypted   {} in {} KiB chunks, key id `{}` (decrypted into memory)",
                    h.algorithm.name(),
                    h.chunk_size >> 10,
                    h.key_id
                );
            }
            if let Some(manifest) = &report.manifest {
                println!("manifest    {} (size and sha256 match)", manifest.display());
            }
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
        ModelCommand::Manifest {
            files,
            out,
            model_id,
            model_version,
        } => {
            let paths = files
                .iter()
                .map(|f| catalog::resolve(f, false))
                .collect::<Result<Vec<_>>>()?;
            let t0 = Instant::now();
            let manifest = Manifest::describe(&paths, model_id, model_version)?;
            let secs = t0.elapsed().as_secs_f64();
            let out = match out {
                Some(o) => o,
                // `required = true` guarantees one file.
                None => Manifest::sidecar_path(paths.first().context("no file given")?),
            };
            manifest.write(&out)?;
            let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
            println!("{}", out.display());
            eprintln!(
                "{} file(s), {:.1} MB hashed in {:.2} s ({:.0} MB/s)",
                manifest.files.len(),
                bytes as f64 / 1e6,
                secs,
                bytes as f64 / 1e6 / secs.max(1e-9)
            );
        }
        ModelCommand::Verify { path } => {
            let is_manifest = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(shoal_vault::MANIFEST_SUFFIX));
            let manifest_path = if is_manifest {
                path.clone()
            } else {
                Manifest::sidecar_path(&path)
            };
            let manifest = Manifest::load(&manifest_path)?;
            let dir = manifest_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !is_manifest {
                manifest.entry_for(&path, &manifest_path)?;
            }
            manifest.verify_dir(dir)?;
            println!(
                "ok: {} file(s) match {}",
                manifest.files.len(),
                manifest_path.display()
            );
        }
        ModelCommand::Keygen { out } => {
            shoal_vault::write_key_file(&out, &Key::generate()?)?;
            println!("{}", out.display());
        }
        ModelCommand::Encrypt(args) => encrypt(args)?,
        ModelCommand::Decrypt { input, out, keys } => {
            let keys = keys.provider()?.with_context(|| {
                format!(
                    "decrypting needs --model-key-file or {}",
                    crate::env::SHOAL_MODEL_KEY
                )
            })?;
            if out.exists() {
                bail!("{} exists; not overwriting it", out.display());
            }
            let t0 = Instant::now();
            let plain = shoal_vault::decrypt_file(&input, Some(keys.as_ref()), None)?;
            let secs = t0.elapsed().as_secs_f64();
            let dir = out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            std::io::Write::write_all(&mut tmp, &plain)
                .and_then(|()| tmp.as_file().sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            tmp.persist_noclobber(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            eprintln!(
                "decrypted {:.1} MB in {:.3} s ({:.0} MB/s)",
                plain.len() as f64 / 1e6,
                secs,
                plain.len() as f64 / 1e6 / secs.max(1e-9)
            );
        }
    }
    Ok(())
}

/// `shoal model encrypt`.
fn encrypt(args: EncryptArgs) -> Result<()> {
    let input = catalog::resolve(&args.input, false)?;
    let out = args.out.unwrap_or_else(|| {
        let mut p = input.clone().into_os_string();
        p.push(".enc");
        PathBuf::from(p)
    });
    let mut magic = [0u8; 8];
    let n = std::io::Read::read(
        &mut std::fs::File::open(&input).with_context(|| format!("opening {}", input.display()))?,
        &mut magic,
    )?;
    if shoal_vault::is_encrypted(&magic[..n]) {
        bail!("{} is already encrypted", input.display());
    }
    if out.exists() && !args.force {
        bail!("{} exists (--force replaces it)", out.display());
    }
    let same = |a: &Path, b: &Path| {
        std::fs::canonicalize(a)
            .ok()
            .is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a))
    };
    if same(&input, &out) {
        bail!("the output must not be the input");
    }
    let key = FileKeyProvider::open(&args.key_file)?.key(&args.key_id)?;
    let opts = EncryptOptions {
        algorithm: args.algorithm,
        chunk_size: args.chunk_size,
        key_id: args.key_id,
    };
    let t0 = Instant::now();
    let header = shoal_vault::encrypt_file(&input, &out, &key, &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", out.display());
    let mb = header.plaintext_len as f64 / 1e6;
    eprintln!(
        "encrypted {mb:.1} MB with {} in {} chunks in {secs:.3} s ({:.0} MB/s)",
        header.algorithm.name(),
        header.chunks(),
        mb / secs.max(1e-9)
    );
    if args.manifest {
        let path = Manifest::sidecar_path(&out);
        Manifest::describe(&[&out], None, None)?.write(&path)?;
        eprintln!("manifest {}", path.display());
    }
    Ok(())
}
