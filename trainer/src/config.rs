//! Run configs: complete TOML files in `configs/`. Their schema and validation live in
//! `forge_protocol::run_config` (the coordinator checks the same file at start); this module
//! reads them from disk, with the `config.json` of a `[model] init_from` folder.

use crate::error::{Error, Result};
use std::path::Path;

pub use forge_protocol::run_config::{CheckpointConfig, EvalConfig, RunConfig, TrainConfig};

/// Reading a run config from a file (the schema in forge-protocol does no I/O).
pub trait LoadRunConfig: Sized {
    /// Reads and validates a run config, and the `config.json` of its `[model] init_from`
    /// folder; errors name the file and the offending key.
    fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// [`LoadRunConfig::load`] with `--set section.key=value` changes applied to the file's
    /// text first, checked like the file.
    fn load_with(path: &Path, sets: &[String]) -> Result<Self>;
}

impl LoadRunConfig for RunConfig {
    fn load_with(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            why: format!("cannot read it: {e}"),
        })?;
        let text = forge_protocol::run_config::apply_overrides(&text, path, sets, None)?;
        let mut cfg = Self::parse(&text, path)?;
        crate::import::read_init(&mut cfg, path)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                RunConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 3, "configs in {}", dir.display());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = RunConfig::load(&missing).unwrap_err().to_string();
        assert!(
            err.contains("missing.toml") && err.contains("cannot read it"),
            "{err}"
        );
        let typo = dir.path().join("typo.toml");
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml"),
        )
        .unwrap();
        std::fs::write(&typo, text.replace("[train]\n", "[train]\nlr_typo = 1\n")).unwrap();
        let err = RunConfig::load(&typo).unwrap_err().to_string();
        assert!(
            err.contains("typo.toml") && err.contains("unknown field `lr_typo`"),
            "{err}"
        );
    }
}
