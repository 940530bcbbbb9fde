//! The coordinator's view of a run config: the whole file is validated at start with the schema
//! the nodes use (`forge_protocol::run_config`), so a typo in any table stops `serve` instead of
//! every node after it joins; the `[coordinator]` table configures the core, and the text itself
//! is handed to nodes as is, except that a run starting from a Hugging Face folder (`[model]
//! init_from`) gets the digests of the coordinator's copy of the folder pinned in it.

use std::path::Path;

use forge_protocol::RunConfig;
use forge_protocol::model::hf;
use serde::Deserialize;

use crate::core::{CoordinatorConfig, Limits};
use crate::data::DataPlan;
use crate::error::{Error, Result};
use crate::planner::ModelProfile;
use crate::profile::Architecture;

/// The `[coordinator]` table; every key is optional and unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinatorSection {
    heartbeat_interval_ms: Option<u64>,
    heartbeat_timeout_ms: Option<u64>,
    round_deadline_ms: Option<u64>,
    min_replicas: Option<u32>,
    start_replicas: Option<u32>,
    data_shards: Option<u32>,
    checkpoint_every_rounds: Option<u64>,
    max_members: Option<u32>,
    max_connections_per_ip: Option<u32>,
    joins_per_ip_per_s: Option<u32>,
}

/// Defaults for a LAN run: a member silent for 5 heartbeats is dead; a DiLoCo round of a few
/// hundred inner steps fits well inside 30 minutes.
const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_ROUND_DEADLINE_MS: u64 = 30 * 60 * 1_000;
const DEFAULT_MIN_REPLICAS: u32 = 1;
const DEFAULT_DATA_SHARDS: u32 = 64;
const DEFAULT_CHECKPOINT_EVERY_ROUNDS: u64 = 10;

/// Reads the run config at `path` into the core's config (the text travels to nodes as is).
pub fn load(path: &Path) -> Result<CoordinatorConfig> {
    load_with(path, &[])
}

/// [`load`] with `--set section.key=value` changes applied to the file's text first (the
/// changed text is what travels to nodes).
pub fn load_with(path: &Path, sets: &[String]) -> Result<CoordinatorConfig> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let text = forge_protocol::run_config::apply_overrides(&text, path, sets, None)
        .map_err(Error::InvalidRunConfig)?;
    parse(text, path)
}

