//! Hugging Face model folders as `[model] init_from` reads them: the architecture of a
//! `config.json` (GPT-2 and Llama families) as a [`ModelConfig`], the shards a
//! `model.safetensors.index.json` names, and the SHA-256 of every file a run reads from the
//! folder, which `forge-coordinator serve` pins for its nodes (`[model] init_sha256`).
//!
//! No I/O: callers hand over the files' text, or a function that opens them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::{DEFAULT_ROPE_THETA, Family, ModelConfig};

/// The architecture, in transformers' `GPT2Config` / `LlamaConfig` fields.
pub const CONFIG: &str = "config.json";
/// The weights in one file.
pub const WEIGHTS: &str = "model.safetensors";
/// The weights in shards: which shard holds each tensor (`weight_map`).
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// The tokenizer, as the `tokenizers` library writes it.
pub const TOKENIZER: &str = "tokenizer.json";
/// The tokenizer's class and special tokens.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// The special token ids `generate` uses.
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// What Forge takes from a `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfModel {
    pub config: ModelConfig,
    /// `bos_token_id`, where it names one.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (Llama 3 lists several), where it names any.
    pub eos_token_ids: Vec<u32>,
    /// Settings Forge reads past rather than trains with (dropout), to tell the user.
    pub notes: Vec<String>,
}

impl HfModel {
    /// Parses a `config.json`. A field it leaves out has transformers' default for its class;
    /// a setting Forge does not implement (another activation, attention biases, scaled RoPE,
    /// ...) is an error naming the field, never passed over.
    pub fn parse(text: &str) -> Result<HfModel, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("its JSON does not parse: {e}"))?;
        let Value::Object(map) = value else {
            return Err("it is not a JSON object".into());
        };
        let f = Fields(&map);
        let model = match f.string("model_type", "")?.as_str() {
            "gpt2" => gpt2(&f)?,
            "llama" => llama(&f)?,
            "" => {
                return Err(
                    "it names no model_type; Forge loads gpt2 and llama folders \
                     (GPT2LMHeadModel, LlamaForCausalLM)"
                        .into(),
                );
            }
            other => {
                return Err(format!(
                    "model_type = \"{other}\" is not a family Forge trains; it loads gpt2 and \
                     llama folders (GPT2LMHeadModel, LlamaForCausalLM)"
                ));
            }
        };
        model.config.validate().map_err(|e| e.to_string())?;
        Ok(model)
    }
}

/// The `config.json` field that holds a [`ModelConfig`] field of `family`, for messages.
pub fn field_name(family: Family, field: &str) -> &'static str {
    let (gpt2, llama) = match field {
        "family" => ("model_type", "model_type"),
        "vocab_size" => ("vocab_size", "vocab_size"),
        "n_layer" => ("n_layer", "num_hidden_layers"),
        "n_head" => ("n_head", "num_attention_heads"),
        "n_kv_head" => ("n_head", "num_key_value_heads"),
        "d_model" => ("n_embd", "hidden_size"),
        "d_ff" => ("n_inner", "intermediate_size"),
        "max_seq_len" => ("n_positions", "max_position_embeddings"),
        "norm_eps" => ("layer_norm_epsilon", "rms_norm_eps"),
        "rope_theta" => ("(nothing: GPT-2 has learned positions)", "rope_theta"),
        "tie_embeddings" => ("tie_word_embeddings", "tie_word_embeddings"),
        _ => ("?", "?"),
    };
    match family {
        Family::Gpt2 => gpt2,
        Family::Llama => llama,
    }
}

/// GELU with the tanh approximation, under the names transformers gives it.
const GPT2_ACTIVATIONS: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

