//! The coordinator's durable state in one redb file (`STATE_DIR/coordinator.redb`): its identity
//! (token secret, certificate, key), the core's latest snapshot, the history of closed rounds
//! and committed checkpoints, and the dashboard's rows of rounds.
//!
//! Every write is one transaction committed with fsync before the server sends anything that
//! depends on it (write-ahead), so a coordinator killed at any moment restarts from a state at
//! least as new as anything a node was told.

// The transaction closures return redb's own (large) error, which is boxed into the crate's
// error right away; boxing it inside every closure as well would only add noise.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use forge_protocol::RoundId;
use forge_protocol::codec::{self, Channel};
use forge_protocol::session::RoundRecord;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::dashboard::RoundRow;
use crate::error::{Error, Result};
use crate::tls::Identity;

/// Small named blobs: identity and the snapshot.
const META: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("meta");
/// Closed rounds by round id, each a [`RoundRecord`] in a codec snapshot frame.
const ROUNDS: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("rounds");
/// Committed checkpoints: round id → wall-clock commit time (ms since the Unix epoch).
const CHECKPOINTS: TableDefinition<'static, u64, u64> = TableDefinition::new("checkpoints");
/// The dashboard's rows by round id, each a [`RoundRow`] in a codec snapshot frame.
const DASHBOARD: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("dashboard_rounds");

const TOKEN_SECRET: &str = "token_secret";
const CERT_DER: &str = "cert_der";
const KEY_DER: &str = "key_der";
const SNAPSHOT: &str = "snapshot";

/// The file inside the state directory.
pub(crate) const FILE_NAME: &str = "coordinator.redb";

/// What one batch of core steps changed, written in one transaction.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) snapshot: Option<Vec<u8>>,
    pub(crate) rounds: Vec<RoundRecord>,
    pub(crate) checkpoints: Vec<(RoundId, u64)>,
    pub(crate) dashboard: Vec<RoundRow>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.rounds.is_empty()
            && self.checkpoints.is_empty()
            && self.dashboard.is_empty()
    }
}

/// Round counts and the newest records, for status reports without a database read.
#[derive(Clone, Debug, Default)]
pub(crate) struct RoundHistory {
    pub(crate) committed: u64,
    pub(crate) abandoned: u64,
    pub(crate) recent: std::collections::VecDeque<RoundRecord>,
}

/// How many closed rounds a status report lists.
pub(crate) const RECENT_ROUNDS: usize = 50;

impl RoundHistory {
    pub(crate) fn push(&mut self, record: RoundRecord) {
        if record.committed {
            self.committed += 1;
        } else {
            self.abandoned += 1;
        }
        if self.recent.len() == RECENT_ROUNDS {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }
}

#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    db: Database,
}

/// The database holds the cluster token and the TLS private key: readable and writable by its
/// owner only. Created that way (redb fills an empty file), and narrowed if an older run left
/// it open to others.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

