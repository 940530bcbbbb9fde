//! Corpus readers: stream documents out of text and JSON files (plain, gzip or zstd), and
//! tokens out of (and into) llm.c shards, without ever holding a whole file in memory.

use crate::error::{Error, Result};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::tokenizer::END_OF_TEXT;

/// How a corpus file is laid out; part of the `[data]` schema in forge-protocol.
pub use forge_protocol::run_config::CorpusFormat;

/// The magic number that opens an llm.c token shard.
pub(crate) const LLMC_MAGIC: i32 = 20240520;
/// The llm.c shard version with uint16 tokens, the only one Forge reads and writes.
pub(crate) const LLMC_VERSION: i32 = 1;
const LLMC_HEADER_BYTES: u64 = 256 * 4;
/// Tokens per chunk when streaming a shard body.
const SHARD_CHUNK_TOKENS: usize = 1 << 20;
/// Bytes looked at to tell the text formats apart.
const SNIFF_BYTES: u64 = 1 << 20;
/// The four bytes that open (and end) a Parquet file.
const PARQUET_MAGIC: &[u8] = b"PAR1";
/// Documents buffered between the JSON parser thread and the consumer.
const JSON_CHANNEL_DOCS: usize = 256;

/// A stream of documents (trimmed, never empty) or the error that ended it.
pub struct Documents {
    inner: Box<dyn Iterator<Item = Result<String>> + Send>,
}

impl fmt::Debug for Documents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Documents").finish_non_exhaustive()
    }
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        self.inner.next()
    }
}

/// What a corpus file holds once its format is known.
#[derive(Debug)]
pub(crate) enum Content {
    Documents(Documents),
    Tokens(LlmcShard),
}

/// Opens a corpus file in `format` (resolving `Auto`), ready to stream.
pub(crate) fn open(path: &Path, format: CorpusFormat, text_field: &str) -> Result<Content> {
    let format = resolve_format(path, format)?;
    Ok(match format {
        CorpusFormat::LlmcShard => Content::Tokens(LlmcShard::open(path)?),
        CorpusFormat::TextEot => Content::Documents(text_documents(path, TextLayout::Eot)?),
        CorpusFormat::TextBlankLines => {
            Content::Documents(text_documents(path, TextLayout::BlankLines)?)
        }
        CorpusFormat::Json => Content::Documents(json_documents(path, text_field)?),
        CorpusFormat::Jsonl => Content::Documents(jsonl_documents(path, text_field)?),
        CorpusFormat::Parquet => Content::Documents(parquet_documents(path, text_field)?),
        CorpusFormat::Auto => unreachable!("resolve_format never returns Auto"),
    })
}

/// Streams the documents of a text or JSON corpus; token shards have none to give.
pub fn documents(path: &Path, format: CorpusFormat, text_field: &str) -> Result<Documents> {
    match open(path, format, text_field)? {
        Content::Documents(docs) => Ok(docs),
        Content::Tokens(_) => Err(corpus_error(
            path,
            "is an llm.c token shard: it holds tokens, not text, so it cannot train a \
             tokenizer; train on the text it came from or load that tokenizer's json",
        )),
    }
}

/// `format` itself, or for `Auto` the format detected from the file.
pub(crate) fn resolve_format(path: &Path, format: CorpusFormat) -> Result<CorpusFormat> {
    check_not_empty(path)?;
    match format {
        CorpusFormat::Auto => detect_format(path),
        known => Ok(known),
    }
}

/// Guesses a file's format (of its decompressed bytes, for gzip and zstd files, whose
/// compression suffix is skipped): llm.c magic in the first 4 bytes → shard; `PAR1` or
/// `.parquet` → Parquet; `.jsonl`/`.ndjson` →
/// JSONL; `.json` or a leading `[` → JSON; a leading `{` whose first line is a whole JSON value
/// → JSONL, else JSON; otherwise text, with `<|endoftext|>` in the first MiB → `text_eot`, and
/// blank-line separated if not. A convenience: set `format` when a corpus could be read wrongly.
pub fn detect_format(path: &Path) -> Result<CorpusFormat> {
    let mut head = Vec::new();
    open_stream(path)?
        .take(SNIFF_BYTES)
        .read_to_end(&mut head)
        .map_err(|e| corpus_error(path, read_error(path, &e)))?;
    if head.len() >= 4 && i32::from_le_bytes([head[0], head[1], head[2], head[3]]) == LLMC_MAGIC {
        return Ok(CorpusFormat::LlmcShard);
    }
    if head.starts_with(PARQUET_MAGIC) {
        return Ok(CorpusFormat::Parquet);
    }
    match layout_extension(path).as_deref() {
        Some("parquet") => return Ok(CorpusFormat::Parquet),
        Some("jsonl" | "ndjson") => return Ok(CorpusFormat::Jsonl),
        Some("json") => return Ok(CorpusFormat::Json),
        _ => {}
    }
    match head.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => return Ok(CorpusFormat::Json),
        Some(b'{') => {
            let first_line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
            let whole = serde_json::from_slice::<IgnoredAny>(first_line).is_ok();
            return Ok(if whole {
                CorpusFormat::Jsonl
            } else {
                CorpusFormat::Json
            });
        }
        _ => {}
    }
    if find(&head, END_OF_TEXT.as_bytes()).is_some() {
        Ok(CorpusFormat::TextEot)
    } else {
        Ok(CorpusFormat::TextBlankLines)
    }
}

