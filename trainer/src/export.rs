//! Hugging Face export: a checkpoint's model as a folder that `transformers` loads with
//! `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
//!
//! Both families already name their parameters as the Hub does and keep its layouts (Llama's
//! linear weights (out, in) like `nn.Linear`, GPT-2's projections (in, out) like its `Conv1D`),
//! so `model.safetensors` is the checkpoint's weights unchanged, in fp32, with no `lm_head`
//! when the head is tied (transformers ties it again on load). Beside it go `config.json` (the
//! architecture in transformers' field names), `generation_config.json` and the run's tokenizer
//! as `tokenizer.json`, with a `tokenizer_config.json` that has transformers use that file as it
//! is. The token Forge puts before every document (`<|endoftext|>`, or a Llama-style
//! tokenizer's BOS) is the begin token; the tokenizer's end token (`<|endoftext|>` again, or EOS)
//! the end token, and generation stops at either.
//!
//! A DiLoCo node's checkpoint shard is a checkpoint directory like any other plus the outer
//! state (`outer.safetensors`); the node writes it right after taking the outer step, so its
//! `model.safetensors` holds the committed global parameters and exports the same way.

use crate::checkpoint;
use crate::data::{Tokenizer, TokenizerConfig};
use crate::error::{Error, Result};
use crate::models::{Family, Model, ModelConfig, weights};
use crate::train::{TrainState, read_json};
use forge_protocol::run_config::RunConfig;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{Device, nn::VarStore};

use forge_protocol::model::hf::{
    CONFIG, GENERATION_CONFIG as GENERATION, TOKENIZER, TOKENIZER_CONFIG, WEIGHTS,
};

/// Every file an export writes, in the order it writes them.
const FILES: [&str; 5] = [WEIGHTS, CONFIG, GENERATION, TOKENIZER, TOKENIZER_CONFIG];

/// What `forge-node export --hf` is asked to do.
#[derive(Debug, Clone)]
pub struct HfExport {
    /// A checkpoint directory (`step-NNNNNNNN`) of `forge-node train` or of a DiLoCo node.
    pub checkpoint: PathBuf,
    /// The folder to write; created when missing.
    pub out: PathBuf,
    /// A `tokenizer.json` to ship instead of the checkpoint's own.
    pub tokenizer: Option<PathBuf>,
    /// Write into a folder that is not empty: the files an export writes are replaced, any
    /// others are left as they are.
    pub force: bool,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The folder written.
    pub out: PathBuf,
    /// The transformers class the folder loads as (`LlamaForCausalLM`, `GPT2LMHeadModel`).
    pub architecture: &'static str,
    /// The optimizer step of the checkpoint.
    pub step: u64,
    /// Parameters written (a tied head counted once).
    pub params: i64,
    /// The `tokenizer.json` shipped.
    pub tokenizer: PathBuf,
    /// The files written into `out`.
    pub files: Vec<&'static str>,
}

impl HfExport {
    /// Checks the checkpoint and the output folder, then writes every file into a staging
    /// folder beside `out` and moves them in, so a failure leaves `out` as it was.
    pub fn run(&self) -> Result<Exported> {
        check_out(&self.out, self.force)?;
        let manifest = checkpoint::verify(&self.checkpoint)?;
        let state: TrainState = read_json(&self.checkpoint.join("state.json"))?;
        let cfg = state.model.clone();
        let (tokenizer, tokenizer_path) = self.tokenizer_for(&state)?;
        if tokenizer.vocab_size() as i64 > cfg.vocab_size {
            return Err(self.error(format!(
                "the tokenizer {} has ids up to {}, but the model's embedding has {} rows: it is \
                 not this model's tokenizer; pass --tokenizer with the one the run used",
                tokenizer_path.display(),
                tokenizer.vocab_size() - 1,
                cfg.vocab_size
            )));
        }

        let weights_path = self.checkpoint.join(WEIGHTS);
        let mut vs = VarStore::new(Device::Cpu);
        let _model = Model::new(&vs.root(), &cfg)?;
        check_whole_model(&self.checkpoint, &vs, &cfg, &weights_path)?;
        weights::load(&mut vs, &cfg, &weights_path)?;

        let staging = self.staging_dir()?;
        let written = write_files(&staging, &vs, &cfg, &tokenizer);
        let committed = written.and_then(|()| self.commit(&staging));
        if committed.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        committed?;
        Ok(Exported {
            out: self.out.clone(),
            architecture: architecture(cfg.family),
            step: manifest.step,
            params: cfg.param_count(),
            tokenizer: tokenizer_path,
            files: FILES.to_vec(),
        })
    }

