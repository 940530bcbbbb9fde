//! Checkpoint directories: one per step, written atomically, verified on load, rotated.
//!
//! A save writes every file into `.tmp-step-NNNNNNNN-PID/`, fsyncs each, writes
//! `manifest.json` (sizes and SHA-256 of every file) last, fsyncs, then renames the directory
//! to `step-NNNNNNNN/` and fsyncs the parent. A directory without a manifest, or whose files do
//! not match it, is not a checkpoint: loading skips it with a warning.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "forge-checkpoint";
const VERSION: u32 = 1;

/// What the manifest says of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

/// The folder that holds a run's checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
    keep: usize,
    /// Checkpoints verified through this value and its clones (each reads and hashes every
    /// file of one checkpoint).
    verified: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

pub(crate) fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn ckpt_err(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// SHA-256 and length of a file, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<FileEntry> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

impl CheckpointDir {
    /// `keep`: how many committed checkpoints to keep (at least 1).
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> Self {
        CheckpointDir {
            root: root.into(),
            keep: keep.max(1),
            verified: Default::default(),
        }
    }

    /// How many checkpoints were verified (every file read and hashed) through this folder
    /// and its clones.
    pub fn verifications(&self) -> u64 {
        self.verified.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, step: u64) -> PathBuf {
        self.root.join(step_dir_name(step))
    }

    /// Writes a checkpoint for `step`: `write` fills the temporary directory it is given; this
    /// adds the manifest, commits by rename, and drops checkpoints beyond `keep`. On any error
    /// the temporary directory is removed and earlier checkpoints are untouched.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.root).map_err(|e| {
            ckpt_err(
                &self.root,
                format!("cannot create the checkpoint folder: {e}"),
            )
        })?;
        let tmp = self.root.join(format!(
            ".tmp-{}-{}",
            step_dir_name(step),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = self.write_and_commit(step, &tmp, write);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let path = result?;
        self.rotate();
        Ok(path)
    }

    fn write_and_commit(
        &self,
        step: u64,
        tmp: &Path,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let io = |what: &str, e: std::io::Error| {
            let hint = if e.raw_os_error() == Some(28) || e.raw_os_error() == Some(27) {
                " (the disk is full: free space or point the run at another disk; the previous checkpoint is intact)"
            } else {
                ""
            };
            ckpt_err(tmp, format!("{what}: {e}{hint}"))
        };
        std::fs::create_dir(tmp).map_err(|e| io("creating the temporary directory", e))?;
        write(tmp)?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(tmp).map_err(|e| io("listing", e))? {
            let path = entry.map_err(|e| io("listing", e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&format!("syncing {name}"), e))?;
            files.insert(name, hash_file(&path).map_err(|e| io("hashing", e))?);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step,
            files,
        };
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let mut f = File::create(tmp.join(MANIFEST)).map_err(|e| io("writing the manifest", e))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(|e| io("writing the manifest", e))?;
        fsync_dir(tmp).map_err(|e| io("syncing", e))?;
        let final_path = self.path_of(step);
        if final_path.exists() {
            // A checkpoint of this step exists (saved before a resume): the new one replaces it.
            std::fs::remove_dir_all(&final_path)
                .map_err(|e| io("replacing the old checkpoint", e))?;
        }
        std::fs::rename(tmp, &final_path).map_err(|e| io("committing (rename)", e))?;
        fsync_dir(&self.root).map_err(|e| io("syncing the checkpoint folder", e))?;
        Ok(final_path)
    }

    /// Committed-looking checkpoint directories, newest first (not yet verified).
    fn candidates(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = name.strip_prefix("step-")?.parse().ok()?;
                Some((step, e.path()))
            })
            .collect();
        found.sort_by_key(|c| std::cmp::Reverse(c.0));
        found
    }

    fn rotate(&self) {
        for (_, path) in self.candidates().into_iter().skip(self.keep) {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!("could not remove old checkpoint {}: {e}", path.display());
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.filter_map(|e| e.ok()) {
                let stale = e.file_name().to_string_lossy().starts_with(".tmp-step-");
                if stale
                    && !e
                        .file_name()
                        .to_string_lossy()
                        .ends_with(&format!("-{}", std::process::id()))
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// The newest checkpoint whose files match its manifest. Broken ones are skipped with a
    /// warning and left on disk for inspection.
    pub fn latest_valid(&self) -> Option<(u64, PathBuf)> {
        self.valid().next()
    }

    /// Every checkpoint whose files match its manifest, newest first (checked as the iterator
    /// reaches it); broken ones are skipped with a warning.
    pub fn valid(&self) -> impl Iterator<Item = (u64, PathBuf)> {
        self.candidates()
            .into_iter()
            .filter(|(step, path)| match self.verify(path) {
                Ok(m) if m.step == *step => true,
                Ok(m) => {
                    tracing::warn!(
                        "skipping checkpoint {}: its manifest says step {}",
                        path.display(),
                        m.step
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!("skipping checkpoint: {e}");
                    false
                }
            })
    }
}

impl CheckpointDir {
    /// [`verify`], counted.
    fn verify(&self, dir: &Path) -> Result<Manifest> {
        self.verified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        verify(dir)
    }
}

/// Checks every file of a checkpoint directory against its manifest.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(|e| {
        ckpt_err(
            dir,
            format!("no readable manifest ({e}); the save did not finish"),
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| ckpt_err(dir, format!("the manifest is not valid: {e}")))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(ckpt_err(
            dir,
            format!(
                "format {} v{} is not {FORMAT} v{VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    for (name, want) in &manifest.files {
        // A checkpoint's files are plain names inside it: a damaged manifest naming `../x` or
        // `/dev/zero` would make this hash a file outside (or never finish).
        let plain = Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || name.is_empty() {
            return Err(ckpt_err(
                dir,
                format!("the manifest names {name:?}, not a file of the checkpoint (damaged)"),
            ));
        }
        let got = hash_file(&dir.join(name)).map_err(|e| ckpt_err(dir, format!("{name}: {e}")))?;
        if got.bytes != want.bytes {
            return Err(ckpt_err(
                dir,
                format!(
                    "{name} has {} bytes, the manifest says {} (truncated?)",
                    got.bytes, want.bytes
                ),
            ));
        }
        if got.sha256 != want.sha256 {
            return Err(ckpt_err(
                dir,
                format!("{name} does not match its SHA-256 (corrupt)"),
            ));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_files<'a>(files: &'a [(&'a str, &'a [u8])]) -> impl FnOnce(&Path) -> Result<()> + 'a {
        move |dir| {
            for (name, data) in files {
                std::fs::write(dir.join(name), data).unwrap();
            }
            Ok(())
        }
    }

    #[test]
    fn save_verify_rotate() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path().join("ckpt"), 2);
        for step in [10, 20, 30] {
            ckpts
                .save(
                    step,
                    write_files(&[("a.bin", &[1, 2, 3]), ("state.json", b"{}")]),
                )
                .unwrap();
        }
        let steps: Vec<u64> = ckpts.candidates().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![30, 20], "keeps the last two");
        let (step, path) = ckpts.latest_valid().unwrap();
        assert_eq!(step, 30);
        let m = verify(&path).unwrap();
        assert_eq!(m.files["a.bin"].bytes, 3);
    }

    #[test]
    fn truncated_corrupt_or_unfinished_checkpoints_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 5);
        ckpts.save(1, write_files(&[("w.bin", &[7; 64])])).unwrap();
        let p2 = ckpts.save(2, write_files(&[("w.bin", &[7; 64])])).unwrap();
        let p3 = ckpts.save(3, write_files(&[("w.bin", &[7; 64])])).unwrap();
        // step 3: truncated file; step 2: flipped byte; step 4: no manifest (crash mid-save).
        std::fs::write(p3.join("w.bin"), [7; 10]).unwrap();
        let mut bytes = std::fs::read(p2.join("w.bin")).unwrap();
        bytes[5] ^= 1;
        std::fs::write(p2.join("w.bin"), bytes).unwrap();
        std::fs::create_dir(tmp.path().join("step-00000004")).unwrap();
        assert!(verify(&p3).unwrap_err().to_string().contains("truncated"));
        assert!(verify(&p2).unwrap_err().to_string().contains("corrupt"));
        assert_eq!(ckpts.latest_valid().unwrap().0, 1);
    }

    #[test]
    fn a_manifest_naming_a_file_outside_the_checkpoint_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path().join("ckpt"), 2);
        let path = ckpts.save(1, write_files(&[("w.bin", &[7; 8])])).unwrap();
        std::fs::write(tmp.path().join("outside"), [7; 8]).unwrap();
        let manifest = std::fs::read_to_string(path.join(MANIFEST)).unwrap();
        for name in ["../../outside", "/dev/zero"] {
            std::fs::write(path.join(MANIFEST), manifest.replace("w.bin", name)).unwrap();
            let err = verify(&path).unwrap_err().to_string();
            assert!(err.contains("not a file of the checkpoint"), "{err}");
        }
    }

    #[test]
    fn a_failed_save_leaves_earlier_checkpoints_and_no_temp_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 3);
        ckpts.save(1, write_files(&[("w.bin", &[1])])).unwrap();
        let err = ckpts
            .save(2, |dir| {
                std::fs::write(dir.join("partial.bin"), [0; 8]).unwrap();
                Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    why: "No space left on device".into(),
                })
            })
            .unwrap_err();
        assert!(err.to_string().contains("No space left"));
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["step-00000001".to_string()]);
        assert_eq!(ckpts.latest_valid().unwrap().0, 1);
    }
}