/// How a corpus file is compressed, from its first bytes (read, then the file is rewound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn compression_of(file: &mut File) -> std::io::Result<Compression> {
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// A corpus file's bytes, decompressed when it is gzip (`.jsonl.gz`, `.txt.gz`; several
/// members are read as one stream) or zstd (`.jsonl.zst`), told by its first bytes.
fn open_stream(path: &Path) -> Result<Box<dyn Read + Send>> {
    let mut file = File::open(path).map_err(|e| cannot_open(path, &e))?;
    let compression = compression_of(&mut file)
        .map_err(|e| corpus_error(path, format!("cannot read it: {e}")))?;
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(|e| corpus_error(path, format!("cannot start zstd on it: {e}")))?,
        ),
    })
}

/// A read error of a corpus, naming a damaged compressed file as such.
fn read_error(path: &Path, e: &std::io::Error) -> String {
    let compressed = File::open(path)
        .and_then(|mut f| compression_of(&mut f))
        .is_ok_and(|c| c != Compression::None);
    if compressed {
        format!("cannot decompress it ({e}): the file is truncated or damaged; download it again")
    } else {
        format!("cannot read it ({e})")
    }
}

/// The file name's extension that tells the layout: `x.jsonl.gz` → `jsonl`.
fn layout_extension(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let name = ["gz", "gzip", "zst", "zstd"]
        .iter()
        .find_map(|c| name.strip_suffix(&format!(".{c}")))
        .unwrap_or(&name);
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_string)
}

fn corpus_error(path: &Path, why: impl Into<String>) -> Error {
    Error::Corpus {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn cannot_open(path: &Path, e: &std::io::Error) -> Error {
    corpus_error(
        path,
        format!("cannot open it ({e}); check data.train / data.val"),
    )
}

fn check_not_empty(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| cannot_open(path, &e))?;
    if !meta.is_file() {
        return Err(corpus_error(path, "is not a regular file"));
    }
    if meta.len() == 0 {
        return Err(corpus_error(
            path,
            "is empty (0 bytes); point data.train / data.val at a file with documents",
        ));
    }
    Ok(())
}

fn no_documents(path: &Path) -> Error {
    corpus_error(
        path,
        "holds no documents (only whitespace or separators); point data.train / data.val at \
         a corpus with text",
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Text corpora

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextLayout {
    Eot,
    BlankLines,
}

fn text_documents(path: &Path, layout: TextLayout) -> Result<Documents> {
    let file = open_stream(path)?;
    Ok(Documents {
        inner: Box::new(TextDocuments {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            layout,
            line: Vec::new(),
            line_start: 0,
            line_number: 0,
            doc: Vec::new(),
            doc_start: None,
            ready: VecDeque::new(),
            emitted: 0,
            done: false,
        }),
    })
}

/// Reads line by line, so memory stays at one document plus one line.
struct TextDocuments {
    path: PathBuf,
    reader: BufReader<Box<dyn Read + Send>>,
    layout: TextLayout,
    line: Vec<u8>,
    /// Byte offset of `line` in the file.
    line_start: u64,
    /// 1-based number of `line`.
    line_number: u64,
    doc: Vec<u8>,
    /// Byte offset and line number of the first byte of `doc`, for error locations.
    doc_start: Option<(u64, u64)>,
    ready: VecDeque<Result<String>>,
    emitted: usize,
    done: bool,
}

impl TextDocuments {
    fn push(&mut self, bytes: &[u8], offset_in_line: usize) {
        if self.doc_start.is_none() {
            self.doc_start = Some((self.line_start + offset_in_line as u64, self.line_number));
        }
        self.doc.extend_from_slice(bytes);
    }

    /// Validates and queues the current document; blank documents are dropped.
    fn finish_document(&mut self) {
        let bytes = std::mem::take(&mut self.doc);
        let Some((start, start_line)) = self.doc_start.take() else {
            return;
        };
        if let Some(at) = bytes.iter().position(|&b| b == 0) {
            let err = not_text(&self.path, "NUL byte", start, start_line, &bytes, at);
            self.ready.push_back(Err(err));
            return;
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let err = not_text(
                    &self.path,
                    "invalid UTF-8",
                    start,
                    start_line,
                    e.as_bytes(),
                    at,
                );
                self.ready.push_back(Err(err));
                return;
            }
        };
        let trimmed = text.trim();
        if !trimmed.is_empty() {
            self.emitted += 1;
            let doc = if trimmed.len() == text.len() {
                text
            } else {
                trimmed.to_string()
            };
            self.ready.push_back(Ok(doc));
        }
    }

    /// Reads one line and queues the documents it completes; false at end of file.
    fn read_line(&mut self) -> Result<bool> {
        self.line_start += self.line.len() as u64;
        self.line.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(|e| corpus_error(&self.path, read_error(&self.path, &e)))?;
        if n == 0 {
            return Ok(false);
        }
        self.line_number += 1;
        let line = std::mem::take(&mut self.line);
        match self.layout {
            TextLayout::BlankLines => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    self.finish_document();
                } else {
                    self.push(&line, 0);
                }
            }
            TextLayout::Eot => {
                let mut from = 0;
                while let Some(at) = find(&line[from..], END_OF_TEXT.as_bytes()) {
                    self.push(&line[from..from + at], from);
                    self.finish_document();
                    from += at + END_OF_TEXT.len();
                }
                self.push(&line[from..], from);
            }
        }
        self.line = line;
        Ok(true)
    }
}

/// The error for bytes that cannot be text, located by file offset and line number.
fn not_text(path: &Path, what: &str, start: u64, start_line: u64, doc: &[u8], at: usize) -> Error {
    let line = start_line + doc[..at].iter().filter(|&&b| b == b'\n').count() as u64;
    corpus_error(
        path,
        format!(
            "{what} at byte {} (line {line}); text corpora must be UTF-8 text. Is this a binary \
             file? For llm.c token shards set format = \"llmc_shard\"",
            start + at as u64
        ),
    )
}

