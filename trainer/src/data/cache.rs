//! Token caches: a corpus tokenized once, in parallel, into a memory-mapped file that is reused
//! until its sources or its tokenizer change, and never used with another tokenizer.
//!
//! File layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `FORGETOK` |
//! | 8..12 | format version (1) |
//! | 12..16 | bytes per token: 2 (u16, vocab ≤ 65536) or 4 (u32) |
//! | 16..24 | token count |
//! | 24..32 | document count |
//! | 32..40 | UTF-8 bytes of the documents' text (for bits per byte) |
//! | 40..72 | sha256 of the tokenizer's canonical JSON |
//! | 72..76 | length L of the source fingerprint |
//! | 76..76+L | source fingerprint, JSON: per file its path, format, size, mtime, head/tail sha256 |
//! | zero padding to a multiple of 64, then the tokens | |
//!
//! Every document is preceded by `<|endoftext|>`, as in GPT-2 and llm.c.

use super::corpus::{self, Content, CorpusFormat};
use super::tokenizer::Tokenizer;
use super::{AtomicFile, cache_error};
use crate::error::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"FORGETOK";
const VERSION: u32 = 1;
const FIXED_HEADER: usize = 76;
const HEADER_ALIGN: usize = 64;
/// Guards against reading a huge length out of a damaged header.
const MAX_FINGERPRINT_BYTES: usize = 16 << 20;
/// The fingerprint hashes this much of each end of a source file, so it notices edits without
/// reading terabytes.
const FINGERPRINT_SPAN: u64 = 1 << 20;
/// A batch of documents handed to rayon at once: big enough to keep every core busy, small
/// enough to bound memory.
const BATCH_DOCS: usize = 4096;
const BATCH_BYTES: usize = 8 << 20;
/// Tokens of shard documents decoded at once when counting their text bytes.
const DECODE_BATCH_TOKENS: usize = 1 << 20;

/// How wide each stored token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    /// u16 when every id of a `vocab_size` vocabulary fits, else u32.
    pub(crate) fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }
}

/// A read-only sequence of token ids, memory-mapped from a cache or held in memory. Cloning is
/// cheap (shared), so every batch iterator can own one.
#[derive(Clone)]
pub struct Tokens {
    storage: Arc<Storage>,
    start: usize,
    len: usize,
}

enum Storage {
    Mapped {
        map: Mmap,
        offset: usize,
        width: TokenWidth,
    },
    Owned(Vec<u32>),
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &*self.storage {
            Storage::Mapped { width, .. } => format!("mapped {width:?}"),
            Storage::Owned(_) => "in memory".to_string(),
        };
        f.debug_struct("Tokens")
            .field("len", &self.len)
            .field("storage", &kind)
            .finish()
    }
}

impl Tokens {
    pub fn from_vec(tokens: Vec<u32>) -> Self {
        let len = tokens.len();
        Self {
            storage: Arc::new(Storage::Owned(tokens)),
            start: 0,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tokens in `range`, sharing storage. Panics if `range` is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Tokens {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "token range {range:?} out of 0..{}",
            self.len
        );
        Tokens {
            storage: Arc::clone(&self.storage),
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }

    /// Copies tokens `start..start + out.len()` into `out`. Panics if that is out of bounds.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        assert!(
            start + out.len() <= self.len,
            "token read {start}..{} out of 0..{}",
            start + out.len(),
            self.len
        );
        let first = self.start + start;
        match &*self.storage {
            Storage::Owned(v) => out.copy_from_slice(&v[first..first + out.len()]),
            // Decoding bytes (rather than casting the map to &[u16]) keeps this free of unsafe
            // code and of alignment or endianness assumptions; it costs nothing measurable next
            // to a training step.
            Storage::Mapped { map, offset, width } => {
                let w = width.bytes();
                let bytes = &map[offset + first * w..offset + (first + out.len()) * w];
                match width {
                    TokenWidth::U16 => {
                        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                            *o = u32::from(u16::from_le_bytes([b[0], b[1]]));
                        }
                    }
                    TokenWidth::U32 => {
                        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                            *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                }
            }
        }
    }

    /// Token `i`. Panics if out of bounds.
    pub fn get(&self, i: usize) -> u32 {
        let mut one = [0];
        self.read(i, &mut one);
        one[0]
    }

