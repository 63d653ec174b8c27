//! The shards this node serves: the coordinator's assignments, each loading, ready or failed.
//!
//! The table is the one place that knows what is loaded. [`ShardTable::apply`] takes the
//! complete set of assignments from a heartbeat answer: new ones are loaded on blocking threads
//! (state `LOADING` until `READY` or `FAILED`), ones no longer assigned leave the table at once
//! (no new request finds them) and are dropped once their in-flight generations end.
//!
//! A shard is a whole model behind a [`LocalBackend`], the first layers of a pipeline (a
//! [`LocalBackend`] whose engine is a pipeline head) or a later range served to the stage
//! before it as a [`StageShard`] (see [`crate::stage`]).

use crate::capability::error_chain;
use crate::config::ModelFile;
use crate::local::{LocalBackend, LocalBackendConfig};
use crate::stage::{LinkSettings, StageShard};
use shoal_api::BackendError;
use shoal_engine::{BatchSnapshot, EngineConfig, EngineStats};
use shoal_model::{Model, ModelError};
use shoal_proto::v1::{ShardAssignment, ShardState, ShardStatus};
use shoal_types::{ErrorClass, LayerRange, ModelId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio_util::task::TaskTracker;

/// What every shard's backend is started with.
#[derive(Debug, Clone)]
pub(crate) struct BackendSettings {
    pub threads: usize,
    pub engine: EngineConfig,
    pub default_max_tokens: u32,
    pub links: LinkSettings,
    /// Keys for encrypted model files.
    pub model_keys: Option<Arc<dyn shoal_model::KeyProvider>>,
}

/// A loaded shard.
enum Loaded {
    /// A whole model or a pipeline head: generations start here.
    Backend(LocalBackend),
    /// A later stage of a pipeline.
    Stage(StageShard),
}

/// Why an assigned shard could not be loaded. Its text is the `detail` of a `FAILED` status.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No model file on this node matches the assignment.
    #[error("no local file for model {model} (sha256 {sha256})")]
    NoLocalFile {
        /// The assigned model.
        model: String,
        /// The assigned file hash.
        sha256: String,
    },
    /// The assignment carries no valid layer range.
    #[error("invalid layer range [{start}, {end})")]
    InvalidLayers {
        /// Start as sent.
        start: u32,
        /// End as sent.
        end: u32,
    },
    /// The range does not fit the model.
    #[error("layers {range} are outside the model's {n_layers} layers")]
    LayersOutOfRange {
        /// The assigned range.
        range: LayerRange,
        /// Layers the model has.
        n_layers: u32,
    },
    /// The range could not be started as a pipeline stage.
    #[error("starting the pipeline stage: {0}")]
    Stage(String),
    /// The model file could not be opened.
    #[error("opening {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ModelError,
    },
    /// The engine could not be started.
    #[error("starting the engine")]
    Start(#[source] BackendError),
    /// The loading task panicked.
    #[error("loading panicked")]
    Panicked,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ShardKey {
    model: String,
    start: u32,
    end: u32,
}

impl ShardKey {
    fn of(a: &ShardAssignment) -> Self {
        let (start, end) = a.layers.map_or((0, 0), |r| (r.start, r.end));
        Self {
            model: a.model_id.clone(),
            start,
            end,
        }
    }
}

#[derive(Debug)]
struct Shard {
    assignment: ShardAssignment,
    state: ShardState,
    detail: String,
    backend: Option<Arc<LocalBackend>>,
    /// Set for a pipeline stage after the head.
    stage: Option<Arc<StageShard>>,
    /// Tells a finished load whether its entry is still the one it was started for.
    generation: u64,
}

#[derive(Debug, Default)]
struct Table {
    shards: BTreeMap<ShardKey, Shard>,
    next_generation: u64,
    /// Counters of every engine ever started (gone ones included, so totals never go down).
    all_stats: Vec<Arc<EngineStats>>,
}

/// Sums over the engines, for heartbeats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct EngineTotals {
    pub queue_depth: u64,
    pub active_sequences: u64,
    pub kv_bytes: u64,
    pub tokens_generated: u64,
    pub restored_tokens: u64,
    pub batches: BatchSnapshot,
}

/// The node's shards.
#[derive(Debug)]
pub(crate) struct ShardTable {
    files: Vec<ModelFile>,
    settings: BackendSettings,
    opened: Mutex<HashMap<PathBuf, Arc<Model>>>,
    table: RwLock<Table>,
    tasks: TaskTracker,
}

