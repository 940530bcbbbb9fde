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
///
/// Instead of `train`, `mix` trains on several sources interleaved by weight, and `curriculum`
/// changes the weights with the tokens the run has seen (linear between points; two points at
/// the same count switch at once):
///
/// ```toml
/// [data]
/// mix = [
///     { train = "../shared/data/tinystories/train-sample.txt", weight = 0.7 },
///     { train = "../shared/data/wikipedia/enwiki-train-1.txt", weight = 0.3, name = "wiki" },
/// ]
/// # or, with the sources' weights left out:
/// curriculum = [
///     { tokens = 0, weights = [1.0, 0.0] },
///     { tokens = 2_000_000, weights = [0.2, 0.8] },
/// ]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training corpus file(s), read in order into one token stream. Empty with `mix`.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
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
    /// Training sources interleaved by weight, instead of `train`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<MixSource>,
    /// The sources' weights as they change with the tokens seen, instead of each source's
    /// `weight`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curriculum: Vec<CurriculumPoint>,
}

/// One source of a `[data] mix`: its files are one token stream, of which the mixture takes
/// windows in proportion to its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// The source's file(s) or patterns, read in order.
    #[serde(deserialize_with = "one_or_many")]
    pub train: Vec<PathBuf>,
    /// Its share of the training windows (relative to the others'); left out with a
    /// curriculum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// How logs and metrics name it (default: its first file's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its layout, when it differs from `[data] format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<CorpusFormat>,
    /// Its record field, when it differs from `[data] text_field`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_field: Option<String>,
}

/// A point of a `[data] curriculum`: once the run has seen `tokens` training tokens, the
/// sources' weights are `weights` (in the order of `mix`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurriculumPoint {
    pub tokens: u64,
    pub weights: Vec<f64>,
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

impl MixSource {
    /// The name logs and metrics give it: `name`, or its first file's name.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.train
                .first()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }
}