impl Iterator for TextDocuments {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                if item.is_err() {
                    // A corpus error is final: what follows cannot be trusted to line up.
                    self.done = true;
                    self.ready.clear();
                }
                return Some(item);
            }
            if self.done {
                return None;
            }
            match self.read_line() {
                Ok(true) => {}
                Ok(false) => {
                    self.finish_document();
                    self.done = true;
                    if self.emitted == 0 && self.ready.is_empty() {
                        return Some(Err(no_documents(&self.path)));
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON corpora

/// Streams a JSON corpus: a parser thread walks the file with serde visitors that handle one
/// element at a time and hands documents over a bounded channel, so neither the file nor a
/// `Vec` of its elements is ever held whole.
fn json_documents(path: &Path, text_field: &str) -> Result<Documents> {
    let file = open_stream(path)?;
    let (tx, rx) = sync_channel(JSON_CHANNEL_DOCS);
    let thread_path = path.to_path_buf();
    let field = text_field.to_string();
    std::thread::Builder::new()
        .name("forge-json-corpus".into())
        .spawn(move || parse_json(file, &thread_path, &field, &tx))
        .map_err(|e| corpus_error(path, format!("cannot start its parser thread: {e}")))?;
    Ok(Documents {
        inner: Box::new(ChannelDocuments { rx }),
    })
}

struct ChannelDocuments {
    rx: Receiver<Result<String>>,
}

impl Iterator for ChannelDocuments {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        self.rx.recv().ok()
    }
}

fn parse_json(
    file: Box<dyn Read + Send>,
    path: &Path,
    field: &str,
    tx: &SyncSender<Result<String>>,
) {
    let mut sink = Sink {
        tx,
        field,
        elements: 0,
        emitted: 0,
        stopped: false,
    };
    // A read error (a truncated gzip) may reach the parser inside a record, where it reports
    // it as that record's error: the reader keeps the first one, which is the real cause.
    let failed = std::cell::RefCell::new(None);
    let reader = KeepsReadError {
        inner: BufReader::with_capacity(1 << 20, file),
        failed: &failed,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parsed = TopLevel { sink: &mut sink }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if sink.stopped {
        return;
    }
    let last = match parsed {
        Err(_) if failed.borrow().is_some() => {
            let e = failed.take().expect("checked above");
            Err(corpus_error(path, read_error(path, &e)))
        }
        Err(e) => Err(corpus_error(
            path,
            format!("{e}; expected {{\"texts\": [..]}}, an array, or format = \"jsonl\""),
        )),
        Ok(()) if sink.emitted == 0 => Err(no_documents(path)),
        Ok(()) => return,
    };
    // The consumer may be gone already; then nobody needs the error.
    let _ = tx.send(last);
}

/// A reader that keeps the first error it hits (see `parse_json`).
struct KeepsReadError<'a, R> {
    inner: R,
    failed: &'a std::cell::RefCell<Option<std::io::Error>>,
}

impl<R: Read> Read for KeepsReadError<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            let mut failed = self.failed.borrow_mut();
            if failed.is_none() {
                *failed = Some(std::io::Error::new(e.kind(), e.to_string()));
            }
        })
    }
}

/// Where parsed documents go; counts elements so errors can say which one is wrong.
struct Sink<'a> {
    tx: &'a SyncSender<Result<String>>,
    field: &'a str,
    elements: usize,
    emitted: usize,
    /// The consumer hung up; parsing stops quietly.
    stopped: bool,
}

impl Sink<'_> {
    fn send<E: de::Error>(&mut self, text: &str) -> std::result::Result<(), E> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        self.emitted += 1;
        if self.tx.send(Ok(text.to_string())).is_err() {
            self.stopped = true;
            return Err(E::custom("the document consumer stopped"));
        }
        Ok(())
    }
}

/// The whole file: an object (whose `texts` array holds the documents) or an array.
struct TopLevel<'s, 'a> {
    sink: &'s mut Sink<'a>,
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{\"texts\": [..]}} or an array of strings or of records with a \"{}\" field",
            self.sink.field
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<(), A::Error> {
        Elements { sink: self.sink }.visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut found = false;
        let mut keys = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "texts" && !found {
                found = true;
                map.next_value_seed(Elements {
                    sink: &mut *self.sink,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
                keys.push(key);
            }
        }
        if !found {
            return Err(de::Error::custom(format!(
                "the top-level object has no \"texts\" array (its keys: {})",
                keys.join(", ")
            )));
        }
        Ok(())
    }
}

/// An array of documents, taken one element at a time.
struct Elements<'s, 'a> {
    sink: &'s mut Sink<'a>,
}

impl<'de> DeserializeSeed<'de> for Elements<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of documents")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq
            .next_element_seed(Element {
                sink: &mut *self.sink,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One document: a string, or a record whose `text_field` is a string.
struct Element<'s, 'a> {
    sink: &'s mut Sink<'a>,
}

impl<'de> DeserializeSeed<'de> for Element<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        self.sink.elements += 1;
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "element {} to be a string or a record with a \"{}\" string field",
            self.sink.elements, self.sink.field
        )
    }

    fn visit_str<E: de::Error>(self, text: &str) -> std::result::Result<(), E> {
        self.sink.send(text)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut text: Option<String> = None;
        let mut keys = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == self.sink.field {
                text = Some(map.next_value::<String>().map_err(|e| {
                    de::Error::custom(format!(
                        "record {}: field \"{key}\" is not a string ({e})",
                        self.sink.elements
                    ))
                })?);
            } else {
                map.next_value::<IgnoredAny>()?;
                keys.push(key);
            }
        }
        match text {
            Some(text) => self.sink.send(&text),
            None => Err(de::Error::custom(missing_field(
                &format!("record {}", self.sink.elements),
                self.sink.field,
                &keys,
            ))),
        }
    }
}

