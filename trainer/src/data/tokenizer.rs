//! Tokenizers: load a Hugging Face `tokenizer.json` or train a byte-level BPE on the corpus, and
//! give every tokenizer a stable hash so token caches built with another one are never reused.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The document separator every Forge tokenizer must know (GPT-2's, also used by llm.c shards).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Smallest vocabulary a trained byte-level BPE can have: 256 byte symbols plus end-of-text.
const MIN_TRAINED_VOCAB: usize = 257;
/// Far above any vocabulary in use; catches a mistyped size before minutes of training.
const MAX_TRAINED_VOCAB: usize = 1 << 20;
/// One past the largest token id a loaded tokenizer may have: 16 times the largest vocabularies
/// in use. A larger id is a damaged file, and the tokenizers crate would allocate for every id
/// up to it (serializing a vocabulary walks `0..=max id`, listing the missing ones).
const MAX_LOADED_VOCAB: usize = 1 << 22;

/// A tokenizer with its end-of-text id and content hash.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    source_name: String,
    eot_id: u32,
    vocab_size: usize,
    hash: String,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. Padding and truncation stored in the file are
    /// dropped: documents are encoded whole and packed, never cut or padded.
    pub fn load(path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        let inner = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|json| parse_hf_json(&json))
            .map_err(|e| Error::Tokenizer {
                source_name: source_name.clone(),
                why: format!(
                    "cannot load it as a Hugging Face tokenizer.json ({e}); point \
                     data.tokenizer.path at a valid file or use data.tokenizer.train"
                ),
            })?;
        Self::from_inner(inner, source_name)
    }

    /// Parses a `tokenizer.json` held in memory (e.g. one stored in a checkpoint).
    pub fn from_json(json: &str, source_name: &str) -> Result<Self> {
        let inner = parse_hf_json(json).map_err(|e| Error::Tokenizer {
            source_name: source_name.to_string(),
            why: format!("not a Hugging Face tokenizer.json: {e}"),
        })?;
        Self::from_inner(inner, source_name.to_string())
    }

    /// Trains a GPT-2 style byte-level BPE with `vocab_size` entries (end-of-text included) on
    /// documents streamed from `documents`; the first error the stream yields aborts training.
    pub fn train<I>(documents: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = Result<String>> + Send,
    {
        if !(MIN_TRAINED_VOCAB..=MAX_TRAINED_VOCAB).contains(&vocab_size) {
            return Err(Error::Data(format!(
                "tokenizer.train.vocab_size = {vocab_size} is out of range; a byte-level BPE needs \
                 at least {MIN_TRAINED_VOCAB} (256 bytes + {END_OF_TEXT}) and at most \
                 {MAX_TRAINED_VOCAB}; 2048 or 4096 suit small models"
            )));
        }
        let source_name = format!("byte-level BPE (vocab {vocab_size})");
        let fail = |why: String| Error::Tokenizer {
            source_name: source_name.clone(),
            why,
        };
        // Seeding the alphabet with all 256 byte symbols means any input can be encoded, even
        // bytes the training corpus never contained.
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(std::io::stderr().is_terminal())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(alphabet)
            .build();
        // The same pipeline as GPT-2's tokenizer.json: no normalizer, byte-level split with the
        // GPT-2 regex and no added prefix space, byte-level decoding.
        let byte_level = ByteLevel::new(false, true, true);
        let mut tok =
            TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(|e| fail(format!("cannot build the BPE pipeline: {e}")))?;

        let mut stream_error = None;
        let mut documents_seen = 0usize;
        let shunt = StopAtError {
            inner: documents,
            error: &mut stream_error,
            seen: &mut documents_seen,
        };
        let trained = tok.train(&mut trainer, shunt);
        if let Some(e) = stream_error {
            return Err(e);
        }
        trained.map_err(|e| fail(format!("training failed: {e}")))?;
        if documents_seen == 0 {
            return Err(fail("no documents to train on".to_string()));
        }
        Self::from_inner(tokenizers::Tokenizer::from(tok), source_name)
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, source_name: String) -> Result<Self> {
        let fail = |why: String| Error::Tokenizer {
            source_name: source_name.clone(),
            why,
        };
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| fail(format!("cannot turn off truncation: {e}")))?;
        let eot_id = inner.token_to_id(END_OF_TEXT).ok_or_else(|| {
            fail(format!(
                "has no {END_OF_TEXT} token, which Forge puts between documents; use a \
                 tokenizer that defines it (GPT-2's does) or data.tokenizer.train"
            ))
        })?;
        // Ids are what matter for embedding sizes and token widths; added tokens may sit past
        // the model's own vocabulary, so take the largest id rather than a count.
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |max| max as usize + 1);
        if vocab_size > MAX_LOADED_VOCAB {
            return Err(fail(format!(
                "has a token id of {}, past the {MAX_LOADED_VOCAB} ids Forge accepts: the file \
                 is damaged",
                vocab_size - 1
            )));
        }
        let json = inner
            .to_string(false)
            .map_err(|e| fail(format!("cannot serialize it: {e}")))?;
        let hash = canonical_hash(&json).map_err(fail)?;
        Ok(Self {
            inner,
            source_name,
            eot_id,
            vocab_size,
            hash,
        })
    }

    /// Id of `<|endoftext|>`, placed before every document.
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    /// One past the largest token id: the embedding table needs at least this many rows.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Hex sha256 of the tokenizer's canonical JSON (keys sorted, no whitespace): equal for
    /// tokenizers that encode alike, whatever file formatting they were loaded from.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Encodes one document, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer {
                source_name: self.source_name.clone(),
                why: format!("cannot encode a document of {} bytes: {e}", text.len()),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text; `<|endoftext|>` is kept so samples show document boundaries.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes ids to text without special tokens: the bytes the documents really had, which
    /// is what bits per byte divides by.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                source_name: self.source_name.clone(),
                why: format!("cannot decode {} ids: {e}", ids.len()),
            })
    }

    /// The tokenizer as `tokenizer.json` text, to store with a run or checkpoint.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Tokenizer {
            source_name: self.source_name.clone(),
            why: format!("cannot serialize it: {e}"),
        })
    }

    /// Writes `tokenizer.json` atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        super::write_atomically(path, self.to_json()?.as_bytes())
    }

    pub(crate) fn source_name(&self) -> &str {
        &self.source_name
    }
}

