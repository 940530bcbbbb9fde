//! The node's ed25519 identity: one key file in the workdir, created on first start, whose public
//! half is the libp2p `PeerId` the node registers with the coordinator.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use super::error::{Error, Result};

/// Name of the key file inside the node's workdir.
pub(crate) const KEY_FILE: &str = "node_key";

/// Loads `workdir/node_key`, or creates it (mode 0600) if it does not exist yet.
///
/// A key readable by other users is refused rather than silently used, as ssh does: anyone who
/// can read it can impersonate this node to its peers.
pub(crate) fn load_or_create_keypair(workdir: &Path) -> Result<Keypair> {
    let path = workdir.join(KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let mode = fs::metadata(&path)
                .map_err(|source| key_error("inspect", &path, source))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(Error::KeyPermissions {
                    path,
                    mode: mode & 0o777,
                });
            }
            let keypair =
                Keypair::from_protobuf_encoding(&bytes).map_err(|err| Error::KeyDecode {
                    path: path.clone(),
                    reason: err.to_string(),
                })?;
            if keypair.clone().try_into_ed25519().is_err() {
                return Err(Error::KeyDecode {
                    path,
                    reason: format!("a {:?} key, not ed25519", keypair.key_type()),
                });
            }
            Ok(keypair)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => create(workdir, &path),
        Err(source) => Err(key_error("read", &path, source)),
    }
}

/// Writes a new key to a temporary file created with mode 0600 and renames it into place, so a
/// crash never leaves a truncated key and the key is never readable by others, not even briefly.
fn create(workdir: &Path, path: &Path) -> Result<Keypair> {
    fs::create_dir_all(workdir)
        .map_err(|source| key_error("create the directory of", path, source))?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|err| Error::KeyDecode {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    let tmp = workdir.join(format!("{KEY_FILE}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| key_error("create", &tmp, source))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| key_error("write", &tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| key_error("rename into place", path, source))?;
    Ok(keypair)
}

fn key_error(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::KeyFile {
        action,
        path: PathBuf::from(path),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_keypair(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create_keypair(dir.path()).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    }

    #[test]
    fn key_readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_keypair(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_keypair(dir.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn garbage_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, b"not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create_keypair(dir.path()).unwrap_err();
        assert!(matches!(err, Error::KeyDecode { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"not a key");
    }
}