    /// All tokens, copied; for small sequences.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut all = vec![0; self.len];
        self.read(0, &mut all);
        all
    }

    /// Calls `f` on consecutive chunks of at most `chunk` tokens, covering every token once.
    pub(crate) fn for_each_chunk(&self, chunk: usize, mut f: impl FnMut(usize, &[u32])) {
        let mut buf = vec![0; chunk.min(self.len)];
        let mut start = 0;
        while start < self.len {
            let n = chunk.min(self.len - start);
            self.read(start, &mut buf[..n]);
            f(start, &buf[..n]);
            start += n;
        }
    }
}

/// A tokenized corpus on disk, memory-mapped.
#[derive(Debug, Clone)]
pub struct TokenCache {
    path: PathBuf,
    tokens: Tokens,
    documents: u64,
    text_bytes: u64,
    tokenizer_hash: String,
}

impl TokenCache {
    /// Opens a cache built with `tokenizer`. A cache built with any other tokenizer is refused
    /// with [`Error::TokenizerMismatch`]: its ids would silently mean other words.
    pub fn open(path: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        let (header, offset) = Header::read(path)?;
        if header.tokenizer_hash != tokenizer.hash() {
            return Err(Error::TokenizerMismatch {
                path: path.to_path_buf(),
                cached: short(&header.tokenizer_hash).to_string(),
                in_use: format!("{} ({})", short(tokenizer.hash()), tokenizer.source_name()),
            });
        }
        Self::map(path, header, offset)
    }

    /// The cache for `sources` under `cache_dir`: reused when its header shows the same
    /// sources (size, mtime, head and tail hashes) and the same tokenizer, rebuilt otherwise
    /// with a log line saying why. `role` ("train", "val") only names the file.
    pub fn build_or_open(
        sources: &[PathBuf],
        format: CorpusFormat,
        text_field: &str,
        tokenizer: &Tokenizer,
        cache_dir: &Path,
        role: &str,
    ) -> Result<Self> {
        let fingerprint = SourceFingerprint::of(sources, format, text_field)?;
        let path = cache_dir.join(cache_file_name(role, &fingerprint));
        let reason = match Header::read(&path) {
            Ok((header, offset)) => match stale_reason(&header, &fingerprint, tokenizer) {
                None => {
                    let cache = Self::map(&path, header, offset)?;
                    tracing::info!(
                        "reusing token cache {} ({} tokens, {} documents)",
                        path.display(),
                        cache.len(),
                        cache.documents
                    );
                    return Ok(cache);
                }
                Some(reason) => reason,
            },
            Err(_) if !path.exists() => "no cache yet".to_string(),
            Err(e) => format!("the old cache is unusable ({e})"),
        };
        tracing::info!("building token cache {}: {reason}", path.display());
        std::fs::create_dir_all(cache_dir).map_err(|e| {
            cache_error(
                &path,
                format!(
                    "cannot create its directory ({e}); set data.cache_dir to a writable \
                     directory"
                ),
            )
        })?;
        build(&path, &fingerprint, tokenizer)?;
        let (header, offset) = Header::read(&path)?;
        Self::map(&path, header, offset)
    }