fn missing_field(which: &str, field: &str, keys: &[String]) -> String {
    format!(
        "{which} has no \"{field}\" field (its fields: {}); set data.text_field to the field \
         that holds the text",
        keys.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Parquet corpora

/// Streams the string column `text_field` of a Parquet file, one row group at a time; null and
/// blank values are skipped.
fn parquet_documents(path: &Path, text_field: &str) -> Result<Documents> {
    use parquet::basic::{ConvertedType, LogicalType, Type as Physical};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::RowAccessor;
    let file = File::open(path).map_err(|e| cannot_open(path, &e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| {
        corpus_error(
            path,
            format!("is not a readable Parquet file ({e}); is it truncated? download it again"),
        )
    })?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let fields = schema.root_schema().get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    let Some(field) = fields.iter().find(|f| f.name() == text_field) else {
        return Err(corpus_error(
            path,
            format!(
                "has no column \"{text_field}\" (its columns: {}); set data.text_field to the \
                 column that holds the text",
                names.join(", ")
            ),
        ));
    };
    let info = field.get_basic_info();
    let is_string = field.is_primitive()
        && field.get_physical_type() == Physical::BYTE_ARRAY
        && (matches!(info.logical_type_ref(), Some(LogicalType::String))
            || info.converted_type() == ConvertedType::UTF8
            || info.logical_type_ref().is_none() && info.converted_type() == ConvertedType::NONE);
    if !is_string {
        return Err(corpus_error(
            path,
            format!(
                "column \"{text_field}\" does not hold strings ({}); set data.text_field to the \
                 column that holds the text",
                if field.is_primitive() {
                    format!("{:?}", field.get_physical_type())
                } else {
                    "a nested group".to_string()
                }
            ),
        ));
    }
    let projection = parquet::schema::types::Type::group_type_builder(schema.root_schema().name())
        .with_fields(vec![field.clone()])
        .build()
        .map_err(|e| corpus_error(path, format!("cannot select column {text_field}: {e}")))?;
    let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader))
        .project(Some(projection))
        .map_err(|e| corpus_error(path, format!("cannot read column {text_field}: {e}")))?;
    let path = path.to_path_buf();
    let mut rows = rows.enumerate();
    let mut emitted = 0usize;
    let mut done = false;
    let inner = std::iter::from_fn(move || {
        while !done {
            let Some((i, row)) = rows.next() else {
                done = true;
                return (emitted == 0).then(|| Err(no_documents(&path)));
            };
            let text = match row {
                Ok(row) => match row.get_string(0) {
                    Ok(text) => text.trim().to_string(),
                    // Null (or, without a string annotation, bytes that are not UTF-8).
                    Err(_) => match row.get_bytes(0) {
                        Ok(bytes) => match std::str::from_utf8(bytes.data()) {
                            Ok(text) => text.trim().to_string(),
                            Err(e) => {
                                done = true;
                                return Some(Err(corpus_error(
                                    &path,
                                    format!("row {}: column is not UTF-8 text ({e})", i + 1),
                                )));
                            }
                        },
                        Err(_) => continue,
                    },
                },
                Err(e) => {
                    done = true;
                    return Some(Err(corpus_error(
                        &path,
                        format!(
                            "row {}: cannot read it ({e}); is the file truncated?",
                            i + 1
                        ),
                    )));
                }
            };
            if text.is_empty() {
                continue;
            }
            emitted += 1;
            return Some(Ok(text));
        }
        None
    });
    Ok(Documents {
        inner: Box::new(inner),
    })
}

fn jsonl_documents(path: &Path, text_field: &str) -> Result<Documents> {
    let file = open_stream(path)?;
    let path = path.to_path_buf();
    let field = text_field.to_string();
    let mut emitted = 0usize;
    let mut failed = false;
    let mut lines = BufReader::with_capacity(1 << 20, file).lines().enumerate();
    let inner = std::iter::from_fn(move || {
        while !failed {
            let Some((i, line)) = lines.next() else {
                failed = true;
                return (emitted == 0).then(|| Err(no_documents(&path)));
            };
            let result = line
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        format!("line {}: cannot read it ({e}); is the file UTF-8?", i + 1)
                    } else {
                        format!("line {}: {}", i + 1, read_error(&path, &e))
                    }
                })
                .and_then(|line| jsonl_record(&line, &field, i + 1));
            match result {
                Ok(None) => continue,
                Ok(Some(doc)) => {
                    emitted += 1;
                    return Some(Ok(doc));
                }
                Err(why) => {
                    failed = true;
                    return Some(Err(corpus_error(&path, why)));
                }
            }
        }
        None
    });
    Ok(Documents {
        inner: Box::new(inner),
    })
}

/// The document on one JSONL line; `None` for blank lines and blank documents.
fn jsonl_record(
    line: &str,
    field: &str,
    number: usize,
) -> std::result::Result<Option<String>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("line {number}: not a JSON value ({e})"))?;
    let text = match value {
        serde_json::Value::String(text) => text,
        serde_json::Value::Object(mut record) => match record.remove(field) {
            Some(serde_json::Value::String(text)) => text,
            Some(other) => {
                return Err(format!(
                    "line {number}: field \"{field}\" is not a string but {other}"
                ));
            }
            None => {
                let keys: Vec<String> = record.keys().cloned().collect();
                return Err(missing_field(&format!("line {number}"), field, &keys));
            }
        },
        other => {
            return Err(format!(
                "line {number}: expected a string or a record with a \"{field}\" field, found {}",
                truncate(&other.to_string(), 40)
            ));
        }
    };
    let trimmed = text.trim();
    Ok((!trimmed.is_empty()).then(|| trimmed.to_string()))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// llm.c token shards