impl ShardTable {
    pub fn new(files: Vec<ModelFile>, settings: BackendSettings) -> Self {
        Self {
            files,
            settings,
            opened: Mutex::new(HashMap::new()),
            table: RwLock::new(Table::default()),
            tasks: TaskTracker::new(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The model files on this node.
    pub fn files(&self) -> &[ModelFile] {
        &self.files
    }

    /// Opens `file` once and keeps it (memory-mapped, so cheap to hold). Blocking.
    pub fn open(&self, file: &ModelFile) -> Result<Arc<Model>, LoadError> {
        let cached = self
            .opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&file.path)
            .cloned();
        if let Some(m) = cached {
            return Ok(m);
        }
        // Encrypted files are decrypted into memory; a manifest beside the file is checked.
        let model = shoal_model::open_model(&file.path, self.settings.model_keys.as_deref())
            .map_err(|source| LoadError::Open {
                path: file.path.clone(),
                source,
            })?;
        let model = Arc::new(model);
        self.opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(file.path.clone(), model.clone());
        Ok(model)
    }

    /// Makes `assignments` the complete set of shards: loads new ones in the background and
    /// retires the ones no longer listed. Must run inside a tokio runtime.
    pub fn apply(self: &Arc<Self>, assignments: &[ShardAssignment]) {
        let mut to_load = Vec::new();
        let mut retired = Vec::new();
        {
            let mut t = self.write();
            let mut wanted = BTreeSet::new();
            for a in assignments {
                let key = ShardKey::of(a);
                if !wanted.insert(key.clone()) {
                    continue; // a repeated assignment is the same shard
                }
                if let Some(s) = t.shards.get_mut(&key)
                    && s.assignment.model_sha256 == a.model_sha256
                {
                    s.assignment.plan_epoch = a.plan_epoch;
                    continue;
                }
                // New, or the same range from another file: (re)load.
                if let Some(old) = t.shards.remove(&key) {
                    retired.push((old.backend, old.stage));
                }
                t.next_generation += 1;
                let generation = t.next_generation;
                t.shards.insert(
                    key.clone(),
                    Shard {
                        assignment: a.clone(),
                        state: ShardState::Loading,
                        detail: String::new(),
                        backend: None,
                        stage: None,
                        generation,
                    },
                );
                to_load.push((key, a.clone(), generation));
            }
            let gone: Vec<ShardKey> = t
                .shards
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                if let Some(old) = t.shards.remove(&key) {
                    tracing::info!(model = %key.model, start = key.start, end = key.end, "shard unassigned");
                    retired.push((old.backend, old.stage));
                }
            }
        }
        for (backend, stage) in retired {
            self.retire(backend, stage);
        }
        for (key, assignment, generation) in to_load {
            tracing::info!(model = %key.model, start = key.start, end = key.end, "loading shard");
            let this = Arc::clone(self);
            self.tasks.spawn_blocking(move || {
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.load(&assignment)
                }))
                .unwrap_or(Err(LoadError::Panicked));
                this.finish_load(&key, generation, loaded);
            });
        }
    }

    /// Drops a shard: a backend once the generations it is still forwarding have ended, a
    /// stage at once (its links fail and their heads resume elsewhere).
    fn retire(&self, backend: Option<Arc<LocalBackend>>, stage: Option<Arc<StageShard>>) {
        self.tasks.spawn(async move {
            if let Some(b) = &backend {
                b.drain().await;
            }
            // Engines and stages join their compute threads when dropped: off the reactor.
            let _ = tokio::task::spawn_blocking(move || {
                drop(backend);
                if let Some(s) = stage {
                    s.stop();
                }
            })
            .await;
        });
    }

    /// Loads one assigned shard. Blocking.
    fn load(&self, a: &ShardAssignment) -> Result<Loaded, LoadError> {
        let file = self.find_file(a)?;
        let model = self.open(file)?;
        let n_layers = model.config().n_layers;
        let (start, end) = a.layers.map_or((0, 0), |r| (r.start, r.end));
        let range =
            LayerRange::new(start, end).map_err(|_| LoadError::InvalidLayers { start, end })?;
        if range.end() > n_layers {
            return Err(LoadError::LayersOutOfRange { range, n_layers });
        }
        let cfg = LocalBackendConfig {
            model_id: ModelId::new(a.model_id.clone()),
            threads: self.settings.threads,
            engine: self.settings.engine.clone(),
            default_max_tokens: self.settings.default_max_tokens,
        };
        if range.is_first() && range.is_last(n_layers) {
            return LocalBackend::start(model, cfg)
                .map(Loaded::Backend)
                .map_err(LoadError::Start);
        }
        if range.is_first() {
            return LocalBackend::start_head(
                model,
                cfg,
                range,
                file.sha256.clone(),
                self.settings.links.clone(),
            )
            .map(Loaded::Backend)
            .map_err(LoadError::Start);
        }
        StageShard::start(
            &model,
            cfg.model_id,
            file.sha256.clone(),
            range,
            self.settings.threads,
        )
        .map(Loaded::Stage)
        .map_err(LoadError::Stage)
    }

    /// The file an assignment names: by hash when it names one (another version of the model
    /// is never loaded in its place), else by model id.
    fn find_file(&self, a: &ShardAssignment) -> Result<&ModelFile, LoadError> {
        let found = if a.model_sha256.is_empty() {
            self.files.iter().find(|f| f.id.as_str() == a.model_id)
        } else {
            self.files
                .iter()
                .find(|f| f.sha256.eq_ignore_ascii_case(&a.model_sha256))
        };
        found.ok_or_else(|| LoadError::NoLocalFile {
            model: a.model_id.clone(),
            sha256: a.model_sha256.clone(),
        })
    }

    fn finish_load(&self, key: &ShardKey, generation: u64, loaded: Result<Loaded, LoadError>) {
        let mut t = self.write();
        let loaded = loaded.map(|l| match l {
            Loaded::Backend(b) => (Some(Arc::new(b)), None),
            Loaded::Stage(s) => (None, Some(Arc::new(s))),
        });
        if let Ok((Some(b), _)) = &loaded {
            t.all_stats.push(b.engine().stats().clone());
        }
        let Some(shard) = t.shards.get_mut(key).filter(|s| s.generation == generation) else {
            // Unassigned while loading: nothing can be using it yet.
            drop(t);
            if let Ok((b, s)) = loaded {
                self.retire(b, s);
            }
            return;
        };
        match loaded {
            Ok((backend, stage)) => {
                tracing::info!(model = %key.model, start = key.start, end = key.end, "shard ready");
                shard.state = ShardState::Ready;
                shard.backend = backend;
                shard.stage = stage;
            }
            Err(e) => {
                let detail = error_chain(&e);
                tracing::warn!(model = %key.model, start = key.start, end = key.end, %detail, "shard failed to load");
                shard.state = ShardState::Failed;
                shard.detail = detail;
            }
        }
    }

    /// The ready pipeline stage for `model`'s `layers` (a range after the first), or why
    /// there is none.
    pub fn stage_for(
        &self,
        model: &str,
        sha256: &str,
        layers: LayerRange,
    ) -> Result<Arc<StageShard>, BackendError> {
        let t = self.read();
        let key = ShardKey {
            model: model.to_owned(),
            start: layers.start(),
            end: layers.end(),
        };
        let Some(shard) = t.shards.get(&key) else {
            return Err(BackendError::new(
                ErrorClass::NotFound,
                "stage_not_found",
                format!("this node does not serve layers {layers} of `{model}`"),
            ));
        };
        match (&shard.stage, shard.state) {
            (Some(s), ShardState::Ready)
                if sha256.is_empty() || s.sha256.eq_ignore_ascii_case(sha256) =>
            {
                Ok(s.clone())
            }
            (Some(_), ShardState::Ready) => Err(BackendError::new(
                ErrorClass::InvalidRequest,
                "model_mismatch",
                format!("layers {layers} of `{model}` here come from another file"),
            )),
            _ => Err(BackendError::new(
                ErrorClass::Unavailable,
                "stage_not_ready",
                format!("layers {layers} of `{model}` are not ready on this node"),
            )),
        }
    }

    /// The backend serving `model`, or why there is none.
    pub fn backend_for(&self, model: &str) -> Result<Arc<LocalBackend>, BackendError> {
        self.entry_for(model, false)
    }

    /// The sha256 of the file and the layers of the ready shard of `model` that starts at
    /// layer 0: the whole model, or with `head` a pipeline head.
    pub fn first_shard(&self, model: &str, head: bool) -> Option<(String, LayerRange)> {
        let t = self.read();
        t.shards.iter().find_map(|(key, shard)| {
            let backend = shard.backend.as_ref()?;
            let whole = key.start == 0 && key.end == backend.model().config().n_layers;
            let layers = LayerRange::new(key.start, key.end).ok()?;
            (key.model == model
                && key.start == 0
                && whole != head
                && shard.state == ShardState::Ready)
                .then(|| {
                    if shard.assignment.model_sha256.is_empty() {
                        self.find_file(&shard.assignment)
                            .ok()
                            .map(|f| f.sha256.clone())
                    } else {
                        Some(shard.assignment.model_sha256.clone())
                    }
                })
                .flatten()
                .map(|sha| (sha, layers))
        })
    }

    /// The pipeline head serving the first layers of `model`, or why there is none.
    pub fn head_for(&self, model: &str) -> Result<Arc<LocalBackend>, BackendError> {
        self.entry_for(model, true)
    }

    fn entry_for(&self, model: &str, head: bool) -> Result<Arc<LocalBackend>, BackendError> {
        let t = self.read();
        let mut loading = false;
        let mut failed = false;
        for (key, shard) in &t.shards {
            let n_layers = shard.backend.as_ref().map(|b| b.model().config().n_layers);
            let whole = key.start == 0 && n_layers.is_none_or(|n| key.end == n);
            if key.model != model || key.start != 0 || whole == head {
                continue;
            }
            match (&shard.backend, shard.state) {
                (Some(b), ShardState::Ready) => return Ok(b.clone()),
                (_, ShardState::Loading) => loading = true,
                _ => failed = true,
            }
        }
        Err(if loading {
            BackendError::new(
                ErrorClass::Unavailable,
                "model_loading",
                format!("the model `{model}` is still loading on this node"),
            )
        } else if failed {
            BackendError::new(
                ErrorClass::Unavailable,
                "model_unavailable",
                format!("the model `{model}` failed to load on this node"),
            )
        } else {
            BackendError::new(
                ErrorClass::NotFound,
                "model_not_found",
                format!("the model `{model}` is not served by this node"),
            )
        })
    }

    /// Every ready backend.
    pub fn ready(&self) -> Vec<Arc<LocalBackend>> {
        self.read()
            .shards
            .values()
            .filter(|s| s.state == ShardState::Ready)
            .filter_map(|s| s.backend.clone())
            .collect()
    }

    /// The state of every shard, for a heartbeat.
    pub fn statuses(&self) -> Vec<ShardStatus> {
        self.read()
            .shards
            .values()
            .map(|s| ShardStatus {
                assignment: Some(s.assignment.clone()),
                state: s.state as i32,
                detail: s.detail.clone(),
            })
            .collect()
    }

    /// Live and cumulative engine figures.
    pub fn engine_totals(&self) -> EngineTotals {
        let t = self.read();
        let mut out = EngineTotals::default();
        for b in t.shards.values().filter_map(|s| s.backend.as_ref()) {
            let s = b.engine().stats();
            out.queue_depth += s.waiting.load(Ordering::Relaxed) as u64;
            out.active_sequences += s.active.load(Ordering::Relaxed) as u64;
            out.kv_bytes += s.kv_bytes.load(Ordering::Relaxed) as u64;
        }
        for s in &t.all_stats {
            out.tokens_generated += s.tokens_generated.load(Ordering::Relaxed);
            out.restored_tokens += s.restored_tokens.load(Ordering::Relaxed);
            out.batches.add(&s.batch_sequences.snapshot());
        }
        out
    }

    /// Unassigns everything and waits until every shard is dropped and every load has
    /// finished. Generations should have been ended (cancelled) first.
    pub async fn shutdown(&self) {
        let retired: Vec<_> = {
            let mut t = self.write();
            std::mem::take(&mut t.shards)
                .into_values()
                .map(|s| (s.backend, s.stage))
                .collect()
        };
        for (b, s) in retired {
            self.retire(b, s);
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use shoal_vault::{EncryptOptions, Key, StaticKeyProvider, VaultError};

    fn table(file: &ModelFile, keys: Option<Arc<dyn shoal_model::KeyProvider>>) -> ShardTable {
        ShardTable::new(
            vec![file.clone()],
            BackendSettings {
                threads: 1,
                engine: EngineConfig::default(),
                default_max_tokens: 16,
                links: LinkSettings {
                    node_id: shoal_types::NodeId::new("test"),
                    tls: shoal_net::TlsMode::Plaintext,
                    renewing: None,
                    metrics: Arc::default(),
                },
                model_keys: keys,
            },
        )
    }

    #[test]
    fn encrypted_model_files_open_with_the_agents_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("tiny.gguf");
        shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &plain).unwrap();
        let enc = dir.path().join("tiny.gguf.enc");
        let key = Key::generate().unwrap();
        shoal_vault::encrypt_file(&plain, &enc, &key, &EncryptOptions::default()).unwrap();
        let file = ModelFile {
            id: ModelId::new("tiny"),
            path: enc.clone(),
            sha256: "00".repeat(32),
            bytes: std::fs::metadata(&enc).unwrap().len(),
        };

        let keys: Arc<dyn shoal_model::KeyProvider> = Arc::new(StaticKeyProvider::new(key));
        let model = table(&file, Some(keys)).open(&file).unwrap();
        assert!(!model.file().is_mapped());
        assert_eq!(model.file().bytes(), std::fs::read(&plain).unwrap());

        let err = table(&file, None).open(&file).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::Open {
                    source: ModelError::Vault(VaultError::KeyRequired { .. }),
                    ..
                }
            ),
            "{err}"
        );
        let other: Arc<dyn shoal_model::KeyProvider> =
            Arc::new(StaticKeyProvider::new(Key::generate().unwrap()));
        let err = table(&file, Some(other)).open(&file).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::Open {
                    source: ModelError::Vault(VaultError::WrongKey { .. }),
                    ..
                }
            ),
            "{err}"
        );
    }
}