    fn map(path: &Path, header: Header, offset: usize) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| cache_error(path, format!("cannot open it: {e}")))?;
        let map = map_read_only(&file)
            .map_err(|e| cache_error(path, format!("cannot memory-map it: {e}")))?;
        let len = usize::try_from(header.tokens)
            .map_err(|_| cache_error(path, "more tokens than this machine can address"))?;
        Ok(Self {
            path: path.to_path_buf(),
            tokens: Tokens {
                storage: Arc::new(Storage::Mapped {
                    map,
                    offset,
                    width: header.width,
                }),
                start: 0,
                len,
            },
            documents: header.documents,
            text_bytes: header.text_bytes,
            tokenizer_hash: header.tokenizer_hash,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Documents in the corpus; each is preceded by one end-of-text token.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// UTF-8 bytes of the documents' text (separators excluded), for bits per byte.
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    pub fn tokenizer_hash(&self) -> &str {
        &self.tokenizer_hash
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and Forge never writes a cache file in place: caches are
    // written to a temporary file and renamed over the old name, which leaves existing maps of
    // the old file intact. Another program truncating the file while it is mapped would fault
    // the process, the usual caveat of memory-mapped files.
    unsafe { Mmap::map(file) }
}

/// Why an existing cache cannot be reused, or `None` if it can.
fn stale_reason(
    header: &Header,
    fingerprint: &SourceFingerprint,
    tokenizer: &Tokenizer,
) -> Option<String> {
    if header.tokenizer_hash != tokenizer.hash() {
        return Some(format!(
            "the tokenizer changed (cache built with {}, this run uses {} from {})",
            short(&header.tokenizer_hash),
            short(tokenizer.hash()),
            tokenizer.source_name()
        ));
    }
    header.fingerprint.difference(fingerprint)
}

/// `{role}-{first source's stem}-{hash of the source paths and formats}.tokens`: one file per
/// set of sources, so a changed tokenizer or edited source replaces it instead of piling up.
fn cache_file_name(role: &str, fingerprint: &SourceFingerprint) -> String {
    let mut key = Sha256::new();
    for f in &fingerprint.files {
        key.update(f.path.to_string_lossy().as_bytes());
        key.update([0]);
        key.update(f.format.to_string().as_bytes());
        key.update([0]);
        key.update(f.text_field.as_deref().unwrap_or("").as_bytes());
        key.update([0]);
    }
    let stem = fingerprint
        .files
        .first()
        .and_then(|f| f.path.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!(
        "{role}-{stem}-{}.tokens",
        &hex::encode(key.finalize())[..16]
    )
}

/// What the cache was built from; any difference means a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFingerprint {
    files: Vec<FileFingerprint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFingerprint {
    /// Canonical, so the same file named two ways shares a cache.
    path: PathBuf,
    /// Resolved, never `auto`.
    format: CorpusFormat,
    /// Only for JSON formats, where it selects the text.
    text_field: Option<String>,
    size: u64,
    modified_secs: u64,
    modified_nanos: u32,
    head_sha256: String,
    tail_sha256: String,
}

impl SourceFingerprint {
    fn of(sources: &[PathBuf], format: CorpusFormat, text_field: &str) -> Result<Self> {
        let files = sources
            .iter()
            .map(|path| FileFingerprint::of(path, format, text_field))
            .collect::<Result<_>>()?;
        Ok(Self { files })
    }

    /// A human-readable account of the first difference from `now`.
    fn difference(&self, now: &SourceFingerprint) -> Option<String> {
        if self == now {
            return None;
        }
        let names =
            |fp: &SourceFingerprint| fp.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>();
        if names(self) != names(now) {
            return Some("the list of source files changed".to_string());
        }
        for (old, new) in self.files.iter().zip(&now.files) {
            let what = if old.format != new.format {
                format!("format {} → {}", old.format, new.format)
            } else if old.text_field != new.text_field {
                format!("text_field {:?} → {:?}", old.text_field, new.text_field)
            } else if old.size != new.size {
                format!("size {} → {} bytes", old.size, new.size)
            } else if old.head_sha256 != new.head_sha256 || old.tail_sha256 != new.tail_sha256 {
                "content changed".to_string()
            } else if (old.modified_secs, old.modified_nanos)
                != (new.modified_secs, new.modified_nanos)
            {
                "modification time changed".to_string()
            } else {
                continue;
            };
            return Some(format!("source {} changed: {what}", new.path.display()));
        }
        Some("the sources changed".to_string())
    }
}

impl FileFingerprint {
    fn of(path: &Path, format: CorpusFormat, text_field: &str) -> Result<Self> {
        let format = corpus::resolve_format(path, format)?;
        let canonical = path.canonicalize().map_err(|e| Error::Corpus {
            path: path.to_path_buf(),
            why: format!("cannot resolve its path: {e}"),
        })?;
        let read_err = |e: std::io::Error| Error::Corpus {
            path: path.to_path_buf(),
            why: format!("cannot read it: {e}"),
        };
        let mut file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let size = meta.len();
        let mut hash_span = |from: u64| -> std::io::Result<String> {
            file.seek(SeekFrom::Start(from))?;
            let mut bytes = Vec::new();
            (&mut file).take(FINGERPRINT_SPAN).read_to_end(&mut bytes)?;
            Ok(hex::encode(Sha256::digest(&bytes)))
        };
        let head_sha256 = hash_span(0).map_err(read_err)?;
        let tail_sha256 = hash_span(size.saturating_sub(FINGERPRINT_SPAN)).map_err(read_err)?;
        let json = matches!(
            format,
            CorpusFormat::Json | CorpusFormat::Jsonl | CorpusFormat::Parquet
        );
        Ok(Self {
            path: canonical,
            format,
            text_field: json.then(|| text_field.to_string()),
            size,
            modified_secs: modified.as_secs(),
            modified_nanos: modified.subsec_nanos(),
            head_sha256,
            tail_sha256,
        })
    }
}

/// sha256 over each source's path, format and contents (size, head and tail hashes) but not
/// its mtime: keys things derived from the text alone, like a trained tokenizer.
pub(crate) fn content_key(
    sources: &[PathBuf],
    format: CorpusFormat,
    text_field: &str,
) -> Result<String> {
    let fingerprint = SourceFingerprint::of(sources, format, text_field)?;
    let mut key = Sha256::new();
    for f in fingerprint.files {
        key.update(f.path.to_string_lossy().as_bytes());
        key.update([0]);
        key.update(f.format.to_string().as_bytes());
        key.update([0]);
        key.update(f.text_field.unwrap_or_default().as_bytes());
        key.update([0]);
        key.update(f.size.to_le_bytes());
        key.update(f.head_sha256.as_bytes());
        key.update(f.tail_sha256.as_bytes());
    }
    Ok(hex::encode(key.finalize()))
}

#[derive(Debug, Clone)]
struct Header {
    width: TokenWidth,
    tokens: u64,
    documents: u64,
    text_bytes: u64,
    tokenizer_hash: String,
    fingerprint: SourceFingerprint,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.fingerprint).expect("a fingerprint always serializes");
        let mut b = Vec::with_capacity(FIXED_HEADER + json.len() + HEADER_ALIGN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.width.bytes() as u32).to_le_bytes());
        b.extend_from_slice(&self.tokens.to_le_bytes());
        b.extend_from_slice(&self.documents.to_le_bytes());
        b.extend_from_slice(&self.text_bytes.to_le_bytes());
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&self.tokenizer_hash, &mut hash)
            .expect("tokenizer hashes are 64 hex digits");
        b.extend_from_slice(&hash);
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(&json);
        b.resize(b.len().div_ceil(HEADER_ALIGN) * HEADER_ALIGN, 0);
        b
    }

    /// Reads and checks the header; returns it with the byte offset of the first token.
    fn read(path: &Path) -> Result<(Header, usize)> {
        let fail = |why: String| cache_error(path, why);
        let rebuild = "delete it and it will be rebuilt";
        let mut file = File::open(path).map_err(|e| fail(format!("cannot open it: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| fail(format!("cannot stat it: {e}")))?
            .len();
        let mut fixed = [0u8; FIXED_HEADER];
        file.read_exact(&mut fixed).map_err(|_| {
            fail(format!(
                "is {size} bytes, too short for a token cache header; {rebuild}"
            ))
        })?;
        if &fixed[..8] != MAGIC {
            return Err(fail(format!(
                "is not a Forge token cache (magic {:?}, expected {:?}); {rebuild}",
                String::from_utf8_lossy(&fixed[..8]),
                String::from_utf8_lossy(MAGIC)
            )));
        }
        let u32_at = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(fail(format!(
                "is format version {version}; this build reads version {VERSION}; {rebuild}"
            )));
        }
        let width = match u32_at(12) {
            2 => TokenWidth::U16,
            4 => TokenWidth::U32,
            other => return Err(fail(format!("has token width {other}; {rebuild}"))),
        };
        let json_len = u32_at(72) as usize;
        if json_len > MAX_FINGERPRINT_BYTES {
            return Err(fail(format!("has a damaged header; {rebuild}")));
        }
        let mut json = vec![0u8; json_len];
        file.read_exact(&mut json)
            .map_err(|_| fail(format!("has a truncated header; {rebuild}")))?;
        let fingerprint = serde_json::from_slice(&json).map_err(|e| {
            fail(format!(
                "has an unreadable source fingerprint ({e}); {rebuild}"
            ))
        })?;
        let offset = (FIXED_HEADER + json_len).div_ceil(HEADER_ALIGN) * HEADER_ALIGN;
        let header = Header {
            width,
            tokens: u64_at(16),
            documents: u64_at(24),
            text_bytes: u64_at(32),
            tokenizer_hash: hex::encode(&fixed[40..72]),
            fingerprint,
        };
        let expected = header
            .tokens
            .checked_mul(width.bytes() as u64)
            .and_then(|body| body.checked_add(offset as u64));
        if expected != Some(size) {
            return Err(fail(format!(
                "is {size} bytes but its header promises {} tokens after a {offset}-byte \
                 header: truncated or damaged; {rebuild}",
                header.tokens
            )));
        }
        Ok((header, offset))
    }
}

/// Tokenizes every source into a new cache at `path`, atomically.
fn build(path: &Path, fingerprint: &SourceFingerprint, tokenizer: &Tokenizer) -> Result<()> {
    let started = Instant::now();
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let mut header = Header {
        width,
        tokens: 0,
        documents: 0,
        text_bytes: 0,
        tokenizer_hash: tokenizer.hash().to_string(),
        fingerprint: fingerprint.clone(),
    };
    let mut out = TokenWriter {
        file: AtomicFile::create(path)?,
        width,
        count: 0,
    };
    out.write_bytes(&header.encode())?;

    let total: u64 = fingerprint.files.iter().map(|f| f.size).sum();
    let mut progress = Progress::new(format!("tokenizing into {}", path.display()), total);
    for source in &fingerprint.files {
        // The canonical path names the same file the fingerprint describes.
        match corpus::open(
            &source.path,
            source.format,
            source.text_field.as_deref().unwrap_or(""),
        )? {
            Content::Documents(docs) => {
                let mut batch = Vec::new();
                let mut batch_bytes = 0;
                for doc in docs {
                    let doc = doc?;
                    batch_bytes += doc.len();
                    batch.push(doc);
                    if batch.len() >= BATCH_DOCS || batch_bytes >= BATCH_BYTES {
                        encode_batch(&batch, tokenizer, &mut out, &mut header)?;
                        progress.advance(batch_bytes as u64);
                        batch.clear();
                        batch_bytes = 0;
                    }
                }
                encode_batch(&batch, tokenizer, &mut out, &mut header)?;
                progress.advance(batch_bytes as u64);
            }
            Content::Tokens(shard) => {
                copy_shard(&shard, tokenizer, &mut out, &mut header, &mut progress)?;
            }
        }
    }
    progress.finish();
    if out.count == 0 {
        return Err(cache_error(path, "the sources produced no tokens"));
    }
    header.tokens = out.count;
    out.file
        .seek(SeekFrom::Start(0))
        .map_err(|e| cache_error(path, format!("cannot rewrite the header: {e}")))?;
    out.write_bytes(&header.encode())?;
    out.file.commit()?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "token cache {}: {} documents, {} tokens ({:.2} bytes/token) in {secs:.1} s",
        path.display(),
        header.documents,
        header.tokens,
        header.text_bytes as f64 / header.tokens as f64,
    );
    Ok(())
}

