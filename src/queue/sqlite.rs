//! The SQLite backend of [`WorkQueue`](super::WorkQueue): one file on
//! local disk in WAL mode, its runs' lock files in a directory beside it
//! (`FILE.runs/RUN.lock`, each held with `flock` while its run lives).
//!
//! Tables (inspect them with `sqlite3 FILE`):
//!
//! - `items(seq, job_id UNIQUE, payload, state, deliveries, lease_owner,
//!   enqueued_at, updated_at)`: `state` is `pending`, `leased`, `done` or
//!   `dead`; `lease_owner` the run holding a lease; `deliveries` how many
//!   runs took the item and did not give it back (a cancel or a release
//!   gives it back); times in Unix milliseconds.
//! - `dead_letters(job_id, stage, kind, error, attempts, deliveries,
//!   payload, died_at)`: written in the same transaction that marks an item
//!   `dead`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::leased::{Leased, Pick, Run, Settle, Store};
use super::{DeadItem, Durability, QueueCounts, QueueOptions};

/// The schema's version, in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'leased', 'done', 'dead')),
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    enqueued_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_state ON items (state, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    job_id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    kind TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    payload TEXT NOT NULL,
    died_at INTEGER NOT NULL
);
";

pub(crate) struct SqliteStore {
    path: PathBuf,
    runs: PathBuf,
    connection: Mutex<Connection>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl SqliteStore {
    pub(crate) fn open(path: &Path, options: &QueueOptions) -> anyhow::Result<Self> {
        let name = path.display();
        let connection = Connection::open(path)
            .with_context(|| format!("cannot open the work queue file {name}"))?;
        connection
            .busy_timeout(options.busy_timeout)
            .with_context(|| format!("work queue {name}"))?;
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .with_context(|| format!("{name} is not an SQLite database"))?;
        anyhow::ensure!(
            version == 0 || version == SCHEMA_VERSION,
            "{name} is not a work queue of this version (user_version {version}, expected {SCHEMA_VERSION})"
        );
        let mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .with_context(|| format!("work queue {name}: cannot turn on WAL"))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "work queue {name}: journal mode is {mode}, not WAL"
        );
        let synchronous = match options.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        connection
            .pragma_update(None, "synchronous", synchronous)
            .with_context(|| format!("work queue {name}"))?;
        connection
            .execute_batch(SCHEMA)
            .with_context(|| format!("work queue {name}: cannot create its tables"))?;
        connection
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .with_context(|| format!("work queue {name}"))?;
        let mut runs = path.as_os_str().to_owned();
        runs.push(".runs");
        Ok(SqliteStore {
            path: path.to_path_buf(),
            runs: PathBuf::from(runs),
            connection: Mutex::new(connection),
        })
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding it left no transaction open (rusqlite rolls
        // back on drop): the connection is fine to use.
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_path(&self, run: &str) -> PathBuf {
        self.runs.join(format!("{run}.lock"))
    }

    /// Whether `run` is dead: its lock file is gone or nobody holds it.
    fn is_dead(&self, run: &str) -> anyhow::Result<bool> {
        let file = match File::open(self.lock_path(run)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read the lock of run {run}"));
            }
        };
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(true),
            Err(fs4::TryLockError::WouldBlock) => Ok(false),
            Err(fs4::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot test the lock of run {run}"))
            }
        }
    }
}

/// A run's lock file, held while the run lives; removed when it ends.
struct RunLock {
    path: PathBuf,
    _file: File,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Store for SqliteStore {
    fn enqueue(&self, items: Vec<(String, String)>) -> anyhow::Result<u64> {
        let mut connection = self.connection();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut added = 0;
        {
            let now = now_ms();
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO items (job_id, payload, enqueued_at, updated_at)
                 VALUES (?1, ?2, ?3, ?3)",
            )?;
            for (id, payload) in &items {
                added += insert.execute(params![id, payload, now])? as u64;
            }
        }
        tx.commit()
            .with_context(|| format!("work queue {}: enqueue", self.path.display()))?;
        Ok(added)
    }