    fn error(&self, why: impl Into<String>) -> Error {
        Error::Export {
            out: self.out.clone(),
            why: why.into(),
        }
    }

    /// `--tokenizer` when given, else the checkpoint's `tokenizer.json`.
    fn tokenizer_for(&self, state: &TrainState) -> Result<(Tokenizer, PathBuf)> {
        let own = self.checkpoint.join(TOKENIZER);
        let Some(path) = &self.tokenizer else {
            if !own.is_file() {
                return Err(Error::Checkpoint {
                    path: self.checkpoint.clone(),
                    why: format!(
                        "it has no {TOKENIZER}; pass --tokenizer PATH with the one the run used \
                         ({})",
                        run_tokenizer(&state.run_config)
                    ),
                });
            }
            return Ok((Tokenizer::load(&own)?, own));
        };
        let given = Tokenizer::load(path)?;
        if let Ok(stored) = Tokenizer::load(&own)
            && stored.hash() != given.hash()
        {
            tracing::warn!(
                "{} is not the tokenizer stored in the checkpoint ({}); exporting it as asked, \
                     but if its ids mean other words than the run's, the model will not make sense",
                path.display(),
                own.display()
            );
        }
        Ok((given, path.clone()))
    }

    /// An empty folder beside `out` (same disk, so the files can be renamed into `out`).
    fn staging_dir(&self) -> Result<PathBuf> {
        let parent = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| self.error("the path names no folder; give a folder path"))?;
        std::fs::create_dir_all(&parent).map_err(|e| {
            self.error(format!(
                "cannot create the parent folder {}: {e}",
                parent.display()
            ))
        })?;
        let staging = parent.join(format!(".{name}.export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(|e| {
            self.error(format!(
                "cannot create the staging folder {}: {e}",
                staging.display()
            ))
        })?;
        Ok(staging)
    }

    /// Moves the staged files into `out` and removes the staging folder.
    fn commit(&self, staging: &Path) -> Result<()> {
        std::fs::create_dir_all(&self.out)
            .map_err(|e| self.error(format!("cannot create the folder: {e}")))?;
        for name in FILES {
            std::fs::rename(staging.join(name), self.out.join(name))
                .map_err(|e| self.error(format!("cannot move {name} into it: {e}")))?;
        }
        std::fs::remove_dir(staging).map_err(|e| {
            self.error(format!(
                "the export is complete, but the staging folder {} could not be removed: {e}",
                staging.display()
            ))
        })?;
        let others: Vec<String> = std::fs::read_dir(&self.out)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !FILES.contains(&n.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        if !others.is_empty() {
            tracing::warn!(
                "{} also holds {} that the export did not write, left as they were",
                self.out.display(),
                others.join(", ")
            );
        }
        Ok(())
    }
}

/// Refuses an `out` that is a file, or a folder with anything in it unless `force`.
fn check_out(out: &Path, force: bool) -> Result<()> {
    let error = |why: String| Error::Export {
        out: out.to_path_buf(),
        why,
    };
    let meta = match std::fs::metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(error(format!("cannot read it: {e}"))),
    };
    if !meta.is_dir() {
        return Err(error(
            "it is a file, not a folder; give the path of a folder to create".into(),
        ));
    }
    let mut entries =
        std::fs::read_dir(out).map_err(|e| error(format!("cannot list the folder: {e}")))?;
    if entries.next().is_some() && !force {
        return Err(error(format!(
            "the folder is not empty; choose a new folder, or pass --force to write into it \
             (its {} are replaced, other files are left as they are)",
            FILES.join(", ")
        )));
    }
    Ok(())
}