/// `GPT2Config`'s fields, with its defaults.
fn gpt2(f: &Fields<'_>) -> Result<HfModel, String> {
    let d_model = f.int("n_embd", 768)?;
    let n_head = f.int("n_head", 12)?;
    let activation = f.string("activation_function", "gelu_new")?;
    if !GPT2_ACTIVATIONS.contains(&activation.as_str()) {
        return Err(format!(
            "activation_function = \"{activation}\" is not supported: Forge's GPT-2 uses GELU with \
             the tanh approximation ({})",
            GPT2_ACTIVATIONS.join(" or ")
        ));
    }
    f.require_bool(
        "scale_attn_weights",
        true,
        "Forge scales attention scores by 1/sqrt(head_dim)",
    )?;
    f.require_bool(
        "scale_attn_by_inverse_layer_idx",
        false,
        "Forge scales every layer's attention alike",
    )?;
    f.require_bool(
        "add_cross_attention",
        false,
        "Forge's GPT-2 is a decoder without cross-attention",
    )?;
    f.require_bool(
        "tie_word_embeddings",
        true,
        "Forge's GPT-2 ties its output head to wte",
    )?;
    let notes = f.dropout(&[
        ("resid_pdrop", 0.1),
        ("embd_pdrop", 0.1),
        ("attn_pdrop", 0.1),
    ])?;
    Ok(HfModel {
        config: ModelConfig {
            family: Family::Gpt2,
            vocab_size: f.int("vocab_size", 50_257)?,
            n_layer: f.int("n_layer", 12)?,
            n_head,
            n_kv_head: n_head,
            d_model,
            d_ff: f.opt_int("n_inner")?.unwrap_or(4 * d_model),
            max_seq_len: f.int("n_positions", 1024)?,
            norm_eps: f.float("layer_norm_epsilon", 1e-5)?,
            rope_theta: DEFAULT_ROPE_THETA,
            tie_embeddings: true,
        },
        bos_token_id: f.ids("bos_token_id", &[50_256])?.first().copied(),
        eos_token_ids: f.ids("eos_token_id", &[50_256])?,
        notes,
    })
}

/// `LlamaConfig`'s fields, with its defaults.
fn llama(f: &Fields<'_>) -> Result<HfModel, String> {
    let d_model = f.int("hidden_size", 4096)?;
    let n_head = f.int("num_attention_heads", 32)?;
    let activation = f.string("hidden_act", "silu")?;
    if activation != "silu" {
        return Err(format!(
            "hidden_act = \"{activation}\" is not supported: Forge's Llama MLP is SwiGLU (silu)"
        ));
    }
    f.require_bool(
        "attention_bias",
        false,
        "Forge's Llama projections have no biases",
    )?;
    f.require_bool("mlp_bias", false, "Forge's Llama MLP has no biases")?;
    if let Some(head_dim) = f.opt_int("head_dim")?
        && n_head > 0
        && head_dim * n_head != d_model
    {
        return Err(format!(
            "head_dim = {head_dim} is not supported: Forge's heads are hidden_size / \
             num_attention_heads = {} wide",
            d_model / n_head
        ));
    }
    let notes = f.dropout(&[("attention_dropout", 0.0)])?;
    Ok(HfModel {
        config: ModelConfig {
            family: Family::Llama,
            vocab_size: f.int("vocab_size", 32_000)?,
            n_layer: f.int("num_hidden_layers", 32)?,
            n_head,
            n_kv_head: f.opt_int("num_key_value_heads")?.unwrap_or(n_head),
            d_model,
            d_ff: f.int("intermediate_size", 11_008)?,
            max_seq_len: f.int("max_position_embeddings", 2048)?,
            norm_eps: f.float("rms_norm_eps", 1e-6)?,
            rope_theta: rope_theta(f)?,
            tie_embeddings: f.boolean("tie_word_embeddings", false)?,
        },
        bos_token_id: f.ids("bos_token_id", &[1])?.first().copied(),
        eos_token_ids: f.ids("eos_token_id", &[2])?,
        notes,
    })
}

/// The RoPE base: `rope_parameters.rope_theta` (transformers 5) or `rope_theta` (4), which must
/// agree where both are given. Scaled RoPE (`rope_type` other than `default`, in
/// `rope_parameters` or `rope_scaling`) is refused: Forge rotates with the plain frequencies.
fn rope_theta(f: &Fields<'_>) -> Result<f64, String> {
    let mut theta = f.opt_float("rope_theta")?;
    for table in ["rope_parameters", "rope_scaling"] {
        let Some(value) = f.get(table) else {
            continue;
        };
        let Value::Object(map) = value else {
            return Err(format!("{table} is {value}, not an object"));
        };
        let inner = Fields(map);
        // transformers 4 wrote the kind of scaling as `type`, 5 as `rope_type`.
        let kind = match inner.get("rope_type") {
            Some(_) => inner.string("rope_type", "default")?,
            None => inner.string("type", "default")?,
        };
        if kind != "default" {
            return Err(format!(
                "{table}.rope_type = \"{kind}\" is not supported: Forge implements plain RoPE \
                 (rope_type \"default\"), without scaling"
            ));
        }
        if let Some(inner_theta) = inner.opt_float("rope_theta")? {
            if theta.is_some_and(|t| t != inner_theta) {
                return Err(format!(
                    "rope_theta = {} but {table}.rope_theta = {inner_theta}; give one RoPE base",
                    theta.unwrap_or_default()
                ));
            }
            theta = Some(inner_theta);
        }
    }
    Ok(theta.unwrap_or(DEFAULT_ROPE_THETA))
}

