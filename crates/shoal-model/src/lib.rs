//! The model worker.