/// Refuses a `model.safetensors` that holds only some of the model's parameters (as one
/// pipeline stage's checkpoint would), naming what it holds. Any other mismatch is left to
/// [`weights::load`], which names it.
fn check_whole_model(
    checkpoint: &Path,
    vs: &VarStore,
    cfg: &ModelConfig,
    weights_path: &Path,
) -> Result<()> {
    let header = weights::read_header(weights_path)?;
    let stored: BTreeSet<String> = header.tensors().into_keys().collect();
    let wanted: BTreeSet<String> = vs.variables().into_keys().collect();
    let held: Vec<&String> = stored.intersection(&wanted).collect();
    let missing: Vec<&String> = wanted.difference(&stored).collect();
    let only_model_tensors = stored
        .iter()
        .all(|name| wanted.contains(name) || name == "lm_head.weight");
    if held.is_empty() || missing.is_empty() || !only_model_tensors {
        return Ok(());
    }
    let layers: BTreeSet<i64> = held.iter().filter_map(|name| layer_of(name)).collect();
    let layers = match (layers.first(), layers.last()) {
        (Some(first), Some(last)) => format!("layers {first}..={last} of {}", cfg.n_layer),
        _ => "no transformer layer".to_string(),
    };
    let shown: Vec<&str> = missing.iter().take(3).map(|n| n.as_str()).collect();
    Err(Error::Checkpoint {
        path: checkpoint.to_path_buf(),
        why: format!(
            "its {WEIGHTS} holds {} of the model's {} parameters ({layers}; missing {}{}): it is \
             part of the model, as one pipeline stage's checkpoint would be, and a Hugging Face \
             model needs all of it. Export a checkpoint that holds the whole model: one of \
             `forge-node train`, or of a DiLoCo node that trains whole-model replicas",
            held.len(),
            wanted.len(),
            shown.join(", "),
            if missing.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ),
    })
}

/// The transformer layer a parameter belongs to (`model.layers.N.` or `transformer.h.N.`).
fn layer_of(name: &str) -> Option<i64> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|pair| pair[0] == "layers" || pair[0] == "h")
        .and_then(|pair| pair[1].parse().ok())
}

/// Where the run config says its tokenizer came from, for the error when a checkpoint has none.
fn run_tokenizer(run_config: &str) -> String {
    match RunConfig::parse(run_config, Path::new("the checkpoint's run config")) {
        Ok(run) => match &run.data.tokenizer {
            Some(TokenizerConfig::Path(path)) => {
                format!("its run config loads {}", path.display())
            }
            None => match &run.model.init_from {
                Some(dir) => format!("its run config loads {}/tokenizer.json", dir.display()),
                None => "its run config names none".to_string(),
            },
            Some(TokenizerConfig::Train { vocab_size }) => format!(
                "its run config trained a {vocab_size}-token BPE, saved in data.cache_dir {} as \
                 tokenizer-bpe{vocab_size}-*.json",
                run.data.cache_dir.display()
            ),
        },
        Err(e) => format!("its run config does not say: {e}"),
    }
}

/// The transformers class each family loads as.
fn architecture(family: Family) -> &'static str {
    match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Gpt2 => "GPT2LMHeadModel",
    }
}

/// Writes every file of the export into `dir`.
fn write_files(dir: &Path, vs: &VarStore, cfg: &ModelConfig, tokenizer: &Tokenizer) -> Result<()> {
    weights::save(vs, &dir.join(WEIGHTS))?;
    let specials = Specials::of(tokenizer);
    write_json(&dir.join(CONFIG), &hf_config(cfg, &specials))?;
    write_json(&dir.join(GENERATION), &generation_config(&specials))?;
    tokenizer.save(&dir.join(TOKENIZER))?;
    write_json(
        &dir.join(TOKENIZER_CONFIG),
        &tokenizer_config(cfg, tokenizer),
    )
}