/// Where a tokenizer came from, as the dataset reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerOrigin {
    /// Loaded from this file.
    Loaded(PathBuf),
    /// Trained on the train corpus and saved to this file (reused while the corpus is unchanged).
    Trained(PathBuf),
}

impl TokenizerOrigin {
    /// The `tokenizer.json` to copy into a run or checkpoint directory.
    pub fn path(&self) -> &Path {
        match self {
            TokenizerOrigin::Loaded(p) | TokenizerOrigin::Trained(p) => p,
        }
    }
}

/// Passes documents to the BPE trainer until the first error, which it keeps for the caller:
/// the trainer takes plain strings, not results.
struct StopAtError<'a, I> {
    inner: I,
    error: &'a mut Option<Error>,
    seen: &'a mut usize,
}

impl<I: Iterator<Item = Result<String>>> Iterator for StopAtError<'_, I> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.error.is_some() {
            return None;
        }
        match self.inner.next()? {
            Ok(doc) => {
                *self.seen += 1;
                Some(doc)
            }
            Err(e) => {
                *self.error = Some(e);
                None
            }
        }
    }
}

/// Parses `tokenizer.json` text with the tokenizers crate, which panics instead of failing on
/// some malformed files (`.expect("Helper")` on a syntax error inside `"decoder"`, and on a bad
/// precompiled normalizer): the JSON syntax is checked first, and a panic left in a component's
/// decoding is caught and returned as an error.
fn parse_hf_json(json: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(json)
        .map_err(|e| format!("its JSON does not parse: {e}"))?;
    match std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>()) {
        Ok(parsed) => parsed.map_err(|e| e.to_string()),
        Err(_) => Err("the tokenizers library failed on one of its components".to_string()),
    }
}

/// sha256 of JSON re-serialized with object keys sorted, so key order and whitespace in the
/// file do not change the hash.
fn canonical_hash(json: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("its JSON does not parse: {e}"))?;
    let canonical = serde_json::to_vec(&sorted(value)).map_err(|e| e.to_string())?;
    Ok(hex::encode(Sha256::digest(&canonical)))
}