impl Store {
    /// Opens (or creates) the database in `state_dir`, creating the directory if needed.
    pub(crate) fn open(state_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(state_dir).map_err(|cause| Error::StateDir {
            path: state_dir.to_path_buf(),
            cause: if cause.kind() == std::io::ErrorKind::AlreadyExists {
                // What create_dir_all reports when a file is in the way.
                std::io::Error::new(
                    cause.kind(),
                    "it exists and is not a directory; pass a directory, or a path that does not exist yet",
                )
            } else {
                cause
            },
        })?;
        let path = state_dir.join(FILE_NAME);
        owner_only(&path).map_err(|cause| Error::StateDir {
            path: path.clone(),
            cause,
        })?;
        let db = Database::create(&path).map_err(|err| Error::store(&path, err))?;
        let store = Store { path, db };
        // Creating the tables up front lets every read assume they exist.
        store.write(|txn| {
            txn.open_table(META)?;
            txn.open_table(ROUNDS)?;
            txn.open_table(CHECKPOINTS)?;
            txn.open_table(DASHBOARD)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<(), redb::Error>,
    ) -> Result<()> {
        let txn = self
            .db
            .begin_write()
            .map_err(|err| Error::store(&self.path, err))?;
        body(&txn).map_err(|err| Error::store(&self.path, err))?;
        txn.commit().map_err(|err| Error::store(&self.path, err))
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let read = || -> std::result::Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(META)?;
            Ok(table.get(key)?.map(|value| value.value().to_vec()))
        };
        read().map_err(|err| Error::store(&self.path, err))
    }

    /// The stored identity, or a new one stored now (first start). The second value says which.
    pub(crate) fn identity(&self) -> Result<(Identity, bool)> {
        let parts = (
            self.meta(TOKEN_SECRET)?,
            self.meta(CERT_DER)?,
            self.meta(KEY_DER)?,
        );
        if let (Some(secret), Some(cert_der), Some(key_der)) = parts {
            let token_secret = String::from_utf8(secret).map_err(|err| Error::CorruptStore {
                path: self.path.clone(),
                what: "token secret",
                cause: err.to_string(),
            })?;
            let identity = Identity {
                token_secret,
                cert_der,
                key_der,
            };
            return Ok((identity, false));
        }
        let identity = Identity::generate()?;
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            meta.insert(TOKEN_SECRET, identity.token_secret.as_bytes())?;
            meta.insert(CERT_DER, identity.cert_der.as_slice())?;
            meta.insert(KEY_DER, identity.key_der.as_slice())?;
            Ok(())
        })?;
        Ok((identity, true))
    }

    pub(crate) fn snapshot(&self) -> Result<Option<Vec<u8>>> {
        self.meta(SNAPSHOT)
    }

    /// Every value of a table keyed by round, in round order.
    fn blobs(&self, table: TableDefinition<'static, u64, &'static [u8]>) -> Result<Vec<Vec<u8>>> {
        let read = || -> std::result::Result<Vec<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(table)?;
            let mut all = Vec::with_capacity(table.len()? as usize);
            for entry in table.iter()? {
                all.push(entry?.1.value().to_vec());
            }
            Ok(all)
        };
        read().map_err(|err| Error::store(&self.path, err))
    }

    /// Round counts and the newest [`RECENT_ROUNDS`] records.
    pub(crate) fn round_history(&self) -> Result<RoundHistory> {
        let blobs = self.blobs(ROUNDS)?;
        let mut history = RoundHistory::default();
        for blob in blobs {
            let record: RoundRecord =
                codec::decode(Channel::Snapshot, &blob).map_err(|err| Error::CorruptStore {
                    path: self.path.clone(),
                    what: "round record",
                    cause: err.to_string(),
                })?;
            history.push(record);
        }
        Ok(history)
    }

    /// The dashboard's stored rows, oldest first. They are display data: a row that does not
    /// decode (another build wrote it) is left out, with a warning.
    pub(crate) fn dashboard_rows(&self) -> Result<Vec<RoundRow>> {
        let blobs = self.blobs(DASHBOARD)?;
        let mut rows = Vec::with_capacity(blobs.len());
        let mut unreadable = 0;
        for blob in blobs {
            match codec::decode(Channel::Snapshot, &blob) {
                Ok(row) => rows.push(row),
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                "{unreadable} of the dashboard's stored rounds do not decode (another Forge build \
                 wrote them); the dashboard shows the others"
            );
        }
        Ok(rows)
    }

    /// The newest committed checkpoint's round, from the checkpoint table.
    #[cfg(test)]
    pub(crate) fn last_checkpoint(&self) -> Result<Option<RoundId>> {
        let read = || -> std::result::Result<Option<u64>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(CHECKPOINTS)?;
            Ok(table.last()?.map(|(round, _)| round.value()))
        };
        read()
            .map(|round| round.map(RoundId))
            .map_err(|err| Error::store(&self.path, err))
    }

    /// Writes one batch of changes atomically (fsynced when this returns).
    pub(crate) fn commit(&self, changes: &Changes) -> Result<()> {
        let mut rounds = Vec::with_capacity(changes.rounds.len());
        for record in &changes.rounds {
            let blob =
                codec::encode(Channel::Snapshot, record).map_err(|err| Error::CorruptStore {
                    path: self.path.clone(),
                    what: "round record",
                    cause: err.to_string(),
                })?;
            rounds.push((record.round.0, blob));
        }
        let mut dashboard = Vec::with_capacity(changes.dashboard.len());
        for row in &changes.dashboard {
            let blob =
                codec::encode(Channel::Snapshot, row).map_err(|err| Error::CorruptStore {
                    path: self.path.clone(),
                    what: "dashboard row",
                    cause: err.to_string(),
                })?;
            dashboard.push((row.round, blob));
        }
        self.write(|txn| {
            if let Some(snapshot) = &changes.snapshot {
                txn.open_table(META)?
                    .insert(SNAPSHOT, snapshot.as_slice())?;
            }
            let mut table = txn.open_table(ROUNDS)?;
            for (round, blob) in &rounds {
                table.insert(*round, blob.as_slice())?;
            }
            let mut table = txn.open_table(CHECKPOINTS)?;
            for (round, at) in &changes.checkpoints {
                table.insert(round.0, *at)?;
            }
            let mut table = txn.open_table(DASHBOARD)?;
            for (round, blob) in &dashboard {
                table.insert(*round, blob.as_slice())?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use forge_protocol::MemberId;

    use super::*;

    fn record(round: u64, committed: bool) -> RoundRecord {
        RoundRecord {
            round: RoundId(round),
            committed,
            included: vec![MemberId(1)],
            excluded: Vec::new(),
            closed_at_unix_ms: 1_000 + round,
        }
    }

    #[test]
    fn identity_snapshot_and_history_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, created) = {
            let store = Store::open(dir.path()).unwrap();
            let (identity, created) = store.identity().unwrap();
            let changes = Changes {
                snapshot: Some(b"FGSN-snapshot".to_vec()),
                rounds: (1..=60).map(|r| record(r, r % 10 != 0)).collect(),
                checkpoints: vec![(RoundId(20), 5), (RoundId(40), 6)],
                dashboard: Vec::new(),
            };
            store.commit(&changes).unwrap();
            (identity, created)
        };
        assert!(created);
        let store = Store::open(dir.path()).unwrap();
        let (again, created) = store.identity().unwrap();
        assert!(!created);
        assert_eq!(again.token(), identity.token());
        assert_eq!(again.key_der, identity.key_der);
        assert_eq!(store.snapshot().unwrap().unwrap(), b"FGSN-snapshot");
        let history = store.round_history().unwrap();
        assert_eq!((history.committed, history.abandoned), (54, 6));
        assert_eq!(history.recent.len(), RECENT_ROUNDS);
        assert_eq!(history.recent.back().unwrap().round, RoundId(60));
        assert_eq!(store.last_checkpoint().unwrap(), Some(RoundId(40)));
    }

    /// The dashboard's rows come back as written, a newer write of a round replacing the older,
    /// and a row another build wrote (that does not decode) is left out.
    #[test]
    fn the_dashboard_rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let row = |round: u64, loss: f64| RoundRow {
            round,
            committed: Some(true),
            loss: Some(loss),
            losses: 2,
            eval_loss: round.is_multiple_of(2).then_some(loss - 0.1),
            tokens: 4096,
            bytes_sent: 10_000,
            sync_s: 0.25,
            ..RoundRow::default()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let first = Changes {
                dashboard: (1..=3).map(|r| row(r, 5.0)).collect(),
                ..Changes::default()
            };
            store.commit(&first).unwrap();
            let second = Changes {
                dashboard: vec![row(3, 4.5)],
                ..Changes::default()
            };
            store.commit(&second).unwrap();
            store
                .write(|txn| {
                    txn.open_table(DASHBOARD)?.insert(9, &b"not a row"[..])?;
                    Ok(())
                })
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.dashboard_rows().unwrap();
        assert_eq!(rows, vec![row(1, 5.0), row(2, 5.0), row(3, 4.5)]);
    }

    /// The token and the TLS key are readable by the coordinator's user only, also in a
    /// database an older version left readable by others.
    #[test]
    fn the_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |dir: &Path| {
            std::fs::metadata(dir.join(FILE_NAME))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        drop(Store::open(dir.path()).unwrap());
        assert_eq!(mode(dir.path()), 0o600);
        let path = dir.path().join(FILE_NAME);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(mode(dir.path()), 0o600);
        assert!(store.identity().is_ok());
    }

    #[test]
    fn a_second_coordinator_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another forge-coordinator"), "{err}");
    }

    #[test]
    fn a_file_where_the_state_dir_should_be_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = Store::open(&file).unwrap_err().to_string();
        assert!(err.contains("exists and is not a directory"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
    }
}