impl DataConfig {
    /// Checks what can be checked without reading the corpus.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::InvalidData(why));
        match (self.train.is_empty(), self.mix.is_empty()) {
            (true, true) => {
                return bad(
                    "train lists no files; give at least one corpus (or a mix of \
                            weighted sources)"
                        .into(),
                );
            }
            (false, false) => {
                return bad(
                    "both train and mix are set; give train for one corpus or mix for \
                            weighted sources, not both"
                        .into(),
                );
            }
            _ => {}
        }
        if self.val.is_empty() {
            return bad(
                "val lists no files; give a validation corpus (it is never trained on)".into(),
            );
        }
        let mut train_files = self
            .train
            .iter()
            .chain(self.mix.iter().flat_map(|s| &s.train));
        if let Some(p) = train_files.find(|p| self.val.contains(p)) {
            return bad(format!(
                "{} is both a train and a val file; validation must be held out",
                p.display()
            ));
        }
        if self.text_field.is_empty() {
            return bad("text_field is empty; name the field that holds the text".into());
        }
        self.validate_mix()
    }

    fn validate_mix(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::InvalidData(why));
        if self.mix.is_empty() {
            if !self.curriculum.is_empty() {
                return bad(
                    "curriculum gives the weights of mix sources, but mix is not set; \
                            list the sources as mix = [{ train = \"...\" }, ...]"
                        .into(),
                );
            }
            return Ok(());
        }
        let curriculum = !self.curriculum.is_empty();
        for (i, source) in self.mix.iter().enumerate() {
            if source.train.is_empty() {
                return bad(format!("mix[{i}] lists no files; give its train file(s)"));
            }
            if source.text_field.as_deref() == Some("") {
                return bad(format!(
                    "mix[{i}] text_field is empty; name the field that holds the text"
                ));
            }
            match (source.weight, curriculum) {
                (Some(_), true) => {
                    return bad(format!(
                        "mix[{i}] ({}) has a weight, and curriculum gives every source's \
                         weights; drop one of them",
                        source.label()
                    ));
                }
                (None, false) => {
                    return bad(format!(
                        "mix[{i}] ({}) has no weight; give each source a weight (or the run a \
                         curriculum)",
                        source.label()
                    ));
                }
                (Some(w), false) if !(w.is_finite() && w >= 0.0) => {
                    return bad(format!(
                        "mix[{i}] ({}) has weight {w}; weights are finite and at least 0",
                        source.label()
                    ));
                }
                _ => {}
            }
        }
        if !curriculum && self.mix.iter().all(|s| s.weight == Some(0.0)) {
            return bad("every mix weight is 0; give some source a positive weight".into());
        }
        let n = self.mix.len();
        for (i, point) in self.curriculum.iter().enumerate() {
            if point.weights.len() != n {
                return bad(format!(
                    "curriculum[{i}] gives {} weights for the {n} mix sources; give one per \
                     source, in mix's order",
                    point.weights.len()
                ));
            }
            if let Some(w) = point
                .weights
                .iter()
                .find(|w| !(w.is_finite() && **w >= 0.0))
            {
                return bad(format!(
                    "curriculum[{i}] has weight {w}; weights are finite and at least 0"
                ));
            }
            if point.weights.iter().sum::<f64>() <= 0.0 {
                return bad(format!(
                    "curriculum[{i}]'s weights are all 0; give some source a positive weight"
                ));
            }
            if i > 0 && point.tokens < self.curriculum[i - 1].tokens {
                return bad(format!(
                    "curriculum[{i}] is at {} tokens, before curriculum[{}] at {}; list the \
                     points in order of tokens",
                    point.tokens,
                    i - 1,
                    self.curriculum[i - 1].tokens
                ));
            }
            if i > 1 && point.tokens == self.curriculum[i - 2].tokens {
                return bad(format!(
                    "curriculum has three points at {} tokens; two at one count make a switch, \
                     a third says nothing",
                    point.tokens
                ));
            }
        }
        Ok(())
    }

    /// The mix sources' shares (summing to 1) once the run has seen `tokens` training tokens:
    /// their weights, or the curriculum's, linear between its points and flat outside them.
    /// Empty without a mix.
    pub fn mix_weights_at(&self, tokens: f64) -> Vec<f64> {
        let shares = |w: &[f64]| {
            let total: f64 = w.iter().sum();
            w.iter().map(|x| x / total).collect::<Vec<f64>>()
        };
        if self.curriculum.is_empty() {
            let weights: Vec<f64> = self.mix.iter().map(|s| s.weight.unwrap_or(0.0)).collect();
            return shares(&weights);
        }
        let points = &self.curriculum;
        // The first point after `tokens` (with two at one count, the later one is before it).
        let i = points.partition_point(|p| p.tokens as f64 <= tokens);
        if i == 0 {
            return shares(&points[0].weights);
        }
        if i == points.len() {
            return shares(&points[i - 1].weights);
        }
        // Between two points: their shares, mixed linearly.
        let (a, b) = (&points[i - 1], &points[i]);
        let t = (tokens - a.tokens as f64) / (b.tokens - a.tokens) as f64;
        let (a, b) = (shares(&a.weights), shares(&b.weights));
        a.iter().zip(&b).map(|(x, y)| x + t * (y - x)).collect()
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
    fn mixtures_and_curricula_parse_and_give_shares() {
        let cfg = parse(
            r#"
            val = "v.txt"
            tokenizer = { path = "t" }
            mix = [
                { train = "a.txt", weight = 3 },
                { train = ["b1.txt", "b2.txt"], weight = 1, name = "bee", format = "jsonl" },
            ]
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert!(cfg.train.is_empty());
        assert_eq!(cfg.mix[1].train.len(), 2);
        assert_eq!(
            (cfg.mix[0].label(), cfg.mix[1].label()),
            ("a.txt".into(), "bee".into())
        );
        assert_eq!(cfg.mix[1].format, Some(CorpusFormat::Jsonl));
        assert_eq!(cfg.mix_weights_at(0.0), [0.75, 0.25]);
        assert_eq!(cfg.mix_weights_at(1e12), [0.75, 0.25]);
        // Round trip, as a checkpoint stores its config.
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg);

        let cfg = parse(
            r#"
            val = "v.txt"
            tokenizer = { path = "t" }
            mix = [{ train = "a.txt" }, { train = "b.txt" }]
            curriculum = [
                { tokens = 100, weights = [1, 0] },
                { tokens = 300, weights = [1, 1] },
                { tokens = 500, weights = [1, 1] },
                { tokens = 500, weights = [0, 2] },
            ]
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.mix_weights_at(0.0), [1.0, 0.0]);
        assert_eq!(cfg.mix_weights_at(100.0), [1.0, 0.0]);
        assert_eq!(cfg.mix_weights_at(200.0), [0.75, 0.25]);
        assert_eq!(cfg.mix_weights_at(300.0), [0.5, 0.5]);
        assert_eq!(cfg.mix_weights_at(499.0), [0.5, 0.5]);
        // Two points at one count: a switch.
        assert_eq!(cfg.mix_weights_at(500.0), [0.0, 1.0]);
        assert_eq!(cfg.mix_weights_at(1e9), [0.0, 1.0]);
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg);
    }

    #[test]
    fn bad_mixtures_are_refused_naming_the_entry() {
        let refused = |body: &str| {
            let cfg = parse(&format!(
                "val = \"v\"\ntokenizer = {{ path = \"t\" }}\n{body}"
            ))
            .unwrap();
            cfg.validate().unwrap_err().to_string()
        };
        let two = "mix = [{ train = \"a\" }, { train = \"b\" }]\n";
        for (body, expected) in [
            (
                "train = \"t\"\nmix = [{ train = \"a\", weight = 1 }]",
                "both train and mix",
            ),
            (
                "mix = [{ train = \"a\", weight = 1 }, { train = \"b\" }]",
                "mix[1] (b) has no weight",
            ),
            (
                "mix = [{ train = \"a\", weight = -1 }]",
                "mix[0] (a) has weight -1",
            ),
            (
                "mix = [{ train = \"a\", weight = 0 }]",
                "every mix weight is 0",
            ),
            (
                "mix = [{ train = [], weight = 1 }]",
                "mix[0] lists no files",
            ),
            (
                "mix = [{ train = \"v\", weight = 1 }]",
                "both a train and a val file",
            ),
            (
                "train = \"t\"\ncurriculum = [{ tokens = 0, weights = [1] }]",
                "mix is not set",
            ),
            (
                "mix = [{ train = \"a\", weight = 1 }]\ncurriculum = [{ tokens = 0, weights = [1] }]",
                "mix[0] (a) has a weight",
            ),
            (
                &format!("{two}curriculum = [{{ tokens = 0, weights = [1] }}]"),
                "gives 1 weights for the 2",
            ),
            (
                &format!("{two}curriculum = [{{ tokens = 0, weights = [0, 0] }}]"),
                "all 0",
            ),
            (
                &format!("{two}curriculum = [{{ tokens = 0, weights = [1, nan] }}]"),
                "weight NaN",
            ),
            (
                &format!(
                    "{two}curriculum = [{{ tokens = 9, weights = [1, 0] }}, {{ tokens = 8, weights = [0, 1] }}]"
                ),
                "curriculum[1] is at 8 tokens, before curriculum[0] at 9",
            ),
            (
                &format!(
                    "{two}curriculum = [{{ tokens = 9, weights = [1, 0] }}, {{ tokens = 9, weights = [0, 1] }}, {{ tokens = 9, weights = [1, 1] }}]"
                ),
                "three points at 9 tokens",
            ),
        ] {
            let err = refused(body);
            assert!(err.contains(expected), "{body}: {err}");
        }
        let err =
            parse("val = \"v\"\nmix = [{ train = \"a\", weight = 1, share = 2 }]").unwrap_err();
        assert!(err.contains("unknown field `share`"), "{err}");
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
