//! Run control of a single-machine run: `forge-node control RUN_DIR save|stop|abort|anneal` and
//! the `forge-node train` it talks to, through two small JSON files in the run directory.
//!
//! The running trainer holds [`LOCK_FILE`] (an advisory lock, gone with its process however it
//! ends), which is how `control` knows one runs. `control` writes its request to
//! [`REQUEST_FILE`] (temporary file, rename); the trainer claims it between two steps (rename
//! again, so a request is taken once), acts on it and writes its answer to [`ANSWER_FILE`] the
//! same way; `control` waits for the answer that carries its request's id. Files rather than a
//! socket: they need nothing but the run directory (no socket path length limit, no port, the
//! directory's permissions decide who may control the run), a check between steps costs one
//! failed rename, and a person can read what was asked and answered.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forge_protocol::run_config::Anneal;
use forge_protocol::session::ControlAction;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Held by the `forge-node train` process running in the run directory.
pub const LOCK_FILE: &str = "train.lock";
/// A request waiting for the trainer.
pub const REQUEST_FILE: &str = "control.json";
/// The trainer's answer to the last request it took.
pub const ANSWER_FILE: &str = "control-answer.json";

/// What the operator changed of a run, kept in its checkpoints' `state.json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunControl {
    /// `control stop`: the run ended at this step.
    pub end_step: Option<u64>,
    /// `control anneal` (on a DiLoCo node, the coordinator's): the schedule's decay phase
    /// entered early; the run ends with it.
    pub anneal: Option<Anneal>,
}

impl RunControl {
    /// The step a run with a budget of `budget` steps ends at.
    pub fn end(&self, budget: u64) -> u64 {
        let anneal = self.anneal.map(|a| a.end());
        [Some(budget), self.end_step, anneal]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(budget)
    }
}

/// What `forge-node control` asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Matches the answer to the request.
    pub id: String,
    pub action: ControlAction,
    /// When it was written (milliseconds since the Unix epoch): a request older than the
    /// trainer's lock was left by a run that ended before taking it, and is dropped.
    pub written_unix_ms: u64,
}

/// The trainer's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: String,
    pub action: ControlAction,
    pub accepted: bool,
    /// What happens and when, or why not.
    pub what: String,
    /// The step the trainer had done when it took the request.
    pub step: u64,
}

/// Locks `path` for this process: `Ok(None)` when another process holds it.
pub fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The trainer's side: the requests that reach it in `dir`.
#[derive(Debug)]
pub struct Inbox {
    dir: PathBuf,
    /// Requests written before this moment were not for this process.
    since_unix_ms: u64,
    /// The lock that tells `control` this trainer runs, held as long as the inbox.
    _lock: File,
}

impl Inbox {
    /// Locks run directory `dir` for this process (creating it), or says that another trainer
    /// runs in it.
    pub fn open(dir: &Path) -> Result<Inbox> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!(
            "creating the run directory {}",
            dir.display()
        )))?;
        let path = dir.join(LOCK_FILE);
        let lock = try_lock(&path).map_err(Error::io(format!("locking {}", path.display())))?;
        let Some(lock) = lock else {
            return Err(Error::InvalidTrainConfig(format!(
                "another forge-node train is running in {} (it holds {}); two runs in one \
                 directory would overwrite each other's checkpoints: give this one another \
                 [train] out_dir",
                dir.display(),
                path.display()
            )));
        };
        Ok(Inbox {
            dir: dir.to_path_buf(),
            since_unix_ms: unix_ms(),
            _lock: lock,
        })
    }

    /// The request waiting, if any, claimed so that nobody else takes it. One that cannot be
    /// read is answered as refused; one older than this inbox is dropped.
    pub fn take(&self) -> Result<Option<Request>> {
        let claimed = self.dir.join(format!("{REQUEST_FILE}.taken"));
        match std::fs::rename(self.dir.join(REQUEST_FILE), &claimed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("taking {REQUEST_FILE}"))(e)),
        }
        let text = std::fs::read(&claimed);
        let _ = std::fs::remove_file(&claimed);
        let request: Request = match text.map(|t| serde_json::from_slice(&t)) {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => {
                tracing::warn!("ignored {REQUEST_FILE}, which is not a control request: {e}");
                return Ok(None);
            }
            Err(e) => return Err(Error::io(format!("reading {}", claimed.display()))(e)),
        };
        if request.written_unix_ms < self.since_unix_ms {
            tracing::warn!(
                "dropped a {} request left from before this run started",
                request.action
            );
            return Ok(None);
        }
        Ok(Some(request))
    }

    /// Writes the answer to a request `control` waits for.
    pub fn answer(&self, answer: &Answer) -> Result<()> {
        write_atomically(&self.dir.join(ANSWER_FILE), answer)
    }
}

