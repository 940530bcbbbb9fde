//! Run configs: complete TOML files in `configs/`, loaded with unknown keys refused and
//! validated once at start.

use crate::error::{Error, Result};
use crate::models::{ModelConfig, ModelSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A run config file. Sections are added as the trainer grows; unknown ones are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSpec,
}

impl RunConfig {
    /// Reads and validates a run config; errors name the file and the offending key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            why: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            why: e.to_string().trim_end().to_string(),
        })?;
        cfg.model_config().map_err(|e| Error::Config {
            path: path.to_path_buf(),
            why: format!("[model]: {e}"),
        })?;
        Ok(cfg)
    }

    pub fn model_config(&self) -> Result<ModelConfig> {
        self.model.resolve()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let path = Path::new("configs/x.toml");
        let err = RunConfig::parse("[model]\npreset = \"tiny\"\nwidth = 3\n", path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("configs/x.toml") && msg.contains("unknown field `width`"),
            "{msg}"
        );
        let err = RunConfig::parse("[modle]\npreset = \"tiny\"\n", path).unwrap_err();
        assert!(err.to_string().contains("unknown field `modle`"), "{err}");
        let err = RunConfig::parse("[model]\npreset = \"huge\"\n", path).unwrap_err();
        assert!(
            err.to_string()
                .contains("[model]: unknown model preset 'huge'"),
            "{err}"
        );
    }

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
        assert!(seen > 0, "no configs in {}", dir.display());
    }
}