    fn register(&self, max_deliveries: u32) -> anyhow::Result<Run> {
        std::fs::create_dir_all(&self.runs)
            .with_context(|| format!("cannot create {}", self.runs.display()))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = self.lock_path(&id);
        let file = File::create(&path)
            .with_context(|| format!("cannot create the run lock {}", path.display()))?;
        fs4::FileExt::try_lock(&file)
            .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", path.display()))?;
        let lock = RunLock { path, _file: file };

        let mut connection = self.connection();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let owners: Vec<String> = tx
            .prepare("SELECT DISTINCT lease_owner FROM items WHERE state = 'leased'")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        let now = now_ms();
        let mut dead_runs = Vec::new();
        for owner in owners {
            if owner == id || !self.is_dead(&owner)? {
                continue;
            }
            // Taken by this many runs that died holding it: poison.
            let poisoned = tx.execute(
                "INSERT OR REPLACE INTO dead_letters
                     (job_id, stage, kind, error, attempts, deliveries, payload, died_at)
                 SELECT job_id, 'queue', 'max deliveries',
                        'taken by ' || deliveries || ' runs that died holding it \
                         (max_deliveries ' || ?2 || '); not run again',
                        0, deliveries, payload, ?3
                 FROM items WHERE state = 'leased' AND lease_owner = ?1 AND deliveries >= ?2",
                params![owner, max_deliveries, now],
            )?;
            tx.execute(
                "UPDATE items SET state = 'dead', lease_owner = NULL, updated_at = ?3
                 WHERE state = 'leased' AND lease_owner = ?1 AND deliveries >= ?2",
                params![owner, max_deliveries, now],
            )?;
            let released = tx.execute(
                "UPDATE items SET state = 'pending', lease_owner = NULL, updated_at = ?2
                 WHERE state = 'leased' AND lease_owner = ?1",
                params![owner, now],
            )?;
            tracing::info!(target: "bergtalzug::queue",
                queue = %self.path.display(),
                "run {owner} died: released {released} of its leases, {poisoned} items to the dead letters (max_deliveries)");
            dead_runs.push(owner);
        }
        tx.commit()
            .with_context(|| format!("work queue {}: register a run", self.path.display()))?;
        for owner in dead_runs {
            let _ = std::fs::remove_file(self.lock_path(&owner));
        }
        Ok(Run {
            id,
            _lock: Box::new(lock),
        })
    }