/// The special token ids an export names: begin (Forge's document separator) and end.
struct Specials {
    bos: u32,
    eos: u32,
}

impl Specials {
    fn of(tokenizer: &Tokenizer) -> Self {
        Specials {
            bos: tokenizer.separator_id(),
            eos: tokenizer.end().id,
        }
    }

    /// What `generate` stops at: the end token, and the separator where it differs (a model
    /// trained by Forge ends a document by starting the next one).
    fn stop(&self) -> Value {
        if self.bos == self.eos {
            json!(self.eos)
        } else {
            json!([self.eos, self.bos])
        }
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    text.push(b'\n');
    std::fs::write(path, text).map_err(Error::io(format!("writing {}", path.display())))
}

/// `config.json`: the architecture in the fields of transformers' `LlamaConfig` or `GPT2Config`.
/// Dropout is 0 because Forge trains without it.
fn hf_config(cfg: &ModelConfig, specials: &Specials) -> Value {
    match cfg.family {
        Family::Llama => json!({
            "architectures": [architecture(cfg.family)],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim(),
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            // transformers 4 reads `rope_theta`; 5 reads `rope_parameters` (and accepts both).
            "rope_theta": cfg.rope_theta,
            "rope_parameters": { "rope_type": "default", "rope_theta": cfg.rope_theta },
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": specials.bos,
            "eos_token_id": specials.eos,
            "initializer_range": 0.02,
            "use_cache": true,
            "dtype": "float32",
        }),
        Family::Gpt2 => json!({
            "architectures": [architecture(cfg.family)],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.d_ff,
            // GELU with the tanh approximation, which is what Forge's GPT-2 uses.
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            "bos_token_id": specials.bos,
            "eos_token_id": specials.eos,
            "initializer_range": 0.02,
            "use_cache": true,
            "dtype": "float32",
        }),
    }
}

/// `generation_config.json`: begin, stop ([`Specials::stop`]) and pad with the end token.
/// Nothing else: `generate` is then greedy, like `forge-node sample --temperature 0`, and a
/// length set here would be reported as overridden by every call that passes `max_new_tokens`.
fn generation_config(specials: &Specials) -> Value {
    json!({
        "bos_token_id": specials.bos,
        "eos_token_id": specials.stop(),
        "pad_token_id": specials.eos,
    })
}

/// `tokenizer_config.json`: the generic fast tokenizer, which runs `tokenizer.json` exactly as
/// written (transformers' `LlamaTokenizer` would rebuild a SentencePiece-style pipeline around
/// the vocabulary instead). No token is added around the text, as in Forge's sampling; decoding
/// keeps spaces as they are.
fn tokenizer_config(cfg: &ModelConfig, tokenizer: &Tokenizer) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.separator().text,
        "eos_token": tokenizer.end().text,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointDir;
    use crate::data::DataPosition;
    use tch::{Kind, Tensor};

    fn llama_gqa() -> ModelConfig {
        let mut cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        cfg.n_kv_head = 2;
        cfg.tie_embeddings = false;
        cfg.rope_theta = 500_000.0;
        cfg.vocab_size = 2112;
        cfg.d_ff = 320;
        cfg
    }

    fn tokenizer() -> Tokenizer {
        let docs: Vec<Result<String>> = (0..50)
            .map(|i| Ok(format!("Once upon a time there was a cat number {i}.")))
            .collect();
        Tokenizer::train(docs.into_iter(), 300).unwrap()
    }