/// An llm.c token shard whose header and size have been checked.
#[derive(Debug, Clone)]
pub struct LlmcShard {
    path: PathBuf,
    tokens: u64,
}

impl LlmcShard {
    /// Checks the magic, version and that the body holds exactly the tokens the header claims.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| cannot_open(path, &e))?;
        let compression = compression_of(&mut file)
            .map_err(|e| corpus_error(path, format!("cannot read it: {e}")))?;
        if compression != Compression::None {
            return Err(corpus_error(
                path,
                "is a compressed llm.c shard: shards are read in place, so decompress it first",
            ));
        }
        let size = file
            .metadata()
            .map_err(|e| corpus_error(path, format!("cannot stat it: {e}")))?
            .len();
        let redo = "re-create the shard (e.g. rerun the llm.c data script)";
        if size < LLMC_HEADER_BYTES {
            return Err(corpus_error(
                path,
                format!(
                    "is {size} bytes, shorter than the {LLMC_HEADER_BYTES}-byte llm.c shard \
                     header: truncated or not a shard; {redo}"
                ),
            ));
        }
        let mut header = [0u8; LLMC_HEADER_BYTES as usize];
        file.read_exact(&mut header)
            .map_err(|e| corpus_error(path, format!("cannot read the header: {e}")))?;
        let word = |i: usize| {
            i32::from_le_bytes([
                header[4 * i],
                header[4 * i + 1],
                header[4 * i + 2],
                header[4 * i + 3],
            ])
        };
        if word(0) != LLMC_MAGIC {
            return Err(corpus_error(
                path,
                format!(
                    "has magic {} where an llm.c token shard has {LLMC_MAGIC}: not a shard; set \
                     format to the file's real format (or \"auto\")",
                    word(0)
                ),
            ));
        }
        if word(1) != LLMC_VERSION {
            return Err(corpus_error(
                path,
                format!(
                    "is llm.c shard version {}; Forge reads version {LLMC_VERSION} (uint16 \
                     tokens) only",
                    word(1)
                ),
            ));
        }
        let tokens = u64::try_from(word(2))
            .map_err(|_| corpus_error(path, format!("header claims {} tokens; {redo}", word(2))))?;
        let expected = LLMC_HEADER_BYTES + 2 * tokens;
        if size != expected {
            let body = size - LLMC_HEADER_BYTES;
            let why = if size < expected {
                format!(
                    "is truncated: the header says {tokens} tokens ({} body bytes) but the body \
                     has {body} bytes; {redo}",
                    2 * tokens
                )
            } else {
                format!(
                    "has {} bytes after the {tokens} tokens its header announces; {redo}",
                    size - expected
                )
            };
            return Err(corpus_error(path, why));
        }
        if tokens == 0 {
            return Err(corpus_error(path, format!("holds 0 tokens; {redo}")));
        }
        Ok(Self {
            path: path.to_path_buf(),
            tokens,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens in the body.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Streams the tokens in chunks of about a million.
    pub fn chunks(&self) -> Result<impl Iterator<Item = Result<Vec<u32>>> + Send + use<>> {
        let mut file = File::open(&self.path).map_err(|e| cannot_open(&self.path, &e))?;
        file.seek(SeekFrom::Start(LLMC_HEADER_BYTES))
            .map_err(|e| corpus_error(&self.path, format!("cannot seek past the header: {e}")))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut left = self.tokens as usize;
        let path = self.path.clone();
        let mut bytes = Vec::new();
        Ok(std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let n = left.min(SHARD_CHUNK_TOKENS);
            left -= n;
            bytes.resize(2 * n, 0);
            if let Err(e) = reader.read_exact(&mut bytes) {
                left = 0;
                return Some(Err(corpus_error(
                    &path,
                    format!("read failed ({e}); was the shard truncated while in use?"),
                )));
            }
            Some(Ok(bytes
                .chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
                .collect()))
        }))
    }

    /// Reads every token; for small shards and tests.
    pub fn read_all(&self) -> Result<Vec<u32>> {
        let mut all = Vec::with_capacity(self.tokens as usize);
        for chunk in self.chunks()? {
            all.extend(chunk?);
        }
        Ok(all)
    }
}