/// Encodes a batch of documents in parallel and appends them in order, each after an
/// end-of-text token, so the cache is the same whatever the thread count.
fn encode_batch(
    batch: &[String],
    tokenizer: &Tokenizer,
    out: &mut TokenWriter,
    header: &mut Header,
) -> Result<()> {
    let encoded: Vec<Result<Vec<u32>>> = batch.par_iter().map(|d| tokenizer.encode(d)).collect();
    for (doc, ids) in batch.iter().zip(encoded) {
        out.push(tokenizer.separator_id())?;
        for id in ids? {
            out.push(id)?;
        }
        header.documents += 1;
        header.text_bytes += doc.len() as u64;
    }
    Ok(())
}

/// Appends an llm.c shard's tokens, checking they fit the tokenizer; counts its documents and
/// their text bytes by decoding the stretches between end-of-text tokens.
fn copy_shard(
    shard: &corpus::LlmcShard,
    tokenizer: &Tokenizer,
    out: &mut TokenWriter,
    header: &mut Header,
    progress: &mut Progress,
) -> Result<()> {
    let eot = tokenizer.separator_id();
    let vocab = tokenizer.vocab_size();
    let mut document: Vec<u32> = Vec::new();
    let mut pending: Vec<Vec<u32>> = Vec::new();
    let mut pending_tokens = 0;
    let mut first = true;
    let mut position = 0u64;
    for chunk in shard.chunks()? {
        let chunk = chunk?;
        if first && chunk.first() != Some(&eot) {
            // Documents from different files must not run into each other.
            out.push(eot)?;
        }
        first = false;
        for &t in &chunk {
            if t as usize >= vocab {
                return Err(Error::Corpus {
                    path: shard.path().to_path_buf(),
                    why: format!(
                        "token {position} has id {t}, outside the tokenizer's {vocab} ids: the \
                         shard was made with another tokenizer; load that one"
                    ),
                });
            }
            position += 1;
            out.push(t)?;
            if t == eot {
                if !document.is_empty() {
                    pending_tokens += document.len();
                    pending.push(std::mem::take(&mut document));
                }
            } else {
                document.push(t);
            }
        }
        if pending_tokens >= DECODE_BATCH_TOKENS {
            count_text(&mut pending, tokenizer, header)?;
            pending_tokens = 0;
        }
        progress.advance(2 * chunk.len() as u64);
    }
    if !document.is_empty() {
        pending.push(document);
    }
    count_text(&mut pending, tokenizer, header)
}