    fn run_config_text() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml"),
        )
        .unwrap()
    }

    fn state(cfg: &ModelConfig) -> TrainState {
        TrainState {
            step: 7,
            tokens: 7 * 256,
            data_position: DataPosition::default(),
            loss_ema: None,
            elapsed_s: 1.0,
            model: cfg.clone(),
            run_config: run_config_text(),
            forge_version: "test".into(),
            worker_positions: Vec::new(),
            control: Default::default(),
            source_windows: Vec::new(),
        }
    }

    /// A committed checkpoint of a randomly initialised `cfg`, as `forge-node train` writes
    /// one; `weights` writes its `model.safetensors` (given the model's var store).
    fn checkpoint_with(
        root: &Path,
        cfg: &ModelConfig,
        tokenizer: Option<&Tokenizer>,
        weights: impl FnOnce(&VarStore, &Path),
    ) -> (PathBuf, VarStore) {
        let vs = VarStore::new(Device::Cpu);
        let _model = Model::new(&vs.root(), cfg).unwrap();
        let state = state(cfg);
        let dir = CheckpointDir::new(root.join("checkpoints"), 1)
            .save(7, |dir| {
                weights(&vs, &dir.join(WEIGHTS));
                std::fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap())
                    .unwrap();
                if let Some(tok) = tokenizer {
                    tok.save(&dir.join(TOKENIZER))?;
                }
                Ok(())
            })
            .unwrap();
        (dir, vs)
    }

    fn checkpoint(root: &Path, cfg: &ModelConfig) -> (PathBuf, VarStore) {
        checkpoint_with(root, cfg, Some(&tokenizer()), |vs, path| {
            weights::save(vs, path).unwrap()
        })
    }

    fn export(checkpoint: &Path, out: &Path) -> HfExport {
        HfExport {
            checkpoint: checkpoint.to_path_buf(),
            out: out.to_path_buf(),
            tokenizer: None,
            force: false,
        }
    }

    fn read_json_file(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn llama_config_names_every_setting_in_transformers_terms() {
        let cfg = llama_gqa();
        let c = hf_config(&cfg, &Specials { bos: 0, eos: 0 });
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["vocab_size"], 2112);
        assert_eq!(c["hidden_size"], 128);
        assert_eq!(c["intermediate_size"], 320);
        assert_eq!(c["num_hidden_layers"], 4);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["head_dim"], 32);
        assert_eq!(c["max_position_embeddings"], 256);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 500_000.0);
        assert_eq!(c["rope_parameters"]["rope_theta"], 500_000.0);
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["attention_bias"], false);
        assert_eq!(c["mlp_bias"], false);
        assert_eq!(c["bos_token_id"], 0);
        assert_eq!(c["eos_token_id"], 0);
    }

    #[test]
    fn gpt2_config_names_every_setting_in_transformers_terms() {
        let mut cfg = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        cfg.norm_eps = 1e-6;
        let gpt2 = Specials {
            bos: 50256,
            eos: 50256,
        };
        let c = hf_config(&cfg, &gpt2);
        assert_eq!(c["architectures"], json!(["GPT2LMHeadModel"]));
        assert_eq!(c["model_type"], "gpt2");
        assert_eq!(c["vocab_size"], 2048);
        assert_eq!(c["n_positions"], 256);
        assert_eq!(c["n_embd"], 128);
        assert_eq!(c["n_layer"], 4);
        assert_eq!(c["n_head"], 4);
        assert_eq!(c["n_inner"], 384);
        assert_eq!(c["activation_function"], "gelu_new");
        assert_eq!(c["layer_norm_epsilon"], 1e-6);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["resid_pdrop"], 0.0);
        assert_eq!(c["eos_token_id"], 50256);
        let g = generation_config(&gpt2);
        assert_eq!(g["eos_token_id"], 50256);
        assert_eq!(g["pad_token_id"], 50256);
        // A Llama-style tokenizer: documents begin with BOS, generation stops at EOS or BOS.
        let g = generation_config(&Specials { bos: 1, eos: 2 });
        assert_eq!(g["bos_token_id"], 1);
        assert_eq!(g["eos_token_id"], json!([2, 1]));
        assert_eq!(g["pad_token_id"], 2);
    }

    #[test]
    fn parameters_keep_their_hub_names_and_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        for cfg in [
            llama_gqa(),
            ModelConfig::preset("tiny", Some(Family::Llama)).unwrap(),
            ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap(),
        ] {
            let root = tmp
                .path()
                .join(format!("{}-{}", cfg.family, cfg.tie_embeddings));
            let (dir, vs) = checkpoint(&root, &cfg);
            let out = root.join("hf");
            let done = export(&dir, &out).run().unwrap();
            assert_eq!(done.step, 7);
            assert_eq!(done.params, cfg.param_count());
            assert_eq!(done.tokenizer, dir.join(TOKENIZER));
            let mut names: Vec<String> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            let mut want: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
            want.sort();
            assert_eq!(names, want, "{}", cfg.family);

            let header = weights::read_header(&out.join(WEIGHTS)).unwrap();
            let shapes = header.tensors();
            let (d, kv) = (
                cfg.d_model as usize,
                (cfg.n_kv_head * cfg.head_dim()) as usize,
            );
            let expected: &[(&str, Vec<usize>)] = match cfg.family {
                Family::Llama => &[
                    (
                        "model.embed_tokens.weight",
                        vec![cfg.vocab_size as usize, d],
                    ),
                    ("model.layers.3.self_attn.q_proj.weight", vec![d, d]),
                    ("model.layers.3.self_attn.k_proj.weight", vec![kv, d]),
                    (
                        "model.layers.0.mlp.down_proj.weight",
                        vec![d, cfg.d_ff as usize],
                    ),
                    ("model.layers.0.post_attention_layernorm.weight", vec![d]),
                    ("model.norm.weight", vec![d]),
                ],
                // Conv1D: (in, out).
                Family::Gpt2 => &[
                    ("transformer.wte.weight", vec![cfg.vocab_size as usize, d]),
                    ("transformer.wpe.weight", vec![cfg.max_seq_len as usize, d]),
                    ("transformer.h.0.attn.c_attn.weight", vec![d, 3 * d]),
                    ("transformer.h.0.attn.c_attn.bias", vec![3 * d]),
                    (
                        "transformer.h.3.mlp.c_fc.weight",
                        vec![d, cfg.d_ff as usize],
                    ),
                    (
                        "transformer.h.3.mlp.c_proj.weight",
                        vec![cfg.d_ff as usize, d],
                    ),
                    ("transformer.ln_f.bias", vec![d]),
                ],
            };
            for (name, shape) in expected {
                assert_eq!(&shapes[*name].shape, shape, "{name}");
            }
            assert_eq!(
                shapes.contains_key("lm_head.weight"),
                !cfg.tie_embeddings,
                "a tied head is left to transformers to tie"
            );
            assert_eq!(shapes.len(), vs.variables().len());

            // The values are the checkpoint's, bit for bit.
            let written: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(out.join(WEIGHTS))
                    .unwrap()
                    .into_iter()
                    .collect();
            for (name, var) in vs.variables() {
                assert_eq!(written[&name].kind(), Kind::Float);
                assert!(written[&name].equal(&var), "{name}");
            }

            let config = read_json_file(&out.join(CONFIG));
            assert_eq!(config["architectures"][0], done.architecture);
            let tok_config = read_json_file(&out.join(TOKENIZER_CONFIG));
            assert_eq!(tok_config["tokenizer_class"], "PreTrainedTokenizerFast");
            assert_eq!(tok_config["eos_token"], crate::data::END_OF_TEXT);
            let shipped = Tokenizer::load(&out.join(TOKENIZER)).unwrap();
            assert_eq!(shipped.hash(), tokenizer().hash());
            assert_eq!(config["eos_token_id"], shipped.separator_id());
        }
    }

    #[test]
    fn a_non_empty_folder_is_refused_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        let (dir, _vs) = checkpoint(tmp.path(), &cfg);
        let out = tmp.path().join("hf");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("README.md"), "mine").unwrap();
        let err = export(&dir, &out).run().unwrap_err().to_string();
        assert!(
            err.contains("hf") && err.contains("not empty") && err.contains("--force"),
            "{err}"
        );
        assert!(!out.join(CONFIG).exists());

        let forced = HfExport {
            force: true,
            ..export(&dir, &out)
        };
        forced.run().unwrap();
        forced.run().unwrap();
        assert!(out.join(WEIGHTS).is_file());
        assert_eq!(
            std::fs::read_to_string(out.join("README.md")).unwrap(),
            "mine"
        );
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".export-"))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = export(&dir, &file).run().unwrap_err().to_string();
        assert!(err.contains("is a file, not a folder"), "{err}");
    }

    #[test]
    fn a_truncated_checkpoint_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        let (dir, _vs) = checkpoint(tmp.path(), &cfg);
        let weights_path = dir.join(WEIGHTS);
        let bytes = std::fs::read(&weights_path).unwrap();
        std::fs::write(&weights_path, &bytes[..bytes.len() / 2]).unwrap();
        let out = tmp.path().join("hf");
        let err = export(&dir, &out).run().unwrap_err().to_string();
        assert!(err.contains(WEIGHTS) && err.contains("truncated"), "{err}");
        assert!(!out.exists());
        let err = export(&tmp.path().join("nowhere"), &out)
            .run()
            .unwrap_err()
            .to_string();
        assert!(err.contains("nowhere") && err.contains("manifest"), "{err}");
    }

    #[test]
    fn a_checkpoint_of_part_of_the_model_says_what_it_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        // The first stage of two: embedding and layers 0 and 1.
        let (dir, _vs) = checkpoint_with(tmp.path(), &cfg, Some(&tokenizer()), |vs, path| {
            let stage: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .filter(|(name, _)| {
                    layer_of(name).is_none_or(|l| l < 2) && name != "model.norm.weight"
                })
                .collect();
            Tensor::write_safetensors(&stage, path).unwrap();
        });
        let err = export(&dir, &tmp.path().join("hf"))
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds 19 of the model's 38 parameters")
                && err.contains("layers 0..=1 of 4")
                && err.contains("whole model"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_foreign_tokenizer_is_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        let (dir, _vs) = checkpoint_with(tmp.path(), &cfg, None, |vs, path| {
            weights::save(vs, path).unwrap()
        });
        let out = tmp.path().join("hf");
        let err = export(&dir, &out).run().unwrap_err().to_string();
        assert!(
            err.contains("no tokenizer.json")
                && err.contains("--tokenizer")
                && err.contains("2048-token BPE")
                && err.contains(".forge-cache/data"),
            "{err}"
        );

        let given = tmp.path().join("given.json");
        tokenizer().save(&given).unwrap();
        let done = HfExport {
            tokenizer: Some(given.clone()),
            ..export(&dir, &out)
        }
        .run()
        .unwrap();
        assert_eq!(done.tokenizer, given);

        // A tokenizer with more ids than the model has embedding rows is another model's.
        let mut small = cfg.clone();
        small.vocab_size = tokenizer().vocab_size() as i64 - 1;
        let (dir, _vs) = checkpoint(&tmp.path().join("small"), &small);
        let err = export(&dir, &tmp.path().join("hf-small"))
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("embedding has {} rows", small.vocab_size))
                && err.contains("not this model's tokenizer"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_family_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        let mut state = serde_json::to_value(state(&cfg)).unwrap();
        state["model"]["family"] = json!("mamba");
        let dir = CheckpointDir::new(tmp.path(), 1)
            .save(7, |dir| {
                std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
                Ok(())
            })
            .unwrap();
        let err = export(&dir, &tmp.path().join("hf"))
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("state.json") && err.contains("unknown variant `mamba`"),
            "{err}"
        );
    }
}
