//! `[data]`: which corpus files, in which layout, and which tokenizer.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::ConfigError;

/// The `[data]` section of a run config. Relative paths are taken from the working directory.
///
/// ```toml
/// [data]
/// train = "../shared/data/tinystories/train-sample.txt"   # or a list of files
/// val = "../shared/data/tinystories/valid-sample.txt"
/// format = "auto"          # auto | text_eot | text_blank_lines | json | jsonl | llmc_shard
/// text_field = "text"      # the record field that holds the text in json / jsonl
/// cache_dir = ".forge-cache/data"
/// tokenizer = { train = { vocab_size = 2048 } }   # or { path = "tokenizer.json" }
/// ```
///
/// With `[model] init_from`, `tokenizer` may be left out: the folder's `tokenizer.json` is then
/// the run's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training corpus file(s), read in order into one token stream.
    #[serde(deserialize_with = "one_or_many")]
    pub train: Vec<PathBuf>,
    /// Validation corpus file(s).
    #[serde(deserialize_with = "one_or_many")]
    pub val: Vec<PathBuf>,
    /// Layout of the corpus files; `auto` decides per file.
    #[serde(default)]
    pub format: CorpusFormat,
    /// Layout of the validation files when it differs from `format`.
    #[serde(default)]
    pub val_format: Option<CorpusFormat>,
    /// Record field holding the text, for `json` and `jsonl` records.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Required unless `[model] init_from` names a folder, whose `tokenizer.json` it defaults to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerConfig>,
    /// Where token caches and trained tokenizers are kept.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

/// Which tokenizer a run uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenizerConfig {
    /// A Hugging Face `tokenizer.json` (GPT-2's: `../shared/data/gpt2/tokenizer.json`).
    Path(PathBuf),
    /// A byte-level BPE trained on the train corpus, saved under `cache_dir` and reused while
    /// the corpus is unchanged.
    Train { vocab_size: usize },
}

/// How a corpus file is laid out. In TOML: `format = "text_eot"` etc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    /// Decide per file from its extension and first bytes (the trainer's `detect_format`).
    #[default]
    Auto,
    /// UTF-8 text with `<|endoftext|>` between documents (TinyStoriesV2 files).
    TextEot,
    /// UTF-8 text with one or more blank lines between documents.
    TextBlankLines,
    /// One JSON value: `{"texts": [...]}`, or an array of strings or of records whose
    /// `text_field` holds the document (TinyStories_all_data uses `story`).
    Json,
    /// One JSON record (or string) per line.
    Jsonl,
    /// llm.c token shard: 256 int32 header (magic 20240520, version 1, count), uint16 tokens.
    LlmcShard,
    /// Apache Parquet (the Hugging Face Hub's dataset format): one document per row, in the
    /// string column `text_field`.
    Parquet,
}

impl fmt::Display for CorpusFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            CorpusFormat::Auto => "auto",
            CorpusFormat::TextEot => "text_eot",
            CorpusFormat::TextBlankLines => "text_blank_lines",
            CorpusFormat::Json => "json",
            CorpusFormat::Jsonl => "jsonl",
            CorpusFormat::LlmcShard => "llmc_shard",
            CorpusFormat::Parquet => "parquet",
        };
        f.write_str(name)
    }
}

fn default_text_field() -> String {
    "text".to_string()
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from(".forge-cache/data")
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

impl DataConfig {
    /// Checks what can be checked without reading the corpus.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.train.is_empty() {
            return Err(ConfigError::InvalidData(
                "train lists no files; give at least one corpus".into(),
            ));
        }
        if self.val.is_empty() {
            return Err(ConfigError::InvalidData(
                "val lists no files; give a validation corpus (it is never trained on)".into(),
            ));
        }
        if let Some(p) = self.val.iter().find(|p| self.train.contains(p)) {
            return Err(ConfigError::InvalidData(format!(
                "{} is both a train and a val file; validation must be held out",
                p.display()
            )));
        }
        if self.text_field.is_empty() {
            return Err(ConfigError::InvalidData(
                "text_field is empty; name the field that holds the text".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<DataConfig, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn data_section_parses_from_toml() {
        let cfg = parse(
            r#"
            train = ["a.txt", "b.json"]
            val = "v.txt"
            format = "json"
            val_format = "text_blank_lines"
            text_field = "story"
            tokenizer = { train = { vocab_size = 2048 } }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.train, [PathBuf::from("a.txt"), PathBuf::from("b.json")]);
        assert_eq!(cfg.val, [PathBuf::from("v.txt")]);
        assert_eq!(cfg.format, CorpusFormat::Json);
        assert_eq!(cfg.val_format, Some(CorpusFormat::TextBlankLines));
        assert_eq!(
            cfg.tokenizer,
            Some(TokenizerConfig::Train { vocab_size: 2048 })
        );
        assert_eq!(cfg.cache_dir, PathBuf::from(".forge-cache/data"));
        cfg.validate().unwrap();

        let cfg = parse("train = \"t\"\nval = \"v\"\n[tokenizer]\npath = \"tok.json\"\n").unwrap();
        assert_eq!(
            cfg.tokenizer,
            Some(TokenizerConfig::Path("tok.json".into()))
        );
        assert_eq!(
            (cfg.format, cfg.text_field.as_str()),
            (CorpusFormat::Auto, "text")
        );
        // Round trip, as a checkpoint stores its config.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg);
    }

    #[test]
    fn bad_data_sections_are_refused() {
        let base = "val = \"v\"\ntokenizer = { path = \"t\" }\n";
        let err = parse(&format!("train = \"t\"\nshuffle = true\n{base}")).unwrap_err();
        assert!(err.contains("unknown field `shuffle`"), "{err}");
        let err = parse(&format!("train = \"t\"\nformat = \"csv\"\n{base}")).unwrap_err();
        assert!(err.contains("unknown variant `csv`"), "{err}");
        let err =
            parse("train = \"t\"\nval = \"v\"\ntokenizer = { train = { vocab = 9 } }").unwrap_err();
        assert!(err.contains("vocab"), "{err}");
        let cfg = parse(&format!("train = []\n{base}")).unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("train lists no files")
        );
        let cfg = parse(&format!("train = \"v\"\n{base}")).unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("both a train and a val file")
        );
    }

    #[test]
    fn formats_print_as_configs_name_them() {
        for format in [
            CorpusFormat::Auto,
            CorpusFormat::TextEot,
            CorpusFormat::TextBlankLines,
            CorpusFormat::Json,
            CorpusFormat::Jsonl,
            CorpusFormat::LlmcShard,
            CorpusFormat::Parquet,
        ] {
            let cfg = parse(&format!(
                "train = \"t\"\nval = \"v\"\nformat = \"{format}\"\ntokenizer = {{ path = \"t\" }}"
            ))
            .unwrap();
            assert_eq!(cfg.format, format);
        }
    }
}