fn count_text(
    documents: &mut Vec<Vec<u32>>,
    tokenizer: &Tokenizer,
    header: &mut Header,
) -> Result<()> {
    let bytes: Vec<Result<usize>> = documents
        .par_iter()
        .map(|d| tokenizer.decode_text(d).map(|s| s.len()))
        .collect();
    for b in bytes {
        header.text_bytes += b? as u64;
        header.documents += 1;
    }
    documents.clear();
    Ok(())
}

struct TokenWriter {
    file: AtomicFile,
    width: TokenWidth,
    count: u64,
}

impl TokenWriter {
    fn push(&mut self, id: u32) -> Result<()> {
        self.count += 1;
        match self.width {
            // The width was chosen from the vocabulary, so ids fit.
            TokenWidth::U16 => self.write_bytes(&(id as u16).to_le_bytes()),
            TokenWidth::U32 => self.write_bytes(&id.to_le_bytes()),
        }
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| {
            cache_error(
                self.file.final_path(),
                format!("cannot write it ({e}); free disk space or set data.cache_dir elsewhere"),
            )
        })
    }
}

/// A progress bar with ETA on a terminal, a log line every 10% otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    next_log: u64,
}

impl Progress {
    fn new(label: String, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            ) {
                bar.set_style(style);
            }
            bar.set_message("tokenizing");
            bar
        });
        Self {
            bar,
            label,
            total,
            done: 0,
            next_log: total / 10,
        }
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        } else if self.done >= self.next_log && self.done < self.total {
            let pct = 100 * self.done / self.total.max(1);
            tracing::info!("{}: {pct}%", self.label);
            self.next_log = self.done + self.total / 10;
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::write_llmc_shard;
    use crate::data::test_data;

    fn small_tokenizer() -> Tokenizer {
        let docs = (0..50).map(|i| Ok(format!("the cat sat on mat {i}. the dog ran.")));
        Tokenizer::train(docs.collect::<Vec<_>>().into_iter(), 300).unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn cache_holds_eot_then_document_tokens() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let src = write(dir.path(), "c.txt", "the cat\n<|endoftext|>\nthe dog ran.");
        let cache = TokenCache::build_or_open(
            &[src],
            CorpusFormat::Auto,
            "text",
            &tok,
            &dir.path().join("cache"),
            "train",
        )
        .unwrap();
        let mut expected = vec![tok.separator_id()];
        expected.extend(tok.encode("the cat").unwrap());
        expected.push(tok.separator_id());
        expected.extend(tok.encode("the dog ran.").unwrap());
        assert_eq!(cache.tokens().to_vec(), expected);
        assert_eq!(cache.documents(), 2);
        assert_eq!(cache.text_bytes(), 7 + 12);
        assert_eq!(cache.tokenizer_hash(), tok.hash());
        let name = cache.path().file_name().unwrap().to_string_lossy();
        assert!(
            name.starts_with("train-c-") && name.ends_with(".tokens"),
            "{name}"
        );
        // u16 tokens after a 64-aligned header.
        let size = std::fs::metadata(cache.path()).unwrap().len();
        assert_eq!((size - 2 * expected.len() as u64) % 64, 0);
        // Nothing but the cache is left in the directory: no temporary files.
        let files = std::fs::read_dir(dir.path().join("cache")).unwrap().count();
        assert_eq!(files, 1);
    }

    #[test]
    fn cache_is_reused_then_rebuilt_when_source_or_tokenizer_changes() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let src = write(dir.path(), "c.txt", "the cat sat.");
        let build = |tok: &Tokenizer| {
            TokenCache::build_or_open(
                std::slice::from_ref(&src),
                CorpusFormat::TextBlankLines,
                "text",
                tok,
                &cache_dir,
                "val",
            )
            .unwrap()
        };
        let first = build(&tok);
        let modified = || std::fs::metadata(first.path()).unwrap().modified().unwrap();
        let before = modified();
        // Reuse: same tokens, and the file was not rewritten (same inode contents and mtime).
        let again = build(&tok);
        assert_eq!(again.tokens().to_vec(), first.tokens().to_vec());
        assert_eq!(modified(), before);

        // The source changes: rebuilt with the new text.
        std::fs::write(&src, "the dog ran.").unwrap();
        let rebuilt = build(&tok);
        assert_eq!(rebuilt.path(), first.path());
        let mut expected = vec![tok.separator_id()];
        expected.extend(tok.encode("the dog ran.").unwrap());
        assert_eq!(rebuilt.tokens().to_vec(), expected);
        // The earlier map still reads the old tokens: rebuilds never write in place.
        assert_eq!(first.documents(), 1);
        assert_eq!(
            first.tokens().get(1),
            tok.encode("the cat sat.").unwrap()[0]
        );

        // Another tokenizer: a direct open is refused, build_or_open rebuilds.
        let gpt2 = Tokenizer::load(&test_data::gpt2_tokenizer()).unwrap();
        let err = TokenCache::open(rebuilt.path(), &gpt2).unwrap_err();
        assert!(matches!(err, Error::TokenizerMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(short(tok.hash())) && msg.contains("Delete the file"),
            "{msg}"
        );
        let with_gpt2 = build(&gpt2);
        assert_eq!(with_gpt2.tokenizer_hash(), gpt2.hash());
        assert_eq!(with_gpt2.tokens().get(0), 50256);
        assert_eq!(
            TokenCache::open(with_gpt2.path(), &gpt2).unwrap().len(),
            with_gpt2.len()
        );
    }

    #[test]
    fn stale_reasons_say_what_changed() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let src = write(dir.path(), "c.txt", "abc");
        let fp =
            SourceFingerprint::of(std::slice::from_ref(&src), CorpusFormat::Auto, "t").unwrap();
        let header = Header {
            width: TokenWidth::U16,
            tokens: 1,
            documents: 1,
            text_bytes: 3,
            tokenizer_hash: tok.hash().to_string(),
            fingerprint: fp.clone(),
        };
        assert_eq!(stale_reason(&header, &fp, &tok), None);
        std::fs::write(&src, "abcd").unwrap();
        let grown =
            SourceFingerprint::of(std::slice::from_ref(&src), CorpusFormat::Auto, "t").unwrap();
        let why = stale_reason(&header, &grown, &tok).unwrap();
        assert!(why.contains("c.txt changed: size 3 → 4 bytes"), "{why}");
        std::fs::write(&src, "abd").unwrap();
        let edited =
            SourceFingerprint::of(std::slice::from_ref(&src), CorpusFormat::Auto, "t").unwrap();
        let why = stale_reason(&header, &edited, &tok).unwrap();
        assert!(why.contains("content changed"), "{why}");
        let other = Tokenizer::train(vec![Ok("xyz xyz".to_string())].into_iter(), 300).unwrap();
        let why = stale_reason(&header, &fp, &other).unwrap();
        assert!(why.contains("the tokenizer changed"), "{why}");
    }

    #[test]
    fn damaged_caches_are_refused_and_rebuilt() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let src = write(dir.path(), "c.txt", "the cat sat on the mat.");
        let build = || {
            TokenCache::build_or_open(
                std::slice::from_ref(&src),
                CorpusFormat::Auto,
                "text",
                &tok,
                &cache_dir,
                "train",
            )
            .unwrap()
        };
        let good = build();
        let path = good.path().to_path_buf();
        let expected = good.tokens().to_vec();
        drop(good);
        let bytes = std::fs::read(&path).unwrap();

        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = TokenCache::open(&path, &tok).unwrap_err().to_string();
        assert!(err.contains("truncated or damaged"), "{err}");
        assert_eq!(build().tokens().to_vec(), expected);

        let mut bad = bytes.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        let err = TokenCache::open(&path, &tok).unwrap_err().to_string();
        assert!(err.contains("is not a Forge token cache"), "{err}");
        assert_eq!(build().tokens().to_vec(), expected);

        std::fs::write(&path, b"FORGE").unwrap();
        let err = TokenCache::open(&path, &tok).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        assert_eq!(build().tokens().to_vec(), expected);
    }

    #[test]
    fn shards_are_imported_with_their_documents_counted() {
        let gpt2 = Tokenizer::load(&test_data::gpt2_tokenizer()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut tokens = vec![gpt2.separator_id()];
        tokens.extend(gpt2.encode("Hello world").unwrap());
        tokens.push(gpt2.separator_id());
        tokens.extend(gpt2.encode("Bye ☃").unwrap());
        let shard = dir.path().join("s.bin");
        write_llmc_shard(&shard, &tokens).unwrap();
        let cache = TokenCache::build_or_open(
            &[shard],
            CorpusFormat::Auto,
            "text",
            &gpt2,
            dir.path(),
            "train",
        )
        .unwrap();
        assert_eq!(cache.tokens().to_vec(), tokens);
        assert_eq!(cache.documents(), 2);
        assert_eq!(
            cache.text_bytes(),
            "Hello world".len() as u64 + "Bye ☃".len() as u64
        );

        // Ids past the tokenizer's vocabulary mean the shard belongs to another tokenizer.
        let small = small_tokenizer();
        let shard = dir.path().join("big-ids.bin");
        write_llmc_shard(&shard, &[1, 2, 40000]).unwrap();
        let err = TokenCache::build_or_open(
            &[shard],
            CorpusFormat::LlmcShard,
            "text",
            &small,
            dir.path(),
            "train",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("token 2 has id 40000") && err.contains("another tokenizer"),
            "{err}"
        );
    }

    #[test]
    fn corpus_errors_surface_and_leave_no_cache() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let src = dir.path().join("bad.txt");
        std::fs::write(&src, b"fine\n\nbad \xff\n").unwrap();
        let err = TokenCache::build_or_open(
            &[src],
            CorpusFormat::TextBlankLines,
            "text",
            &tok,
            &cache_dir,
            "train",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bad.txt") && err.contains("invalid UTF-8 at byte 10"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(&cache_dir).unwrap().count(),
            0,
            "partial cache left"
        );
    }

    #[test]
    fn u32_caches_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = write(dir.path(), "c.txt", "x");
        let header = Header {
            width: TokenWidth::U32,
            tokens: 3,
            documents: 1,
            text_bytes: 1,
            tokenizer_hash: "ab".repeat(32),
            fingerprint: SourceFingerprint::of(&[src], CorpusFormat::Auto, "t").unwrap(),
        };
        let path = dir.path().join("wide.tokens");
        let mut bytes = header.encode();
        for t in [0u32, 70_000, u32::MAX] {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let (read, offset) = Header::read(&path).unwrap();
        assert_eq!(read.width, TokenWidth::U32);
        assert_eq!(read.tokenizer_hash, header.tokenizer_hash);
        let cache = TokenCache::map(&path, read, offset).unwrap();
        assert_eq!(cache.tokens().to_vec(), [0, 70_000, u32::MAX]);
    }

    #[test]
    fn tokens_read_slices_and_widths() {
        let t = Tokens::from_vec((0..10).collect());
        let s = t.slice(3..8);
        assert_eq!(s.to_vec(), [3, 4, 5, 6, 7]);
        assert_eq!(s.slice(1..3).to_vec(), [4, 5]);
        let mut seen = Vec::new();
        t.for_each_chunk(4, |start, c| seen.push((start, c.to_vec())));
        assert_eq!(
            seen,
            [
                (0, vec![0, 1, 2, 3]),
                (4, vec![4, 5, 6, 7]),
                (8, vec![8, 9])
            ]
        );
        assert_eq!(TokenWidth::for_vocab(65536), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65537), TokenWidth::U32);
    }
}
