//! Tokenizers: load a Hugging Face `tokenizer.json` or train a byte-level BPE on the corpus, and
//! give every tokenizer a stable hash so token caches built with another one are never reused.
//! A tokenizer also knows the special token Forge puts between documents ([`Tokenizer::separator`])
//! and the one a text ends with ([`Tokenizer::end`]).

use crate::error::{Error, Result};
use forge_protocol::model::hf;
use serde_json::Value;
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

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// A tokenizer with its special tokens and content hash.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    source_name: String,
    separator: SpecialToken,
    end: SpecialToken,
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
        let specials = if inner.token_to_id(END_OF_TEXT).is_some() {
            None
        } else {
            Some(folder_specials(path).map_err(|why| Error::Tokenizer {
                source_name: source_name.clone(),
                why,
            })?)
        };
        Self::from_inner(inner, source_name, specials)
    }

    /// Parses a `tokenizer.json` held in memory (e.g. one stored in a checkpoint).
    pub fn from_json(json: &str, source_name: &str) -> Result<Self> {
        let inner = parse_hf_json(json).map_err(|e| Error::Tokenizer {
            source_name: source_name.to_string(),
            why: format!("not a Hugging Face tokenizer.json: {e}"),
        })?;
        Self::from_inner(inner, source_name.to_string(), None)
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
        Self::from_inner(tokenizers::Tokenizer::from(tok), source_name, None)
    }

    /// `specials`: the separator and end tokens a tokenizer without `<|endoftext|>` names
    /// beside it ([`folder_specials`]); `None` for `<|endoftext|>`.
    fn from_inner(
        mut inner: tokenizers::Tokenizer,
        source_name: String,
        specials: Option<Specials>,
    ) -> Result<Self> {
        let fail = |why: String| Error::Tokenizer {
            source_name: source_name.clone(),
            why,
        };
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| fail(format!("cannot turn off truncation: {e}")))?;
        let special = |named: &Named, what: &str| {
            let found = match named {
                Named::Text(text) => inner.token_to_id(text).map(|id| (text.clone(), id)),
                Named::Id(id) => inner.id_to_token(*id).map(|text| (text, *id)),
            };
            found
                .map(|(text, id)| SpecialToken { text, id })
                .ok_or_else(|| {
                    fail(format!(
                        "the {what} its folder names ({named}) is not one of its tokens: the \
                         folder's files are not of one tokenizer"
                    ))
                })
        };
        let (separator, end) = match &specials {
            None => {
                let eot = inner.token_to_id(END_OF_TEXT).ok_or_else(|| {
                    fail(format!(
                        "has no {END_OF_TEXT} token, which Forge puts between documents, and no \
                         {} beside it names a bos_token or eos_token to put there instead; use \
                         a tokenizer that defines one (GPT-2's does) or data.tokenizer.train",
                        hf::TOKENIZER_CONFIG
                    ))
                })?;
                let eot = SpecialToken {
                    text: END_OF_TEXT.to_string(),
                    id: eot,
                };
                (eot.clone(), eot)
            }
            Some(names) => (
                special(&names.separator, "separator")?,
                special(&names.end, "end token")?,
            ),
        };
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
        let mut hash = canonical_hash(&json).map_err(fail)?;
        if specials.is_some() {
            // Another separator makes other token streams of the same text: caches and the
            // data digest must tell them apart. `<|endoftext|>` keeps the plain hash.
            let mut keyed = Sha256::new();
            for part in [&hash, &separator.text, &end.text] {
                keyed.update(part.as_bytes());
                keyed.update([0]);
            }
            hash = hex::encode(keyed.finalize());
        }
        Ok(Self {
            inner,
            source_name,
            separator,
            end,
            vocab_size,
            hash,
        })
    }

    /// The token Forge puts before every document (`<|endoftext|>`, or a Llama-style
    /// tokenizer's BOS: see [`folder_specials`]).
    pub fn separator(&self) -> &SpecialToken {
        &self.separator
    }

    /// Id of [`Tokenizer::separator`].
    pub fn separator_id(&self) -> u32 {
        self.separator.id
    }

    /// The token a text ends with: `<|endoftext|>` again, or a Llama-style tokenizer's EOS.
    pub fn end(&self) -> &SpecialToken {
        &self.end
    }

    /// The ids sampling stops at: the separator (a new document begins) and the end token.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.separator.id];
        if self.end.id != self.separator.id {
            ids.push(self.end.id);
        }
        ids
    }

    /// The `tokenizer_config.json` that keeps this tokenizer's special tokens when they are not
    /// `<|endoftext|>`: saved beside its `tokenizer.json`, [`Tokenizer::load`] finds them again.
    pub fn specials_json(&self) -> Option<String> {
        (self.separator.text != END_OF_TEXT || self.end.text != END_OF_TEXT).then(|| {
            let value = serde_json::json!({
                "bos_token": self.separator.text,
                "eos_token": self.end.text,
            });
            serde_json::to_string_pretty(&value).expect("JSON values serialize")
        })
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

    /// Writes `tokenizer.json` atomically (temp file, fsync, rename), and beside it the
    /// `tokenizer_config.json` of [`Tokenizer::specials_json`] where there is one.
    pub fn save(&self, path: &Path) -> Result<()> {
        super::write_atomically(path, self.to_json()?.as_bytes())?;
        if let Some(specials) = self.specials_json() {
            super::write_atomically(
                &path.with_file_name(hf::TOKENIZER_CONFIG),
                specials.as_bytes(),
            )?;
        }
        Ok(())
    }

    pub(crate) fn source_name(&self) -> &str {
        &self.source_name
    }
}