/// `forge-node control`: asks the trainer running in `dir` for `action` and waits up to
/// `timeout` for its answer.
pub fn request(dir: &Path, action: ControlAction, timeout: Duration) -> Result<Answer> {
    let lock = dir.join(LOCK_FILE);
    let not_running = || {
        Error::InvalidTrainConfig(format!(
            "no forge-node train is running in {} (nothing holds {}); control acts on a \
             running run: pass its [train] out_dir",
            dir.display(),
            lock.display()
        ))
    };
    if !lock.exists() {
        return Err(not_running());
    }
    let running = |lock: &Path| {
        try_lock(lock)
            .map(|held| held.is_none())
            .map_err(Error::io(format!("checking {}", lock.display())))
    };
    if !running(&lock)? {
        return Err(not_running());
    }
    let written_unix_ms = unix_ms();
    let request = Request {
        id: format!("{}-{written_unix_ms}", std::process::id()),
        action,
        written_unix_ms,
    };
    let path = dir.join(REQUEST_FILE);
    write_atomically(&path, &request)?;
    let started = Instant::now();
    let mut taken = false;
    loop {
        if let Some(answer) = read_answer(dir, &request.id) {
            return Ok(answer);
        }
        if started.elapsed() >= timeout && !taken {
            // Still there: take it back, so that it does not apply when nobody waits.
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    let state = if running(&lock)? {
                        "it takes requests between two steps and may be evaluating, saving or \
                         finishing"
                    } else {
                        "it has ended"
                    };
                    return Err(Error::InvalidTrainConfig(format!(
                        "forge-node train in {} did not take the {action} request within \
                         {timeout:?} ({state}); nothing was done, ask again",
                        dir.display()
                    )));
                }
                // Taken at the last moment: its answer comes.
                Err(_) => taken = true,
            }
        }
        if started.elapsed() >= timeout + Duration::from_secs(10) {
            return Err(Error::InvalidTrainConfig(format!(
                "forge-node train in {} took the {action} request but wrote no answer",
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The answer in `dir` to request `id`, once written.
fn read_answer(dir: &Path, id: &str) -> Option<Answer> {
    let text = std::fs::read(dir.join(ANSWER_FILE)).ok()?;
    serde_json::from_slice::<Answer>(&text)
        .ok()
        .filter(|answer| answer.id == id)
}

/// Writes `value` as JSON to `path` through a temporary file and a rename: a reader sees the
/// old file or the whole new one.
fn write_atomically<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let text = serde_json::to_vec_pretty(value).expect("control files serialize");
    std::fs::write(&tmp, text).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("writing {}", path.display())))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_taken_once_and_answered() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        assert!(
            Inbox::open(dir.path()).is_err(),
            "one trainer per directory"
        );
        assert_eq!(inbox.take().unwrap(), None);
        let asker = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || request(&dir, ControlAction::Save, Duration::from_secs(20)))
        };
        let request = loop {
            if let Some(request) = inbox.take().unwrap() {
                break request;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(request.action, ControlAction::Save);
        assert_eq!(inbox.take().unwrap(), None, "taken once");
        let answer = Answer {
            id: request.id,
            action: request.action,
            accepted: true,
            what: "a checkpoint of step 3".into(),
            step: 3,
        };
        inbox.answer(&answer).unwrap();
        assert_eq!(asker.join().unwrap().unwrap(), answer);
    }

    #[test]
    fn without_a_running_trainer_nothing_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(dir.path(), ControlAction::Stop, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("no forge-node train is running"),
            "{err}"
        );
        // A lock left by a trainer that ended holds nothing.
        drop(Inbox::open(dir.path()).unwrap());
        let err = request(dir.path(), ControlAction::Stop, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("no forge-node train is running"),
            "{err}"
        );
        assert!(!dir.path().join(REQUEST_FILE).exists());
    }

    #[test]
    fn a_request_nobody_takes_is_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let _inbox = Inbox::open(dir.path()).unwrap();
        let err =
            request(dir.path(), ControlAction::Abort, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("nothing was done"), "{err}");
        assert!(!dir.path().join(REQUEST_FILE).exists());
    }
}
