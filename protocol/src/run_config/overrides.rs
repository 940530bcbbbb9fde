//! `--set section.key=value` on the command line: changes to a run config's text before it is
//! parsed, so that an override is checked exactly like the file (an unknown key or a wrong type
//! is the same error, naming the key).

use super::ConfigError;
use std::path::Path;

/// The keys a `forge-node join` may set for itself: how this machine trains its replica, not
/// what the run computes (the rest is the coordinator's, set with `forge-coordinator serve --set`).
pub const NODE_KEYS: &[&str] = &[
    "train.threads",
    "train.micro_batch",
    "train.precision",
    "train.parallel.*",
];

/// `text` (a run config read from `path`) with every `section.key=value` of `sets` applied, in
/// order, as TOML text. A value is read as TOML (`3e-4`, `true`, `"cpu"`, `["a.txt"]`) and
/// otherwise taken as a string (`cuda:0`). Tables on the way are created; a key under a value
/// that is not a table is an error. With `allowed` (see [`NODE_KEYS`]) only those keys may be
/// set (`x.*` allows every key under table `x`).
pub fn apply_overrides(
    text: &str,
    path: &Path,
    sets: &[String],
    allowed: Option<&[&str]>,
) -> Result<String, ConfigError> {
    if sets.is_empty() {
        return Ok(text.to_string());
    }
    let fail = |why: String| ConfigError::File {
        path: path.to_path_buf(),
        why,
    };
    let mut doc: toml::Table =
        toml::from_str(text).map_err(|e| fail(e.to_string().trim_end().to_string()))?;
    for set in sets {
        let bad = |why: &str| fail(format!("--set {set}: {why}"));
        let Some((key, value)) = set.split_once('=') else {
            return Err(bad(
                "give section.key=value, for example --set train.lr=3e-4",
            ));
        };
        let key = key.trim();
        let parts: Vec<&str> = key.split('.').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "name a key inside a section, for example train.lr or diloco.inner_steps",
            ));
        }
        if let Some(allowed) = allowed {
            let permitted = allowed.iter().any(|a| match a.strip_suffix(".*") {
                Some(table) => key.starts_with(&format!("{table}.")),
                None => key == *a,
            });
            if !permitted {
                return Err(bad(&format!(
                    "a node may set only {}; the rest of the run config is the run's own, set on the \
                     coordinator (forge-coordinator serve --set {key}=...)",
                    allowed.join(", ")
                )));
            }
        }
        let value = parse_value(value.trim());
        let (last, tables) = parts.split_last().expect("two parts or more");
        let mut table = &mut doc;
        for (i, name) in tables.iter().enumerate() {
            let entry = table
                .entry(name.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                bad(&format!(
                    "{} is a value, not a section",
                    parts[..=i].join(".")
                ))
            })?;
        }
        table.insert(last.to_string(), value);
    }
    toml::to_string(&doc).map_err(|e| fail(format!("after --set: {e}")))
}

/// A command-line value as TOML, or as a string when it is not TOML.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_config::RunConfig;

    const FILE: &str = "configs/tiny-cpu.toml";

    fn shipped() -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(FILE))
            .unwrap()
    }

    fn set(sets: &[&str], allowed: Option<&[&str]>) -> Result<RunConfig, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let text = apply_overrides(&shipped(), Path::new(FILE), &sets, allowed)
            .map_err(|e| e.to_string())?;
        RunConfig::parse(&text, Path::new(FILE)).map_err(|e| e.to_string())
    }

    #[test]
    fn values_are_toml_or_strings_and_later_sets_win() {
        let cfg = set(
            &[
                "train.lr=1e-3",
                "train.max_steps = 70",
                "train.device=cuda:1",
                "train.device=cpu",
                "data.val=[\"a.txt\", \"b.txt\"]",
                "checkpoint.background=false",
            ],
            None,
        )
        .unwrap();
        assert_eq!(cfg.train.lr, 1e-3);
        assert_eq!(cfg.train.max_steps, Some(70));
        assert_eq!(cfg.train.device, "cpu");
        assert_eq!(cfg.data.val.len(), 2);
        assert!(!cfg.checkpoint.background);
        // Untouched keys keep the file's values.
        let plain = RunConfig::parse(&shipped(), Path::new(FILE)).unwrap();
        assert_eq!(cfg.train.batch_size, plain.train.batch_size);
        assert_eq!(cfg.model, plain.model);
    }

    #[test]
    fn a_new_section_is_created() {
        let cfg = set(&["diloco.inner_steps=12"], None).unwrap();
        assert_eq!(cfg.diloco.unwrap().inner_steps, 12);
    }

    #[test]
    fn errors_name_the_override_and_what_to_do() {
        for (sets, expect) in [
            (&["train.lr"][..], "give section.key=value"),
            (&["lr=3"][..], "name a key inside a section"),
            (&["train..lr=3"][..], "name a key inside a section"),
            (&["train.lr.x=3"][..], "train.lr is a value, not a section"),
            // Checked like the file: the parser's own errors, naming the key.
            (&["train.lr_typo=3"][..], "lr_typo"),
            (&["train.max_steps=lots"][..], "max_steps"),
        ] {
            let err = set(sets, None).unwrap_err();
            assert!(err.contains(expect), "{sets:?}: {err}");
            assert!(err.contains(FILE), "{sets:?}: {err}");
        }
    }

    #[test]
    fn a_node_sets_only_its_own_keys() {
        let cfg = set(
            &["train.threads=1", "train.parallel.cpu_workers=2"],
            Some(NODE_KEYS),
        )
        .unwrap();
        assert_eq!(cfg.train.threads, Some(1));
        assert_eq!(cfg.train.parallel.cpu_workers, 2);
        let err = set(&["train.lr=1"], Some(NODE_KEYS)).unwrap_err();
        assert!(
            err.contains("a node may set only") && err.contains("forge-coordinator serve --set"),
            "{err}"
        );
    }
}