/// The fields of a JSON object, read with defaults; errors name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The field's value; `None` when it is missing or null (transformers' default then).
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// The field read by `read`, which gives `None` for a value that is not `what`.
    fn opt<T>(
        &self,
        key: &str,
        what: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, String> {
        self.get(key)
            .map(|v| read(v).ok_or_else(|| format!("{key} is {v}, not {what}")))
            .transpose()
    }

    fn opt_int(&self, key: &str) -> Result<Option<i64>, String> {
        self.opt(key, "a whole number", Value::as_i64)
    }

    fn int(&self, key: &str, default: i64) -> Result<i64, String> {
        Ok(self.opt_int(key)?.unwrap_or(default))
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>, String> {
        self.opt(key, "a number", Value::as_f64)
    }

    fn float(&self, key: &str, default: f64) -> Result<f64, String> {
        Ok(self.opt_float(key)?.unwrap_or(default))
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, String> {
        Ok(self
            .opt(key, "true or false", Value::as_bool)?
            .unwrap_or(default))
    }

    fn string(&self, key: &str, default: &str) -> Result<String, String> {
        let read = |v: &Value| v.as_str().map(str::to_string);
        Ok(self
            .opt(key, "a string", read)?
            .unwrap_or_else(|| default.to_string()))
    }

    /// A token id or a list of them.
    fn ids(&self, key: &str, default: &[u32]) -> Result<Vec<u32>, String> {
        let Some(value) = self.0.get(key) else {
            return Ok(default.to_vec());
        };
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| format!("{key} is {value}, not a token id or a list of them"))
        };
        match value {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items.iter().map(one).collect(),
            v => Ok(vec![one(v)?]),
        }
    }

    /// Refuses a flag that is not `wanted`, saying why Forge needs it so.
    fn require_bool(&self, key: &str, wanted: bool, why: &str) -> Result<(), String> {
        let value = self.boolean(key, wanted)?;
        if value != wanted {
            return Err(format!("{key} = {value} is not supported: {why}"));
        }
        Ok(())
    }

    /// A note for the dropout probabilities (with their defaults) that are not zero.
    fn dropout(&self, fields: &[(&str, f64)]) -> Result<Vec<String>, String> {
        let mut set = Vec::new();
        for (key, default) in fields {
            let p = self.float(key, *default)?;
            if p != 0.0 {
                set.push(format!("{key} = {p}"));
            }
        }
        Ok(if set.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "Forge trains without dropout: {} not used",
                set.join(", ")
            )]
        })
    }
}

/// The `weight_map` of a `model.safetensors.index.json`: the shard file of every tensor. Shards
/// are plain file names in the folder.
pub fn weight_map(text: &str) -> Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(text)
        .map_err(|e| format!("not a safetensors index (a weight_map of shard files): {e}"))?;
    if index.weight_map.is_empty() {
        return Err("its weight_map names no tensor".into());
    }
    if let Some((key, shard)) = index
        .weight_map
        .iter()
        .find(|(_, shard)| !is_file_name(shard))
    {
        return Err(format!(
            "its weight_map puts {key} in \"{shard}\", which is not a file name in the folder"
        ));
    }
    Ok(index.weight_map)
}

/// A plain name of a file in the folder: no separator, not `.` or `..`.
fn is_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".."
}

