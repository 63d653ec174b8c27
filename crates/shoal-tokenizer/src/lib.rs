//! Tokenizers and chat templates built from a model's own metadata.