/// The separator and end tokens of a tokenizer without `<|endoftext|>`.
#[derive(Debug, Clone, PartialEq)]
struct Specials {
    separator: Named,
    end: Named,
}

/// A special token as a folder names it: by its text (`tokenizer_config.json`) or id
/// (`config.json`).
#[derive(Debug, Clone, PartialEq)]
enum Named {
    Text(String),
    Id(u32),
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Named::Text(text) => write!(f, "{text}"),
            Named::Id(id) => write!(f, "id {id}"),
        }
    }
}

/// The special tokens that the files beside a `tokenizer.json` without `<|endoftext|>` name:
/// `bos_token` and `eos_token` in `tokenizer_config.json`, or else the token ids
/// `bos_token_id` and `eos_token_id` of `config.json` (as their texts in the tokenizer).
///
/// The separator is the BOS token where there is one: Forge puts its separator *before* every
/// document, which is where Llama-style tokenizers put BOS (their post-processor prepends it to
/// every text), so a prompt that transformers encodes with its BOS looks to the model like the
/// start of a training document, as it did to the model the folder came from. With only an
/// EOS token, that is the separator, as GPT-2's `<|endoftext|>` ends one document and begins
/// the next. The end token is EOS (or the separator without one): what sampling also stops at
/// and what an export names as the end of text.
fn folder_specials(path: &Path) -> std::result::Result<Specials, String> {
    let beside = |name: &str| path.with_file_name(name);
    let read_json = |name: &str| -> std::result::Result<Option<Value>, String> {
        match std::fs::read_to_string(beside(name)) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{} does not parse: {e}", beside(name).display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", beside(name).display())),
        }
    };
    let (mut bos, mut eos) = (None, None);
    if let Some(config) = read_json(hf::TOKENIZER_CONFIG)? {
        // A token is a string, or an object with its `content` (an AddedToken).
        let token = |key: &str| {
            let value = config.get(key)?;
            value
                .as_str()
                .or_else(|| value.get("content")?.as_str())
                .map(|text| Named::Text(text.to_string()))
        };
        (bos, eos) = (token("bos_token"), token("eos_token"));
    }
    if bos.is_none()
        && eos.is_none()
        && let Some(config) = read_json(hf::CONFIG)?
    {
        // An id, or a list of them (Llama 3's end tokens): the first.
        let id = |key: &str| {
            let value = config.get(key)?;
            let first = value.as_array().map_or(Some(value), |ids| ids.first())?;
            u32::try_from(first.as_u64()?).ok().map(Named::Id)
        };
        (bos, eos) = (id("bos_token_id"), id("eos_token_id"));
    }
    match (bos, eos) {
        (Some(bos), eos) => Ok(Specials {
            end: eos.unwrap_or_else(|| bos.clone()),
            separator: bos,
        }),
        (None, Some(eos)) => Ok(Specials {
            separator: eos.clone(),
            end: eos,
        }),
        (None, None) => Err(format!(
            "has no {END_OF_TEXT} token, which Forge puts between documents, and neither a {} \
             nor a {} beside it names a bos_token or eos_token to put there instead; add one, or \
             use a tokenizer that defines {END_OF_TEXT} or data.tokenizer.train",
            hf::TOKENIZER_CONFIG,
            hf::CONFIG
        )),
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
        assert_eq!(tok.separator_id(), 50256);
        assert_eq!(tok.vocab_size(), 50257);
        let text = "Once upon a time, there was a little girl named Lily. 💖";
        let ids = tok.encode(text).unwrap();
        // The GPT-2 file asks for truncation and padding to 64; both must be off.
        let long = "word ".repeat(200);
        assert_eq!(tok.encode(long.trim_end()).unwrap().len(), 200);
        assert_eq!(&ids[..3], &[7454, 2402, 257]);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(
            tok.decode(&[tok.separator_id(), ids[0]]).unwrap(),
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
        assert!(!ids.contains(&tok.separator_id()));

        let again = Tokenizer::train(stream(), 320).unwrap();
        assert_eq!(
            again.hash(),
            tok.hash(),
            "BPE training is not deterministic"
        );

        let reloaded = Tokenizer::from_json(&tok.to_json().unwrap(), "test").unwrap();
        assert_eq!(reloaded.hash(), tok.hash());
        assert_eq!(reloaded.separator_id(), tok.separator_id());
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

    /// A tokenizer.json without `<|endoftext|>`, with `<s>` and `</s>` as Llama's, in `dir`;
    /// the id of `</s>`.
    fn llama_style(dir: &Path) -> u32 {
        let tok = Tokenizer::train(docs(&["a b c", "a b d"]), 300).unwrap();
        let mut json: Value =
            serde_json::from_str(&tok.to_json().unwrap().replace(END_OF_TEXT, "<s>")).unwrap();
        let end = tok.vocab_size() as u32;
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": end, "content": "</s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        end
    }

    #[test]
    fn a_llama_style_tokenizer_separates_documents_with_its_bos() {
        let dir = tempfile::tempdir().unwrap();
        let end = llama_style(dir.path());
        let path = dir.path().join("tokenizer.json");
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("has no <|endoftext|>")
                && err.contains("tokenizer_config.json nor a config.json"),
            "{err}"
        );

        // tokenizer_config.json names them, as text or as an AddedToken.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}}"#,
        )
        .unwrap();
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!(tok.separator().text, "<s>");
        assert_eq!((tok.separator_id(), tok.end().id), (0, end));
        assert_eq!(tok.stop_ids(), [0, end]);
        // Another separator is another token stream: the hash differs from the file's alone.
        let plain = canonical_hash(&tok.to_json().unwrap()).unwrap();
        assert_ne!(tok.hash(), plain);
        // Saved, it keeps its special tokens beside it.
        let copy = tempfile::tempdir().unwrap();
        tok.save(&copy.path().join("tokenizer.json")).unwrap();
        let again = Tokenizer::load(&copy.path().join("tokenizer.json")).unwrap();
        assert_eq!(again.hash(), tok.hash());
        assert_eq!(
            (again.separator(), again.end()),
            (tok.separator(), tok.end())
        );

        // Only config.json's ids (Llama 3 lists its end tokens): EOS is the separator too.
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"bos_token_id": null, "eos_token_id": [{end}, 7]}}"#),
        )
        .unwrap();
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!((tok.separator().text.as_str(), tok.end().id), ("</s>", end));
        assert_eq!(tok.stop_ids(), [end]);

        // A special token the tokenizer does not have is named.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<|begin_of_text|>"}"#,
        )
        .unwrap();
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("(<|begin_of_text|>) is not one of its tokens"),
            "{err}"
        );
        // A GPT-2 style tokenizer keeps <|endoftext|> and its plain hash whatever lies beside it.
        let gpt2 = Tokenizer::train(docs(&["a b c"]), 300).unwrap();
        gpt2.save(&path).unwrap();
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!(tok.separator().text, END_OF_TEXT);
        assert_eq!(tok.hash(), gpt2.hash());
        assert_eq!(
            tok.hash(),
            canonical_hash(&gpt2.to_json().unwrap()).unwrap()
        );
        assert!(tok.specials_json().is_none());
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
