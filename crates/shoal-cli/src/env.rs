//! Every environment variable shoal reads, in one place. Nothing on a request path reads the
//! environment: values are read once into typed config at start-up.

/// Where shoal keeps state (default `~/.cache/shoal`).
pub const SHOAL_HOME: &str = "SHOAL_HOME";
/// Directory of cached model files (default `$SHOAL_HOME/models`).
pub const SHOAL_MODEL_DIR: &str = "SHOAL_MODEL_DIR";
/// Compute threads per process.
pub const SHOAL_THREADS: &str = "SHOAL_THREADS";
/// `tracing` filter (e.g. `info,shoal_model=debug`).
pub const SHOAL_LOG: &str = "SHOAL_LOG";
/// Key file for encrypted models (as `--model-key-file`).
pub const SHOAL_MODEL_KEY_FILE: &str = "SHOAL_MODEL_KEY_FILE";
/// The key for encrypted models itself, hex or base64 (read once at start-up).
pub const SHOAL_MODEL_KEY: &str = "SHOAL_MODEL_KEY";
/// A join token for `shoal agent` (kept out of the process's arguments).
pub const SHOAL_JOIN_TOKEN: &str = "SHOAL_JOIN_TOKEN";