/// Parses run config `text` (read from `path`, named in errors) and validates the result: the
/// whole file with the shared schema, then the `[coordinator]` table.
pub fn parse(text: String, path: &Path) -> Result<CoordinatorConfig> {
    let mut run = RunConfig::parse(&text, path).map_err(Error::InvalidRunConfig)?;
    run.read_init(path, |p| std::fs::read_to_string(p))
        .map_err(Error::InvalidRunConfig)?;
    let text = pin_init_files(text, &run, path)?;
    let model = model_profile(&run).map_err(|err| Error::RunConfig {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    let final_version = run.final_version();
    // Without a decay phase (a cosine or constant schedule), `control anneal` is refused.
    let anneal = run.anneal_plan().ok();
    let warnings = run.diloco.iter().flat_map(|d| {
        [
            d.plan_warning(final_version),
            d.scaling_warning(run.train.optimizer.kind),
        ]
    });
    for warning in warnings.flatten() {
        tracing::warn!("{}: {warning}", path.display());
    }
    let pace = run
        .diloco
        .is_some_and(|d| d.pace == forge_protocol::run_config::Pace::Auto);
    // A DiLoCo run's replicas read the stream the coordinator leases them, a batch per step.
    let data = run.diloco.map(|d| DataPlan {
        sequences_per_step: run.train.batch_size as u64,
        inner_steps: d.inner_steps,
    });
    let section = match run.coordinator {
        None => None,
        Some(table) => Some(
            toml::Value::Table(table)
                .try_into::<CoordinatorSection>()
                .map_err(|cause| Error::RunConfig {
                    path: path.to_path_buf(),
                    reason: cause.to_string().trim_end().to_string(),
                })?,
        ),
    };
    if data.is_some() && section.as_ref().is_some_and(|s| s.data_shards.is_some()) {
        tracing::warn!(
            "{}: [coordinator] data_shards is ignored in a DiLoCo run: the coordinator leases \
             each replica its part of the data round by round; remove the key",
            path.display()
        );
    }
    let get = |pick: fn(&CoordinatorSection) -> Option<u64>, default: u64| {
        section.as_ref().and_then(pick).unwrap_or(default)
    };
    let config = CoordinatorConfig {
        model: Some(model),
        min_replicas: section
            .as_ref()
            .and_then(|s| s.min_replicas)
            .unwrap_or(DEFAULT_MIN_REPLICAS),
        start_replicas: section.as_ref().and_then(|s| s.start_replicas).unwrap_or(0),
        data_shards: section
            .as_ref()
            .and_then(|s| s.data_shards)
            .unwrap_or(DEFAULT_DATA_SHARDS),
        heartbeat_interval_ms: get(|s| s.heartbeat_interval_ms, DEFAULT_HEARTBEAT_INTERVAL_MS),
        heartbeat_timeout_ms: get(|s| s.heartbeat_timeout_ms, DEFAULT_HEARTBEAT_TIMEOUT_MS),
        round_deadline_ms: get(|s| s.round_deadline_ms, DEFAULT_ROUND_DEADLINE_MS),
        checkpoint_every_rounds: get(
            |s| s.checkpoint_every_rounds,
            DEFAULT_CHECKPOINT_EVERY_ROUNDS,
        ),
        final_version,
        anneal,
        pace,
        data,
        limits: section.as_ref().map_or_else(Limits::default, |s| {
            let default = Limits::default();
            Limits {
                max_members: s.max_members.unwrap_or(default.max_members),
                max_connections_per_ip: s
                    .max_connections_per_ip
                    .unwrap_or(default.max_connections_per_ip),
                joins_per_ip_per_s: s.joins_per_ip_per_s.unwrap_or(default.joins_per_ip_per_s),
            }
        }),
        run_config: text,
    };
    config.validate().map_err(|err| Error::RunConfig {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    Ok(config)
}

/// The run config text the nodes get. With `[model] init_from`: the SHA-256 of every file the
/// run reads from the coordinator's copy of the folder, as `[model] init_sha256`, so that a node
/// whose copy differs (another revision, a damaged download) refuses to start instead of
/// training other weights; a config that pins them itself must match this copy.
fn pin_init_files(text: String, run: &RunConfig, path: &Path) -> Result<String> {
    let Some(init) = &run.init else {
        return Ok(text);
    };
    let fail = |why: String| {
        Error::InvalidRunConfig(forge_protocol::ConfigError::File {
            path: path.to_path_buf(),
            why: format!("[model] init_from {}: {why}", init.dir.display()),
        })
    };
    let found = hf::folder_digests(&init.dir, init.tokenizer, |p| std::fs::File::open(p)).map_err(
        |why| {
            fail(format!(
                "{why}; the coordinator reads the folder too, to pin its files for the nodes: \
                 run serve where the folder is"
            ))
        },
    )?;
    if let Some(pinned) = &run.model.init_sha256 {
        hf::check_digests(&init.dir, pinned, &found).map_err(fail)?;
        return Ok(text);
    }
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let model = doc
        .get_mut("model")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| fail("the run config has no [model] table".into()))?;
    let digests = found
        .into_iter()
        .map(|(name, digest)| (name, toml::Value::String(digest)))
        .collect();
    model.insert("init_sha256".into(), toml::Value::Table(digests));
    toml::to_string(&doc).map_err(|e| fail(e.to_string()))
}

/// The planner's view of the run's model at the run's batch shape: the largest micro-batch any
/// device runs (`[train.parallel] micro_batch` lists them per device) of `seq_len` tokens.
fn model_profile(run: &RunConfig) -> Result<ModelProfile> {
    let model = run.model_config().map_err(Error::InvalidRunConfig)?;
    let micro_batch = run
        .train
        .parallel
        .micro_batch
        .iter()
        .copied()
        .max()
        .unwrap_or(run.train.micro_batch);
    let name = match (&run.model.preset, &run.model.init_from) {
        (Some(preset), _) => preset.clone(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => "model".to_string(),
    };
    Architecture::from_model(&model, run.train.seq_len as u64, micro_batch as u64).profile(&name)
}

#[cfg(test)]
mod tests {
    use forge_protocol::model::ModelConfig;

    use super::*;

    /// A complete run config without a `[coordinator]` table, plus `extra` at the end.
    fn run_config(extra: &str) -> String {
        let tiny = include_str!("../../configs/tiny-cpu.toml");
        format!("{tiny}\n{extra}")
    }

    /// `serve --set` changes the run config checked like the file, and the nodes get the
    /// changed text.
    #[test]
    fn set_changes_what_the_nodes_get() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, run_config("[diloco]\ninner_steps = 5\n")).unwrap();
        let sets = [
            "diloco.inner_steps=7".to_string(),
            "train.lr=0.002".to_string(),
        ];
        let config = load_with(&path, &sets).unwrap();
        let sent = RunConfig::parse(&config.run_config, &path).unwrap();
        assert_eq!(sent.diloco.unwrap().inner_steps, 7);
        assert_eq!(sent.train.lr, 0.002);
        let err = load_with(&path, &["diloco.inner_stepz=7".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("inner_stepz"), "{err}");
    }

    /// A run from a Hugging Face folder: the nodes get the digests of the coordinator's copy of
    /// every file they read from it, and a config that pins other digests is refused.
    #[test]
    fn a_folder_to_start_from_is_pinned_for_the_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("hf");
        std::fs::create_dir(&folder).unwrap();
        let config_json = r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 300,
            "max_position_embeddings": 128}"#;
        for (name, bytes) in [
            ("config.json", config_json),
            ("model.safetensors", "weights"),
            ("tokenizer.json", "tokenizer"),
            ("README.md", "not read"),
        ] {
            std::fs::write(folder.join(name), bytes).unwrap();
        }
        let tiny = run_config("");
        let tokenizer = tiny
            .lines()
            .find(|l| l.starts_with("tokenizer = "))
            .unwrap();
        let text = tiny
            .replace("preset = \"tiny\"", &format!("init_from = {folder:?}"))
            .replace(tokenizer, "");
        let path = dir.path().join("run.toml");
        let config = parse(text.clone(), &path).unwrap();
        let profile = config.model.as_ref().unwrap();
        assert_eq!(profile.layers.len(), 2 + 2);
        let sent = RunConfig::parse(&config.run_config, &path).unwrap();
        let pinned = sent.model.init_sha256.clone().unwrap();
        assert_eq!(
            pinned.keys().collect::<Vec<_>>(),
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
        // sha256("weights").
        assert!(
            pinned["model.safetensors"].starts_with("9a129038"),
            "{pinned:?}"
        );
        // Pinned text passes through as it is while the folder matches it.
        let again = parse(config.run_config.clone(), &path).unwrap();
        assert_eq!(again.run_config, config.run_config);
        std::fs::write(folder.join("model.safetensors"), "other weights").unwrap();
        let err = parse(config.run_config.clone(), &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run.toml")
                && err.contains("model.safetensors is not the run's")
                && err.contains("init_sha256"),
            "{err}"
        );
        std::fs::remove_file(folder.join("tokenizer.json")).unwrap();
        let err = parse(text, &path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("run serve where the folder is"),
            "{err}"
        );
    }

    #[test]
    fn without_a_coordinator_table_the_defaults_apply() {
        let text = run_config("");
        let config = parse(text.clone(), Path::new("run.toml")).unwrap();
        assert_eq!(config.run_config, text);
        assert_eq!(config.heartbeat_interval_ms, DEFAULT_HEARTBEAT_INTERVAL_MS);
        assert_eq!(config.min_replicas, DEFAULT_MIN_REPLICAS);
    }

    #[test]
    fn the_runs_model_is_planned_at_the_runs_batch_shape() {
        let config = parse(run_config(""), Path::new("run.toml")).unwrap();
        let profile = config.model.expect("serve plans stages");
        let model = ModelConfig::preset("tiny", None).unwrap();
        // tiny-cpu.toml trains micro-batches of 16 sequences of 128 tokens.
        let expected = Architecture::from_model(&model, 128, 16)
            .profile("tiny")
            .unwrap();
        assert_eq!(profile, expected);
        assert_eq!(profile.tokens_per_micro_batch, 16 * 128);
        // Overrides in [model] and the per-device micro-batches change what is planned.
        let text = run_config("")
            .replacen("preset = \"tiny\"", "preset = \"tiny\"\nn_layer = 6", 1)
            .replacen("# micro_batch = []", "micro_batch = [16, 32]", 1);
        let profile = parse(text, Path::new("run.toml")).unwrap().model.unwrap();
        assert_eq!(profile.layers.len(), 6 + 2);
        assert_eq!(profile.tokens_per_micro_batch, 32 * 128);
    }

    #[test]
    fn coordinator_table_overrides_defaults() {
        let text = run_config(
            "[coordinator]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 900\nmin_replicas = 2\n",
        );
        let config = parse(text, Path::new("run.toml")).unwrap();
        assert_eq!(config.heartbeat_interval_ms, 200);
        assert_eq!(config.heartbeat_timeout_ms, 900);
        assert_eq!(config.min_replicas, 2);
        assert_eq!(config.round_deadline_ms, DEFAULT_ROUND_DEADLINE_MS);
    }

    #[test]
    fn unknown_key_and_invalid_values_name_the_file_and_the_key() {
        let err = parse(
            run_config("[coordinator]\nheartbeat_timeout = 3\n"),
            Path::new("configs/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("configs/x.toml") && err.contains("heartbeat_timeout"),
            "{err}"
        );
        let err = parse(
            run_config("[coordinator]\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 500\n"),
            Path::new("configs/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("heartbeat_timeout_ms (500)"), "{err}");
    }

    #[test]
    fn a_diloco_run_leases_a_batch_per_inner_step() {
        let diloco = include_str!("../../configs/diloco-tiny-cpu.toml");
        let config = parse(diloco.to_string(), Path::new("run.toml")).unwrap();
        let run = RunConfig::parse(diloco, Path::new("run.toml")).unwrap();
        assert_eq!(
            config.data,
            Some(DataPlan {
                sequences_per_step: run.train.batch_size as u64,
                inner_steps: run.diloco.unwrap().inner_steps,
            })
        );
        let plain = parse(run_config(""), Path::new("run.toml")).unwrap();
        assert_eq!(plain.data, None);
    }

    #[test]
    fn the_tables_nodes_read_are_validated_too() {
        let diloco = include_str!("../../configs/diloco-tiny-cpu.toml");
        parse(diloco.to_string(), Path::new("configs/x.toml")).unwrap();
        for (table, typo) in [
            ("[train]\n", "lr_typo = 1"),
            ("[data]\n", "shuffle = true"),
            ("[diloco]\n", "outer_lrate = 0.7"),
        ] {
            let key = typo.split(' ').next().unwrap();
            let text = diloco.replacen(table, &format!("{table}{typo}\n"), 1);
            let err = parse(text, Path::new("configs/x.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("configs/x.toml") && err.contains(&format!("unknown field `{key}`")),
                "{table}: {err}"
            );
        }
        let err = parse(
            diloco.replacen("inner_steps = 5\n", "inner_steps = 0\n", 1),
            Path::new("configs/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[diloco] inner_steps must be at least 1"),
            "{err}"
        );
        let err = parse(
            run_config("").replacen("preset = \"tiny\"", "preset = \"llama-7b\"", 1),
            Path::new("configs/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown model preset 'llama-7b'"), "{err}");
    }
}