/// Writes `tokens` as an llm.c version-1 shard, atomically. Ids must fit in uint16.
pub fn write_llmc_shard(path: &Path, tokens: &[u32]) -> Result<()> {
    let count = i32::try_from(tokens.len()).map_err(|_| {
        corpus_error(
            path,
            format!(
                "{} tokens do not fit one llm.c shard (at most {}); split them",
                tokens.len(),
                i32::MAX
            ),
        )
    })?;
    let mut bytes = Vec::with_capacity(LLMC_HEADER_BYTES as usize + 2 * tokens.len());
    for word in [LLMC_MAGIC, LLMC_VERSION, count] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.resize(LLMC_HEADER_BYTES as usize, 0);
    for (i, &t) in tokens.iter().enumerate() {
        let t = u16::try_from(t).map_err(|_| {
            corpus_error(
                path,
                format!(
                    "token {i} has id {t}, which does not fit the uint16 of an llm.c v1 shard; \
                     use a vocabulary of at most 65536"
                ),
            )
        })?;
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    super::write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_data;

    fn all_docs(path: &Path, format: CorpusFormat, field: &str) -> Result<Vec<String>> {
        documents(path, format, field)?.collect()
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn eot_text_splits_at_every_separator_even_mid_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "a.txt",
            b"First story.\nSecond line.\n<|endoftext|>\nTwo<|endoftext|>Three\n\n<|endoftext|>\n  \n",
        );
        let docs = all_docs(&path, CorpusFormat::TextEot, "text").unwrap();
        assert_eq!(docs, ["First story.\nSecond line.", "Two", "Three"]);
        assert_eq!(detect_format(&path).unwrap(), CorpusFormat::TextEot);
    }

    #[test]
    fn blank_line_text_splits_at_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "b.txt",
            b"\n\nOne.\nStill one.\n\n\n \t\r\nTwo.\r\n\r\nThree.",
        );
        let docs = all_docs(&path, CorpusFormat::TextBlankLines, "text").unwrap();
        assert_eq!(docs, ["One.\nStill one.", "Two.", "Three."]);
        assert_eq!(detect_format(&path).unwrap(), CorpusFormat::TextBlankLines);
    }

    #[test]
    fn json_texts_arrays_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let texts = write(
            &dir,
            "t.json",
            br#"{"meta": {"n": [1, 2]}, "texts": ["a \"quoted\" story", "  ", "b\nc"], "x": 1}"#,
        );
        assert_eq!(
            all_docs(&texts, CorpusFormat::Json, "story").unwrap(),
            ["a \"quoted\" story", "b\nc"]
        );
        let records = write(
            &dir,
            "r.json",
            br#"[{"story": "one", "summary": "s", "words": ["x"]}, {"instruction": {}, "story": "two"}]"#,
        );
        assert_eq!(
            all_docs(&records, CorpusFormat::Json, "story").unwrap(),
            ["one", "two"]
        );
        let strings = write(&dir, "s.dat", b" [\"p\", \"q\"]");
        assert_eq!(detect_format(&strings).unwrap(), CorpusFormat::Json);
        assert_eq!(
            all_docs(&strings, CorpusFormat::Auto, "story").unwrap(),
            ["p", "q"]
        );
    }

    #[test]
    fn jsonl_records_and_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "r.jsonl",
            b"{\"text\": \"one\", \"id\": 1}\n\n\"two\"\n{\"text\": \"three\\nlines\"}\n",
        );
        assert_eq!(detect_format(&path).unwrap(), CorpusFormat::Jsonl);
        assert_eq!(
            all_docs(&path, CorpusFormat::Auto, "text").unwrap(),
            ["one", "two", "three\nlines"]
        );
        // Without the extension, a first line that is a whole object still means JSONL.
        let bare = write(
            &dir,
            "r.data",
            b"{\"text\": \"one\"}\n{\"text\": \"two\"}\n",
        );
        assert_eq!(detect_format(&bare).unwrap(), CorpusFormat::Jsonl);
    }

    #[test]
    fn llmc_shards_round_trip_and_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let tokens: Vec<u32> = (0..3000u32).map(|i| (i * 7919) % 65536).collect();
        write_llmc_shard(&path, &tokens).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            1024 + 2 * tokens.len() as u64
        );
        let shard = LlmcShard::open(&path).unwrap();
        assert_eq!(shard.len(), 3000);
        assert_eq!(shard.read_all().unwrap(), tokens);
        assert_eq!(detect_format(&path).unwrap(), CorpusFormat::LlmcShard);
        let err = documents(&path, CorpusFormat::Auto, "text").unwrap_err();
        assert!(err.to_string().contains("holds tokens, not text"), "{err}");

        let err = write_llmc_shard(&path, &[1, 70000])
            .unwrap_err()
            .to_string();
        assert!(err.contains("token 1 has id 70000"), "{err}");
        // The failed write left the earlier shard intact.
        assert_eq!(LlmcShard::open(&path).unwrap().read_all().unwrap(), tokens);
    }

    #[test]
    fn shard_with_wrong_magic_or_truncated_body_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        write_llmc_shard(&path, &[5; 100]).unwrap();
        let good = std::fs::read(&path).unwrap();

        let truncated = write(&dir, "cut.bin", &good[..good.len() - 3]);
        let err = LlmcShard::open(&truncated).unwrap_err().to_string();
        assert!(
            err.contains("cut.bin") && err.contains("truncated") && err.contains("100 tokens"),
            "{err}"
        );
        let mut bad = good.clone();
        bad[..4].copy_from_slice(&1234i32.to_le_bytes());
        let wrong_magic = write(&dir, "magic.bin", &bad);
        let err = LlmcShard::open(&wrong_magic).unwrap_err().to_string();
        assert!(
            err.contains("magic 1234") && err.contains("20240520"),
            "{err}"
        );
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&2i32.to_le_bytes());
        let v2 = write(&dir, "v2.bin", &bad);
        let err = LlmcShard::open(&v2).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        let short = write(&dir, "short.bin", &good[..100]);
        let err = LlmcShard::open(&short).unwrap_err().to_string();
        assert!(err.contains("shorter than the 1024-byte"), "{err}");
        let mut long = good;
        long.extend_from_slice(&[0, 0]);
        let long = write(&dir, "long.bin", &long);
        let err = LlmcShard::open(&long).unwrap_err().to_string();
        assert!(err.contains("2 bytes after the 100 tokens"), "{err}");
    }

    #[test]
    fn empty_and_blank_files_are_errors_in_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(&dir, "empty.txt", b"");
        for format in [
            CorpusFormat::Auto,
            CorpusFormat::TextEot,
            CorpusFormat::Json,
            CorpusFormat::LlmcShard,
        ] {
            let err = match open(&empty, format, "text") {
                Ok(_) => panic!("{format}: empty file accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains("empty.txt") && err.contains("is empty"),
                "{err}"
            );
        }
        let cases: [(&str, &[u8], CorpusFormat); 4] = [
            ("blank.txt", b"\n \n\t\n", CorpusFormat::TextBlankLines),
            (
                "seps.txt",
                b"<|endoftext|>\n<|endoftext|>",
                CorpusFormat::TextEot,
            ),
            ("none.json", br#"{"texts": ["", " "]}"#, CorpusFormat::Json),
            ("none.jsonl", b"\n\n", CorpusFormat::Jsonl),
        ];
        for (name, bytes, format) in cases {
            let path = write(&dir, name, bytes);
            let err = all_docs(&path, format, "text").unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("no documents"), "{err}");
        }
    }

    #[test]
    fn invalid_utf8_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "bad.txt",
            b"good one\n<|endoftext|>\nfine\nbad \xff\xfe here\n",
        );
        let mut docs = documents(&path, CorpusFormat::TextEot, "text").unwrap();
        assert_eq!(docs.next().unwrap().unwrap(), "good one");
        let err = docs.next().unwrap().unwrap_err().to_string();
        assert!(
            err.contains("bad.txt") && err.contains("invalid UTF-8 at byte 32 (line 4)"),
            "{err}"
        );
        assert!(docs.next().is_none(), "iteration continued after an error");

        // Random bytes, as a binary file would be, in auto mode.
        let mut state = 0x1234_5678_u64;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let path = write(&dir, "garbage.bin", &garbage);
        let err = all_docs(&path, CorpusFormat::Auto, "text")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("garbage.bin") && err.contains("binary file"),
            "{err}"
        );

        let path = write(&dir, "nul.txt", b"text\x00more");
        let err = all_docs(&path, CorpusFormat::TextBlankLines, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("NUL byte at byte 4 (line 1)"), "{err}");

        let path = write(&dir, "bad.jsonl", b"{\"text\": \"ok\"}\n\xff\n");
        let err = all_docs(&path, CorpusFormat::Jsonl, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("UTF-8"), "{err}");
        let path = write(&dir, "bad.json", b"[\"ok\", \"\xff\"]");
        let err = all_docs(&path, CorpusFormat::Json, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.json") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_or_mistyped_text_field_names_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "r.json",
            br#"[{"story": "ok"}, {"summary": "s", "words": []}]"#,
        );
        let err = all_docs(&path, CorpusFormat::Json, "story")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.json")
                && err.contains("record 2 has no \"story\" field (its fields: summary, words)")
                && err.contains("data.text_field"),
            "{err}"
        );
        let path = write(&dir, "n.json", br#"[{"story": 5}]"#);
        let err = all_docs(&path, CorpusFormat::Json, "story")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field \"story\" is not a string"), "{err}");
        let path = write(&dir, "o.json", br#"{"stories": ["a"]}"#);
        let err = all_docs(&path, CorpusFormat::Json, "story")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no \"texts\" array (its keys: stories)"),
            "{err}"
        );
        let path = write(&dir, "k.json", br#"[3]"#);
        let err = all_docs(&path, CorpusFormat::Json, "story")
            .unwrap_err()
            .to_string();
        assert!(err.contains("element 1 to be a string"), "{err}");

        let path = write(&dir, "r.jsonl", b"{\"text\": \"a\"}\n{\"body\": \"b\"}\n");
        let err = all_docs(&path, CorpusFormat::Jsonl, "text")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2 has no \"text\" field (its fields: body)"),
            "{err}"
        );
        let path = write(&dir, "broken.json", br#"{"texts": ["a", "b"#);
        let err = all_docs(&path, CorpusFormat::Json, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.json") && err.contains("EOF"), "{err}");
    }

    #[test]
    fn consumer_may_stop_early() {
        let dir = tempfile::tempdir().unwrap();
        let many: Vec<String> = (0..10 * JSON_CHANNEL_DOCS)
            .map(|i| format!("doc {i}"))
            .collect();
        let path = write(
            &dir,
            "many.json",
            serde_json::to_string(&many).unwrap().as_bytes(),
        );
        let first: Vec<String> = documents(&path, CorpusFormat::Json, "text")
            .unwrap()
            .take(3)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(first, ["doc 0", "doc 1", "doc 2"]);
    }

    #[test]
    fn shared_tinystories_samples_read_in_every_layout() {
        let train = test_data::tinystories("train-sample.txt");
        assert_eq!(detect_format(&train).unwrap(), CorpusFormat::TextEot);
        let docs = all_docs(&train, CorpusFormat::Auto, "text").unwrap();
        // 2316 separators; the sample ends mid-story, which makes one more document.
        assert_eq!(docs.len(), 2317);
        assert!(docs[0].starts_with("One day, a little girl named Lily found a needle"));
        assert!(docs.iter().all(|d| !d.contains(END_OF_TEXT)));

        let valid = test_data::tinystories("valid-sample.txt");
        assert_eq!(detect_format(&valid).unwrap(), CorpusFormat::TextBlankLines);
        let docs = all_docs(&valid, CorpusFormat::Auto, "text").unwrap();
        assert!(docs.len() > 1000, "{}", docs.len());
        assert!(docs.iter().all(|d| !d.contains("\n\n")));

        let json = test_data::tinystories("stories-3000.json");
        let docs = all_docs(&json, CorpusFormat::Auto, "story").unwrap();
        assert_eq!(docs.len(), 3000);
        assert!(docs[0].starts_with("Lily was a princess who loved to jump."));
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// `.jsonl.gz`, `.jsonl.zst` and compressed text read as their plain twins do, the format
    /// told from the name under the compression suffix (or, without one, from the first bytes
    /// of what they decompress to); gzip files of several members read as one stream.
    #[test]
    fn gzip_and_zstd_corpora_read_like_plain_ones() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = b"{\"text\": \"one\"}\n{\"text\": \"two\"}\n\"three\"\n";
        let text = b"First.\n<|endoftext|>\nSecond.\n";
        let zst = |b: &[u8]| zstd::encode_all(b, 3).unwrap();
        let cases: Vec<(&str, Vec<u8>, CorpusFormat, Vec<&str>)> = vec![
            (
                "a.jsonl.gz",
                gzip(jsonl),
                CorpusFormat::Jsonl,
                vec!["one", "two", "three"],
            ),
            (
                "a.jsonl.zst",
                zst(jsonl),
                CorpusFormat::Jsonl,
                vec!["one", "two", "three"],
            ),
            (
                "bare.gz",
                gzip(jsonl),
                CorpusFormat::Jsonl,
                vec!["one", "two", "three"],
            ),
            (
                "t.txt.gz",
                gzip(text),
                CorpusFormat::TextEot,
                vec!["First.", "Second."],
            ),
            (
                "t.txt.zst",
                zst(text),
                CorpusFormat::TextEot,
                vec!["First.", "Second."],
            ),
            (
                "j.json.zst",
                zst(b"[\"x\", {\"text\": \"y\"}]"),
                CorpusFormat::Json,
                vec!["x", "y"],
            ),
            (
                "multi.jsonl.gz",
                [
                    gzip(b"{\"text\": \"one\"}\n"),
                    gzip(b"{\"text\": \"two\"}\n"),
                ]
                .concat(),
                CorpusFormat::Jsonl,
                vec!["one", "two"],
            ),
        ];
        for (name, bytes, format, expect) in cases {
            let path = write(&dir, name, &bytes);
            assert_eq!(detect_format(&path).unwrap(), format, "{name}");
            assert_eq!(
                all_docs(&path, CorpusFormat::Auto, "text").unwrap(),
                expect,
                "{name}"
            );
            assert_eq!(all_docs(&path, format, "text").unwrap(), expect, "{name}");
        }
    }

    /// A truncated download is named as one, in every layout, with the file.
    #[test]
    fn a_truncated_compressed_corpus_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..2000)
            .flat_map(|i| format!("{{\"text\": \"document number {i}\"}}\n").into_bytes())
            .collect();
        let records: Vec<String> = (0..2000)
            .map(|i| format!("{{\"text\": \"document number {i}\"}}"))
            .collect();
        let array = format!("[{}]", records.join(",")).into_bytes();
        for (name, format, body) in [
            ("cut.jsonl.gz", CorpusFormat::Jsonl, &body),
            ("cut.txt.gz", CorpusFormat::TextBlankLines, &body),
            ("cut.json.gz", CorpusFormat::Json, &array),
        ] {
            let whole = gzip(body);
            let path = write(&dir, name, &whole[..whole.len() / 2]);
            let err = all_docs(&path, format, "text").unwrap_err().to_string();
            assert!(
                err.contains(name) && (err.contains("truncated") || err.contains("decompress")),
                "{name}: {err}"
            );
        }
        let tokens: Vec<u32> = (0..100).collect();
        let shard = dir.path().join("shard.bin");
        write_llmc_shard(&shard, &tokens).unwrap();
        let zipped = write(&dir, "shard.bin.gz", &gzip(&std::fs::read(&shard).unwrap()));
        let err = all_docs(&zipped, CorpusFormat::Auto, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("decompress it first"), "{err}");
    }

    /// The project's virtualenv python (scripts/setup.sh installs pyarrow into it).
    fn venv_python() -> PathBuf {
        let venv = std::env::var_os("VIRTUAL_ENV").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"),
            PathBuf::from,
        );
        venv.join("bin/python")
    }

    /// Parquet files written by pyarrow (snappy and zstd pages, several row groups, a null and
    /// a blank value, other columns of other types) read as the rows' texts, in order; a
    /// missing or non-string column and a truncated file are errors that say what to do.
    #[test]
    fn parquet_written_by_pyarrow_reads_its_text_column() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