    fn lease(
        &self,
        run: &str,
        settle: &[Settle],
        count: usize,
        pick: Pick,
    ) -> anyhow::Result<Leased> {
        let mut connection = self.connection();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        settle_in(&tx, run, settle)?;
        let mut leased = Leased::default();
        {
            let now = now_ms();
            let (mut pick, limit, bound) = match pick {
                Pick::Clean { suspect_from } => (
                    tx.prepare_cached(
                        "SELECT seq, job_id, payload FROM items
                         WHERE state = 'pending' AND deliveries < ?2 ORDER BY seq LIMIT ?1",
                    )?,
                    count,
                    suspect_from,
                ),
                Pick::OneSuspect { suspect_from } => (
                    tx.prepare_cached(
                        "SELECT seq, job_id, payload FROM items
                         WHERE state = 'pending' AND deliveries >= ?2 ORDER BY seq LIMIT ?1",
                    )?,
                    1,
                    suspect_from,
                ),
            };
            let rows: Vec<(i64, String, String)> = pick
                .query_map(params![limit as i64, bound], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut take = tx.prepare_cached(
                "UPDATE items SET state = 'leased', lease_owner = ?2,
                        deliveries = deliveries + 1, updated_at = ?3
                 WHERE seq = ?1",
            )?;
            for (seq, id, payload) in rows {
                take.execute(params![seq, run, now])?;
                leased.items.push((id, payload));
            }
            if leased.items.is_empty() {
                leased.suspects_waiting = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM items
                         WHERE state = 'pending' AND deliveries >= ?1)",
                    )?
                    .query_row([bound], |row| row.get(0))?;
            }
        }
        tx.commit()
            .with_context(|| format!("work queue {}: lease", self.path.display()))?;
        Ok(leased)
    }

    fn settle(&self, run: &str, outcomes: &[Settle]) -> anyhow::Result<()> {
        let mut connection = self.connection();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        settle_in(&tx, run, outcomes)?;
        tx.commit()
            .with_context(|| format!("work queue {}: record outcomes", self.path.display()))?;
        Ok(())
    }

    fn counts(&self) -> anyhow::Result<QueueCounts> {
        let connection = self.connection();
        let mut counts = QueueCounts::default();
        let mut query =
            connection.prepare_cached("SELECT state, COUNT(*) FROM items GROUP BY state")?;
        let rows = query.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (state, n) = row?;
            let n = n as u64;
            match state.as_str() {
                "pending" => counts.pending = n,
                "leased" => counts.leased = n,
                "done" => counts.done = n,
                "dead" => counts.dead = n,
                other => anyhow::bail!(
                    "work queue {}: an item in the unknown state {other:?}",
                    self.path.display()
                ),
            }
        }
        Ok(counts)
    }

    fn dead_letters(&self) -> anyhow::Result<Vec<DeadItem>> {
        let connection = self.connection();
        let mut query = connection.prepare_cached(
            "SELECT job_id, stage, kind, error, attempts, deliveries, payload
             FROM dead_letters ORDER BY died_at, rowid",
        )?;
        let letters = query
            .query_map([], |row| {
                Ok(DeadItem {
                    job_id: row.get(0)?,
                    stage: row.get(1)?,
                    kind: row.get(2)?,
                    error: row.get(3)?,
                    attempts: row.get(4)?,
                    deliveries: row.get(5)?,
                    payload: row.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(letters)
    }
}

/// Records `outcomes` of items leased by `run` inside `tx`.
fn settle_in(tx: &Transaction<'_>, run: &str, outcomes: &[Settle]) -> anyhow::Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    {
        let now = now_ms();
        let mut done = tx.prepare_cached(
            "UPDATE items SET state = 'done', lease_owner = NULL, updated_at = ?3
             WHERE job_id = ?1 AND state = 'leased' AND lease_owner = ?2",
        )?;
        let mut release = tx.prepare_cached(
            "UPDATE items SET state = 'pending', lease_owner = NULL,
                    deliveries = MAX(deliveries - 1, 0), updated_at = ?3
             WHERE job_id = ?1 AND state = 'leased' AND lease_owner = ?2",
        )?;
        let mut dead = tx.prepare_cached(
            "UPDATE items SET state = 'dead', lease_owner = NULL, updated_at = ?3
             WHERE job_id = ?1 AND state = 'leased' AND lease_owner = ?2",
        )?;
        let mut letter = tx.prepare_cached(
            "INSERT OR REPLACE INTO dead_letters
                 (job_id, stage, kind, error, attempts, deliveries, payload, died_at)
             SELECT job_id, ?2, ?3, ?4, ?5, deliveries, payload, ?6
             FROM items WHERE job_id = ?1",
        )?;
        for outcome in outcomes {
            match outcome {
                Settle::Done(id) => {
                    done.execute(params![id, run, now])?;
                }
                Settle::Release(id) => {
                    release.execute(params![id, run, now])?;
                }
                Settle::Dead {
                    job_id,
                    stage,
                    kind,
                    error,
                    attempts,
                } => {
                    // Only an item this run holds: a stale run's
                    // outcome does not bury a later run's item.
                    if dead.execute(params![job_id, run, now])? == 1 {
                        letter.execute(params![job_id, stage, kind, error, attempts, now])?;
                    }
                }
            }
        }
    }
    Ok(())
}
