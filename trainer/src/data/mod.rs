//! Data pipeline: tokenizers, corpora, token caches, batches (being built).