/// SHA-256 (hex) of every file of folder `dir` a run reads, by name: `config.json`; the weights
/// (`model.safetensors`, or the index and every shard it names); with `tokenizer` (the run uses
/// the folder's tokenizer), `tokenizer.json` and, where the folder has one,
/// `tokenizer_config.json`, which says the document separator. `open` opens a path.
pub fn folder_digests<R: Read>(
    dir: &Path,
    tokenizer: bool,
    mut open: impl FnMut(&Path) -> std::io::Result<R>,
) -> Result<BTreeMap<String, String>, String> {
    let cannot =
        |name: &str, e: std::io::Error| format!("cannot read {}: {e}", dir.join(name).display());
    let mut names = vec![CONFIG.to_string()];
    match open(&dir.join(WEIGHTS_INDEX)) {
        Ok(mut file) => {
            let mut text = String::new();
            file.read_to_string(&mut text)
                .map_err(|e| cannot(WEIGHTS_INDEX, e))?;
            let shards = weight_map(&text)
                .map_err(|why| format!("{}: {why}", dir.join(WEIGHTS_INDEX).display()))?;
            names.push(WEIGHTS_INDEX.to_string());
            names.extend(shards.into_values());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => names.push(WEIGHTS.to_string()),
        Err(e) => return Err(cannot(WEIGHTS_INDEX, e)),
    }
    if tokenizer {
        names.push(TOKENIZER.to_string());
        names.push(TOKENIZER_CONFIG.to_string());
    }
    names.sort();
    names.dedup();
    let mut digests = BTreeMap::new();
    for name in names {
        let file = match open(&dir.join(&name)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == TOKENIZER_CONFIG => {
                continue;
            }
            Err(e) => return Err(cannot(&name, e)),
        };
        let digest = sha256_hex(file).map_err(|e| cannot(&name, e))?;
        digests.insert(name, digest);
    }
    Ok(digests)
}

/// SHA-256 (hex) of everything `reader` yields.
fn sha256_hex(mut reader: impl Read) -> std::io::Result<String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares the digests of folder `dir` (`found`, from [`folder_digests`]) with the ones the run
/// pinned; the error names the first file that differs.
pub fn check_digests(
    dir: &Path,
    pinned: &BTreeMap<String, String>,
    found: &BTreeMap<String, String>,
) -> Result<(), String> {
    let short = |digest: &str| digest.chars().take(12).collect::<String>();
    for (name, want) in pinned {
        match found.get(name) {
            None => {
                return Err(format!(
                    "the run reads {name} from this folder, but {} has none",
                    dir.display()
                ));
            }
            Some(have) if have != want => {
                return Err(format!(
                    "{} is not the run's: its sha256 is {}…, [model] init_sha256 says {}…",
                    dir.join(name).display(),
                    short(have),
                    short(want)
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = found.keys().find(|name| !pinned.contains_key(*name)) {
        return Err(format!(
            "{} has {extra}, which the run's folder has not ([model] init_sha256 names {})",
            dir.display(),
            pinned.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// transformers 5.25's `GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300,
    /// n_positions=64).save_pretrained(...)`.
    const GPT2: &str = r#"{
      "activation_function": "gelu_new", "add_cross_attention": false, "attn_pdrop": 0.1,
      "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
      "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
      "n_embd": 64, "n_head": 4, "n_inner": null, "n_layer": 2, "n_positions": 64,
      "pad_token_id": null, "reorder_and_upcast_attn": false, "resid_pdrop": 0.1,
      "scale_attn_by_inverse_layer_idx": false, "scale_attn_weights": true,
      "tie_word_embeddings": true, "transformers_version": "5.25.0", "use_cache": true,
      "vocab_size": 300
    }"#;

    /// transformers 5.25's `LlamaConfig(hidden_size=64, num_hidden_layers=2,
    /// num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=300,
    /// max_position_embeddings=64)`.
    const LLAMA: &str = r#"{
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
      "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
      "intermediate_size": 96, "max_position_embeddings": 64, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
      "num_key_value_heads": 2, "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
      "tie_word_embeddings": false, "transformers_version": "5.25.0", "use_cache": true,
      "vocab_size": 300
    }"#;

    fn with(base: &str, key: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        // A value that is not JSON removes the key.
        match serde_json::from_str::<Value>(value) {
            Ok(parsed) => v[key] = parsed,
            Err(_) => {
                v.as_object_mut().unwrap().remove(key);
            }
        }
        v.to_string()
    }

    fn err(text: &str) -> String {
        HfModel::parse(text).unwrap_err()
    }

    #[test]
    fn gpt2_fields_become_the_architecture() {
        let m = HfModel::parse(GPT2).unwrap();
        let c = &m.config;
        assert_eq!(c.family, Family::Gpt2);
        assert_eq!(
            (c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.d_model),
            (300, 2, 4, 4, 64)
        );
        // n_inner null: four times the width.
        assert_eq!((c.d_ff, c.max_seq_len, c.norm_eps), (256, 64, 1e-5));
        assert!(c.tie_embeddings);
        assert_eq!(
            (m.bos_token_id, m.eos_token_ids.clone()),
            (Some(50256), vec![50256])
        );
        assert_eq!(m.notes.len(), 1);
        assert!(m.notes[0].contains("resid_pdrop = 0.1"), "{:?}", m.notes);
        // The original GPT-2 config leaves most fields to their defaults.
        let small = HfModel::parse(r#"{"model_type": "gpt2", "n_inner": 100}"#).unwrap();
        assert_eq!(
            (
                small.config.n_layer,
                small.config.d_model,
                small.config.d_ff
            ),
            (12, 768, 100)
        );
        assert_eq!(small.config.vocab_size, 50257);
    }

    #[test]
    fn llama_fields_become_the_architecture() {
        let m = HfModel::parse(LLAMA).unwrap();
        let c = &m.config;
        assert_eq!(c.family, Family::Llama);
        assert_eq!(
            (
                c.vocab_size,
                c.n_layer,
                c.n_head,
                c.n_kv_head,
                c.d_model,
                c.d_ff
            ),
            (300, 2, 4, 2, 64, 96)
        );
        assert_eq!(
            (c.max_seq_len, c.norm_eps, c.rope_theta),
            (64, 1e-6, 10_000.0)
        );
        assert!(!c.tie_embeddings);
        assert_eq!(
            (m.bos_token_id, m.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        assert!(m.notes.is_empty());
        // transformers 4: rope_theta beside a null rope_scaling; kv heads default to the heads;
        // Llama 3 lists its end tokens.
        let v4 = with(
            &with(
                &with(LLAMA, "rope_parameters", "not json"),
                "rope_theta",
                "500000.0",
            ),
            "rope_scaling",
            "null",
        );
        let v4 = with(
            &with(&v4, "num_key_value_heads", "x"),
            "eos_token_id",
            "[7, 8]",
        );
        let m = HfModel::parse(&v4).unwrap();
        assert_eq!(
            (m.config.rope_theta, m.config.n_kv_head, m.eos_token_ids),
            (500_000.0, 4, vec![7, 8])
        );
    }

    #[test]
    fn unsupported_settings_are_named() {
        for (base, key, value, why) in [
            (
                GPT2,
                "activation_function",
                "\"gelu\"",
                "activation_function = \"gelu\"",
            ),
            (
                GPT2,
                "tie_word_embeddings",
                "false",
                "tie_word_embeddings = false",
            ),
            (
                GPT2,
                "scale_attn_by_inverse_layer_idx",
                "true",
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                GPT2,
                "add_cross_attention",
                "true",
                "add_cross_attention = true",
            ),
            (LLAMA, "attention_bias", "true", "attention_bias = true"),
            (LLAMA, "mlp_bias", "true", "mlp_bias = true"),
            (LLAMA, "hidden_act", "\"gelu\"", "hidden_act = \"gelu\""),
            (LLAMA, "head_dim", "32", "head_dim = 32"),
            (
                LLAMA,
                "rope_scaling",
                r#"{"rope_type": "llama3", "factor": 32.0}"#,
                "rope_scaling.rope_type = \"llama3\"",
            ),
            (
                LLAMA,
                "rope_parameters",
                r#"{"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}"#,
                "rope_parameters.rope_type = \"linear\"",
            ),
            (
                LLAMA,
                "rope_theta",
                "20000.0",
                "rope_theta = 20000 but rope_parameters",
            ),
            (
                LLAMA,
                "num_hidden_layers",
                "\"two\"",
                "num_hidden_layers is \"two\"",
            ),
            (
                LLAMA,
                "model_type",
                "\"mistral\"",
                "model_type = \"mistral\"",
            ),
            (LLAMA, "model_type", "deleted", "names no model_type"),
            (
                LLAMA,
                "num_key_value_heads",
                "3",
                "not a multiple of n_kv_head 3",
            ),
        ] {
            let e = err(&with(base, key, value));
            assert!(e.contains(why), "{key}: {e}");
        }
        assert!(err("[1, 2]").contains("not a JSON object"));
        assert!(err("{").contains("does not parse"));
    }

    #[test]
    fn every_field_has_its_transformers_name() {
        for field in [
            "family",
            "vocab_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "d_model",
            "d_ff",
            "max_seq_len",
            "norm_eps",
            "rope_theta",
            "tie_embeddings",
        ] {
            assert_ne!(field_name(Family::Llama, field), "?", "{field}");
            assert_ne!(field_name(Family::Gpt2, field), "?", "{field}");
        }
        assert_eq!(field_name(Family::Llama, "n_layer"), "num_hidden_layers");
        assert_eq!(field_name(Family::Gpt2, "d_model"), "n_embd");
    }

    #[test]
    fn the_index_names_plain_shard_files() {
        let map = weight_map(
            r#"{"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(map["b"], "model-00002-of-00002.safetensors");
        let e = weight_map(r#"{"weight_map": {"a": "../../etc/passwd"}}"#).unwrap_err();
        assert!(e.contains("puts a in \"../../etc/passwd\""), "{e}");
        assert!(
            weight_map(r#"{"weight_map": {}}"#)
                .unwrap_err()
                .contains("no tensor")
        );
        assert!(weight_map("{}").unwrap_err().contains("weight_map"));
    }

    /// A folder in memory: file name → bytes.
    fn open_in<'a>(
        files: &'a BTreeMap<&'static str, Vec<u8>>,
    ) -> impl FnMut(&Path) -> std::io::Result<Cursor<Vec<u8>>> + 'a {
        move |path: &Path| {
            let name = path.file_name().unwrap().to_str().unwrap();
            files
                .get(name)
                .map(|bytes| Cursor::new(bytes.clone()))
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn digests_cover_the_files_a_run_reads() {
        let dir = Path::new("hf/tiny");
        let mut files: BTreeMap<&'static str, Vec<u8>> = BTreeMap::from([
            (CONFIG, b"{}".to_vec()),
            (WEIGHTS, b"weights".to_vec()),
            (TOKENIZER, b"tok".to_vec()),
            ("README.md", b"not read".to_vec()),
        ]);
        let d = folder_digests(dir, false, open_in(&files)).unwrap();
        assert_eq!(d.keys().collect::<Vec<_>>(), [CONFIG, WEIGHTS]);
        // sha256("{}").
        assert!(d[CONFIG].starts_with("44136fa355b3678a"), "{}", d[CONFIG]);
        let with_tokenizer = folder_digests(dir, true, open_in(&files)).unwrap();
        assert_eq!(
            with_tokenizer.keys().collect::<Vec<_>>(),
            [CONFIG, WEIGHTS, TOKENIZER]
        );
        check_digests(dir, &with_tokenizer, &with_tokenizer).unwrap();

        // Sharded: the index and its shards, not model.safetensors.
        files.insert(
            WEIGHTS_INDEX,
            br#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}"#
                .to_vec(),
        );
        files.insert("s1.safetensors", b"1".to_vec());
        let e = folder_digests(dir, false, open_in(&files)).unwrap_err();
        assert!(e.contains("hf/tiny/s2.safetensors"), "{e}");
        files.insert("s2.safetensors", b"2".to_vec());
        let sharded = folder_digests(dir, false, open_in(&files)).unwrap();
        assert_eq!(
            sharded.keys().collect::<Vec<_>>(),
            [CONFIG, WEIGHTS_INDEX, "s1.safetensors", "s2.safetensors"]
        );

        // Another shard's bytes, a missing file, a file the run did not pin: each named.
        let mut other = sharded.clone();
        other.insert("s2.safetensors".into(), "0".repeat(64));
        let e = check_digests(dir, &sharded, &other).unwrap_err();
        assert!(
            e.contains("hf/tiny/s2.safetensors is not the run's") && e.contains("init_sha256"),
            "{e}"
        );
        let e = check_digests(dir, &sharded, &d).unwrap_err();
        assert!(e.contains("reads model.safetensors.index.json"), "{e}");
        let e = check_digests(dir, &d, &sharded).unwrap_err();
        assert!(e.contains("reads model.safetensors from"), "{e}");
        let mut more = d.clone();
        more.insert(TOKENIZER.into(), "0".repeat(64));
        let e = check_digests(dir, &d, &more).unwrap_err();
        assert!(
            e.contains("has tokenizer.json, which the run's folder has not"),
            "{e}"
        );
    }
}
