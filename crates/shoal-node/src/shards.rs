//! The shards this node serves: the coordinator's assignments, each loading, ready or failed.
//!
//! The table is the one place that knows what is loaded. [`ShardTable::apply`] takes the
//! complete set of assignments from a heartbeat answer: new ones are loaded on blocking threads
//! (state `LOADING` until `READY` or `FAILED`), ones no longer assigned leave the table at once
//! (no new request finds them) and are dropped once their in-flight generations end.
//!
//! Today a shard is a whole model behind a [`LocalBackend`]. A partial layer range is reported
//! `FAILED` until the pipeline data path exists; [`ShardTable::load`] is where it will cut the
//! range with `Model::shard` instead.

use crate::capability::error_chain;
use crate::config::ModelFile;
use crate::local::{LocalBackend, LocalBackendConfig};
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
    /// Only whole models are served by this node's engine.
    #[error("partial layer ranges are served by the pipeline data path")]
    PartialRange,
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
        let model = Arc::new(Model::open(&file.path).map_err(|source| LoadError::Open {
            path: file.path.clone(),
            source,
        })?);
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
                    retired.extend(old.backend);
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
                    retired.extend(old.backend);
                }
            }
        }
        for backend in retired {
            self.retire(backend);
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

    /// Drops `backend` once the generations it is still forwarding have ended.
    fn retire(&self, backend: Arc<LocalBackend>) {
        self.tasks.spawn(async move {
            backend.drain().await;
            // The engine joins its compute thread when dropped: off the reactor.
            let _ = tokio::task::spawn_blocking(move || drop(backend)).await;
        });
    }

    /// Loads one assigned shard. Blocking.
    fn load(&self, a: &ShardAssignment) -> Result<LocalBackend, LoadError> {
        let file = self.find_file(a)?;
        let model = self.open(file)?;
        let n_layers = model.config().n_layers;
        let (start, end) = a.layers.map_or((0, 0), |r| (r.start, r.end));
        let range =
            LayerRange::new(start, end).map_err(|_| LoadError::InvalidLayers { start, end })?;
        if range.end() > n_layers {
            return Err(LoadError::LayersOutOfRange { range, n_layers });
        }
        if !(range.is_first() && range.is_last(n_layers)) {
            // The pipeline data path will run `model.shard(range, ..)` as a stage here.
            return Err(LoadError::PartialRange);
        }
        let cfg = LocalBackendConfig {
            model_id: ModelId::new(a.model_id.clone()),
            threads: self.settings.threads,
            engine: self.settings.engine.clone(),
            default_max_tokens: self.settings.default_max_tokens,
        };
        LocalBackend::start(model, cfg).map_err(LoadError::Start)
    }

    /// The file an assignment names: by hash, else by model id.
    fn find_file(&self, a: &ShardAssignment) -> Result<&ModelFile, LoadError> {
        let by_hash = (!a.model_sha256.is_empty())
            .then(|| {
                self.files
                    .iter()
                    .find(|f| f.sha256.eq_ignore_ascii_case(&a.model_sha256))
            })
            .flatten();
        by_hash
            .or_else(|| self.files.iter().find(|f| f.id.as_str() == a.model_id))
            .ok_or_else(|| LoadError::NoLocalFile {
                model: a.model_id.clone(),
                sha256: a.model_sha256.clone(),
            })
    }

    fn finish_load(
        &self,
        key: &ShardKey,
        generation: u64,
        loaded: Result<LocalBackend, LoadError>,
    ) {
        let mut t = self.write();
        let loaded = loaded.map(Arc::new);
        if let Ok(b) = &loaded {
            t.all_stats.push(b.engine().stats().clone());
        }
        let Some(shard) = t.shards.get_mut(key).filter(|s| s.generation == generation) else {
            // Unassigned while loading: nothing can be using it yet.
            drop(t);
            drop(loaded);
            return;
        };
        match loaded {
            Ok(backend) => {
                tracing::info!(model = %key.model, "shard ready");
                shard.state = ShardState::Ready;
                shard.backend = Some(backend);
            }
            Err(e) => {
                let detail = error_chain(&e);
                tracing::warn!(model = %key.model, start = key.start, end = key.end, %detail, "shard failed to load");
                shard.state = ShardState::Failed;
                shard.detail = detail;
            }
        }
    }

    /// The backend serving `model`, or why there is none.
    pub fn backend_for(&self, model: &str) -> Result<Arc<LocalBackend>, BackendError> {
        let t = self.read();
        let mut loading = false;
        let mut failed = false;
        for (key, shard) in &t.shards {
            if key.model != model {
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
            out.batches.add(&s.batch_sequences.snapshot());
        }
        out
    }

    /// Unassigns everything and waits until every shard is dropped and every load has
    /// finished. Generations should have been ended (cancelled) first.
    pub async fn shutdown(&self) {
        let retired: Vec<Arc<LocalBackend>> = {
            let mut t = self.write();
            std::mem::take(&mut t.shards)
                .into_values()
                .filter_map(|s| s.backend)
                .collect()
        };
        for b in retired {
            self.retire(b);
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}