fn sorted(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_data;

    fn docs(texts: &[&str]) -> impl Iterator<Item = Result<String>> + Send + use<> {
        texts
            .iter()
            .map(|t| Ok(t.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn gpt2_round_trips_and_knows_its_eot() {
        let tok = Tokenizer::load(&test_data::gpt2_tokenizer()).unwrap();
        assert_eq!(tok.eot_id(), 50256);
        assert_eq!(tok.vocab_size(), 50257);
        let text = "Once upon a time, there was a little girl named Lily. 💖";
        let ids = tok.encode(text).unwrap();
        // The GPT-2 file asks for truncation and padding to 64; both must be off.
        let long = "word ".repeat(200);
        assert_eq!(tok.encode(long.trim_end()).unwrap().len(), 200);
        assert_eq!(&ids[..3], &[7454, 2402, 257]);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(
            tok.decode(&[tok.eot_id(), ids[0]]).unwrap(),
            "<|endoftext|>Once"
        );
    }

    #[test]
    fn hash_ignores_formatting_but_not_content() {
        let tok = Tokenizer::load(&test_data::gpt2_tokenizer()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("tokenizer.json");
        tok.save(&copy).unwrap();
        let reloaded = Tokenizer::load(&copy).unwrap();
        assert_eq!(reloaded.hash(), tok.hash());
        assert_eq!(tok.hash().len(), 64);

        let trained = Tokenizer::train(docs(&["a b c", "a b d"]), 300).unwrap();
        assert_ne!(trained.hash(), tok.hash());
    }

    #[test]
    fn trained_bpe_encodes_losslessly_and_is_reproducible() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("Once upon a time there was a cat number {i}. The cat was happy."))
            .collect();
        let stream = || {
            texts
                .clone()
                .into_iter()
                .map(Ok)
                .collect::<Vec<_>>()
                .into_iter()
        };
        let tok = Tokenizer::train(stream(), 320).unwrap();
        assert!(tok.vocab_size() <= 320, "{}", tok.vocab_size());
        assert!(tok.vocab_size() > 257);
        // A byte never seen in training still encodes, thanks to the full byte alphabet.
        let text = "The cat was happy. Ω ~";
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() < text.len(), "no merges learned: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert!(!ids.contains(&tok.eot_id()));

        let again = Tokenizer::train(stream(), 320).unwrap();
        assert_eq!(
            again.hash(),
            tok.hash(),
            "BPE training is not deterministic"
        );

        let reloaded = Tokenizer::from_json(&tok.to_json().unwrap(), "test").unwrap();
        assert_eq!(reloaded.hash(), tok.hash());
        assert_eq!(reloaded.eot_id(), tok.eot_id());
    }

    #[test]
    fn training_stops_at_the_first_corpus_error() {
        let stream = vec![
            Ok("fine".to_string()),
            Err(Error::Corpus {
                path: "bad.txt".into(),
                why: "invalid UTF-8 at byte 7".into(),
            }),
        ];
        let err = Tokenizer::train(stream.into_iter(), 300).unwrap_err();
        assert!(err.to_string().contains("bad.txt"), "{err}");
        let err = Tokenizer::train(docs(&[]), 300).unwrap_err();
        assert!(err.to_string().contains("no documents"), "{err}");
        let err = Tokenizer::train(docs(&["x"]), 100).unwrap_err();
        assert!(err.to_string().contains("vocab_size = 100"), "{err}");
    }

    #[test]
    fn bad_tokenizer_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("tokenizer.json");
        std::fs::write(&garbage, b"\x00\x01 not json").unwrap();
        let err = Tokenizer::load(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("data.tokenizer"),
            "{err}"
        );
        let err = Tokenizer::load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");

        // A valid tokenizer without <|endoftext|> cannot separate documents.
        let tok = Tokenizer::train(docs(&["a b c"]), 300).unwrap();
        let json = tok.to_json().unwrap().replace(END_OF_TEXT, "<|other|>");
        let err = Tokenizer::from_json(&json, "other.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("other.json") && err.contains("has no <|endoftext|>"),
            "{err}"
        );
    }
}