table = pa.table({
    "id": pa.array([1, 2, 3, 4, 5], pa.int64()),
    "text": pa.array(["one", None, "  ", "four\nlines", "five"], pa.string()),
    "meta": pa.array([{"url": "u%d" % i} for i in range(5)]),
})
pq.write_table(table, sys.argv[1] + "/a.parquet", row_group_size=2, compression="snappy")
pq.write_table(table, sys.argv[1] + "/b.data", compression="zstd")
"#;
        let out = std::process::Command::new(venv_python())
            .args(["-c", script, dir.path().to_str().unwrap()])
            .output()
            .expect("the virtualenv's python (run scripts/setup.sh)");
        assert!(
            out.status.success(),
            "pyarrow could not write the files (run scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expect = ["one", "four\nlines", "five"];
        for name in ["a.parquet", "b.data"] {
            let path = dir.path().join(name);
            assert_eq!(
                detect_format(&path).unwrap(),
                CorpusFormat::Parquet,
                "{name}"
            );
            assert_eq!(all_docs(&path, CorpusFormat::Auto, "text").unwrap(), expect);
            assert_eq!(
                all_docs(&path, CorpusFormat::Parquet, "text").unwrap(),
                expect
            );
        }
        let path = dir.path().join("a.parquet");
        let err = all_docs(&path, CorpusFormat::Parquet, "body")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no column \"body\"") && err.contains("id, text, meta"),
            "{err}"
        );
        let err = all_docs(&path, CorpusFormat::Parquet, "id")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not hold strings"), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        let cut = write(&dir, "cut.parquet", &bytes[..bytes.len() / 2]);
        let err = all_docs(&cut, CorpusFormat::Parquet, "text")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cut.parquet") && err.contains("truncated"),
            "{err}"
        );
    }
}
