//! The Redis backend of [`WorkQueue`](super::WorkQueue): a stream consumed
//! by a consumer group, so that many consumers on many hosts share one job.
//!
//! Keys, for the stream `S` (inspect them with `redis-cli`):
//!
//! - `S`: the entries, fields `id` (the job id) and `p` (the payload,
//!   JSON). An entry is deleted once acknowledged (the stream holds only
//!   what is not finished).
//! - the group (`bergtalzug` unless the URL says `group=`): who holds what
//!   (its pending entries list, with each entry's idle time and delivery
//!   count).
//! - `S:ids`: every job id ever enqueued (enqueuing again is harmless).
//! - `S:done`: how many entries were acknowledged as done.
//! - `S:dead`: the dead-letter stream (`job_id, stage, kind, error,
//!   attempts, deliveries, payload, entry`).
//! - `S:sealed`: present once the producer sealed the batch job.
//! - `S:results:NAME`: a [`ResultSink`]'s results by job id, and
//!   `S:results:NAME:dups` how many writes it refused as duplicates.
//!
//! Every change of an entry's state is one Lua script (atomic on the
//! server): the acknowledgement of a batch, a dead letter with its ack, a
//! release, a renewal with its ownership check, a claim with the delivery
//! counts it read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, mpsc, oneshot};

use bergtalzug_actors::item::{ItemErrorKind, WorkItem};
use bergtalzug_actors::source::{Ack, AckFuture, Acknowledger, Refill};

use super::{DeadItem, InFlight, QueueCounts, QueueOptions};

/// The idle time a released entry is given (100 days, in ms): older than
/// any peer's `claim_idle`, so the next claim scan of any consumer takes it.
const RELEASED_IDLE_MS: u64 = 100 * 24 * 3600 * 1000;

/// The six fields of a dead letter, for an op that is not one.
const NO_FIELDS: [&str; 6] = ["", "", "", "", "", ""];

/// At most this many operations in one acknowledgement script.
const MAX_BATCH: usize = 1000;

/// Adds the entries whose job id is new. KEYS: stream, ids. ARGV: id,
/// payload pairs. Returns how many were new.
const ENQUEUE: &str = r"
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'p', ARGV[i + 1])
    added = added + 1
  end
end
return added
";

/// This consumer's own pending entries after `cursor` (a restart takes
/// back what it held), each with its delivery count (the read counts).
/// KEYS: stream. ARGV: group, consumer, cursor, count.
const OWN: &str = r"
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[4], 'STREAMS', KEYS[1], ARGV[3])
local out = {}
if r and r[1] then
  for _, e in ipairs(r[1][2]) do
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1, ARGV[2])
    local n = 1
    if p[1] then n = p[1][4] end
    out[#out + 1] = {e[1], n, e[2]}
  end
end
return {'0-0', out}
";

/// Claims up to `count` entries idle for `min_idle` ms from other
/// consumers (scanning the pending list from `cursor`), each with its
/// delivery count. Its own idle entries are left alone: they are running
/// here (renewal off, or late) or were taken back at its start, and a
/// claim would count a delivery against an item that is running (with
/// `max_deliveries` reached, dead-lettering it) and keep it from peers.
/// KEYS: stream. ARGV: group, consumer, min_idle, cursor, count. Returns
/// the next cursor (`0-0` once the scan is through) and the entries.
const CLAIM: &str = r"
local start = '-'
if ARGV[4] ~= '0-0' then start = '(' .. ARGV[4] end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], start, '+', ARGV[5])
local cursor = '0-0'
if #p >= tonumber(ARGV[5]) then cursor = p[#p][1] end
local out = {}
for _, e in ipairs(p) do
  if e[2] ~= ARGV[2] then
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], e[1])
    local got = c[1]
    if got and got[1] then
      local q = redis.call('XPENDING', KEYS[1], ARGV[1], got[1], got[1], 1, ARGV[2])
      local n = 1
      if q[1] then n = q[1][4] end
      out[#out + 1] = {got[1], n, got[2]}
    end
  end
end
return {cursor, out}
";

/// Renews the lease of the given entries that this consumer still holds
/// (a peer may have claimed some: those are left alone). KEYS: stream.
/// ARGV: group, consumer, entry ids. Returns how many were renewed.
const RENEW: &str = r"
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if p[1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
";

/// Records outcomes, 8 arguments each: op, entry, job id, stage, kind,
/// error, attempts, deliveries. Ops: `a` done (ack, count, delete), `x`
/// ack a deleted entry, `d` dead (the dead letter with its ack, only if
/// the ack took: the first outcome wins), `r` release (if still ours: idle
/// made old so any peer claims it at once, this delivery not counted).
/// KEYS: stream, dead, done. ARGV: group, consumer, released idle, ops.
/// Returns {done, dead, released}.
const SETTLE: &str = r"
local g, me = ARGV[1], ARGV[2]
local done, dead, released = 0, 0, 0
for i = 4, #ARGV, 8 do
  local op, id = ARGV[i], ARGV[i + 1]
  if op == 'a' then
    if redis.call('XACK', KEYS[1], g, id) == 1 then
      redis.call('XDEL', KEYS[1], id)
      done = done + 1
    end
  elseif op == 'x' then
    redis.call('XACK', KEYS[1], g, id)
  elseif op == 'd' then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    local payload = ''
    if e[1] and e[1][2] then
      local f = e[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'p' then payload = f[j + 1] end
      end
    end
    if redis.call('XACK', KEYS[1], g, id) == 1 then
      redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[i + 2], 'stage', ARGV[i + 3],
        'kind', ARGV[i + 4], 'error', ARGV[i + 5], 'attempts', ARGV[i + 6],
        'deliveries', ARGV[i + 7], 'payload', payload, 'entry', id)
      redis.call('XDEL', KEYS[1], id)
      dead = dead + 1
    end
  elseif op == 'r' then
    local p = redis.call('XPENDING', KEYS[1], g, id, id, 1, me)
    if p[1] then
      local n = p[1][4] - 1
      if n < 0 then n = 0 end
      redis.call('XCLAIM', KEYS[1], g, me, 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', n, 'JUSTID')
      released = released + 1
    end
  end
end
if done > 0 then redis.call('INCRBY', KEYS[3], done) end
return {done, dead, released}
";

/// Sets the delivery count of entries this consumer still holds. KEYS:
/// stream. ARGV: group, consumer, then entry id, count pairs.
const SET_COUNT: &str = r"
for i = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if p[1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
  end
end
return 0
";

/// Releases everything this consumer still holds (it is going away).
/// KEYS: stream. ARGV: group, consumer, released idle.
const RELEASE_ALL: &str = r"
local n = 0
local start = '-'
while true do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], start, '+', 500, ARGV[2])
  if #p == 0 then break end
  for _, e in ipairs(p) do
    local c = e[4] - 1
    if c < 0 then c = 0 end
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1], 'IDLE', ARGV[3], 'RETRYCOUNT', c, 'JUSTID')
    n = n + 1
  end
  start = '(' .. p[#p][1]
end
return n
";

/// Writes a result if its job id has none yet; counts refused writes.
/// KEYS: results, dups. ARGV: job id, value. Returns 1 when written.
const PUT_ONCE: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return 1 end
redis.call('INCR', KEYS[2])
return 0
";

/// The broker's counters of one process, for [`WorkQueue::broker_stats`](super::WorkQueue::broker_stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Entries taken over from consumers that let them go idle
    /// (`XPENDING … IDLE` + `XCLAIM`), and entries peers released.
    pub claimed: u64,
    /// Entries delivered more than once (taken back after a restart, or
    /// claimed).
    pub redelivered: u64,
    /// Entries written to the dead-letter stream by this process (final
    /// failures, unreadable payloads, and entries past `max_deliveries`).
    pub dead_lettered: u64,
    /// Entry leases renewed (each entry each time).
    pub lease_renewals: u64,
    /// Acknowledgement scripts run (each a batch of outcomes).
    pub ack_batches: u64,
    /// Attempts to write a batch of outcomes that failed (the batch is
    /// tried again until [`QueueOptions::ack_timeout`](super::QueueOptions::ack_timeout)).
    pub ack_errors: u64,
    /// Outcomes not written because Redis could not take them within
    /// `ack_timeout`: their entries stay pending, and run again once a
    /// consumer takes them back.
    pub acks_abandoned: u64,
    /// Reads that failed (the pipeline asks again after its backoff).
    pub read_errors: u64,
    /// Renewals that failed (tried again at the next interval).
    pub renew_errors: u64,
    /// Entries released for a peer to take at once (cancelled, not
    /// admitted, or still held when the source was dropped).
    pub released: u64,
}

#[derive(Default)]
struct Stats {
    /// The stream, the metrics' label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    stream: String,
    claimed: AtomicU64,
    redelivered: AtomicU64,
    dead_lettered: AtomicU64,
    lease_renewals: AtomicU64,
    ack_batches: AtomicU64,
    ack_errors: AtomicU64,
    acks_abandoned: AtomicU64,
    read_errors: AtomicU64,
    renew_errors: AtomicU64,
    released: AtomicU64,
}

/// Adds `n` to a counter of `stats`, and (feature `metrics`) to the
/// counter `bergtalzug_queue_NAME_total{stream}` of the `metrics` facade.
macro_rules! bump {
    ($stats:expr, $field:ident, $n:expr) => {{
        let stats: &Stats = $stats;
        let n: u64 = $n;
        stats.$field.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(
            concat!("bergtalzug_queue_", stringify!($field), "_total"),
            "stream" => stats.stream.clone()
        )
        .increment(n);
    }};
}

/// The keys of one job.
#[derive(Debug)]
struct Keys {
    stream: String,
    group: String,
    ids: String,
    done: String,
    dead: String,
    seal: String,
}

/// A queue on Redis: its client, keys, options and counters, shared by the
/// handles and sources of one [`WorkQueue`](super::WorkQueue).
#[derive(Clone)]
pub(crate) struct Broker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    client: redis::Client,
    keys: Keys,
    options: QueueOptions,
    /// The connection for everything but blocking reads (enqueue, acks,
    /// renewals, claims, counts): multiplexed, reconnecting.
    conn: OnceCell<ConnectionManager>,
    group_ready: AtomicBool,
    stats: Stats,
    scripts: Scripts,
}

struct Scripts {
    enqueue: Script,
    own: Script,
    claim: Script,
    renew: Script,
    settle: Script,
    release_all: Script,
    put_once: Script,
    set_count: Script,
}

/// One entry as delivered: its id, delivery count and fields (`None`: the
/// entry was deleted from the stream).
struct Delivered {
    entry: String,
    deliveries: u32,
    fields: Option<HashMap<String, String>>,
}

impl Broker {
    /// Parses `redis://...?stream=NAME[&group=GROUP]` and checks the
    /// options; connects at the first operation.
    pub(crate) fn open(url: &str, options: &QueueOptions) -> anyhow::Result<Self> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut stream = None;
        let mut group = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("stream", v)) => stream = Some(v.to_string()),
                Some(("group", v)) => group = Some(v.to_string()),
                _ => rest.push(pair),
            }
        }
        let stream = stream.filter(|s| !s.is_empty()).with_context(|| {
            format!("work queue URL {url:?}: no stream: add ?stream=NAME (the job's stream)")
        })?;
        let group = group.unwrap_or_else(|| "bergtalzug".to_string());
        anyhow::ensure!(!group.is_empty(), "work queue URL {url:?}: group= is empty");
        check_options(options)?;
        let client_url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let client = redis::Client::open(client_url.as_str())
            .with_context(|| format!("work queue URL {url:?} is not a Redis URL"))?;
        let keys = Keys {
            ids: format!("{stream}:ids"),
            done: format!("{stream}:done"),
            dead: format!("{stream}:dead"),
            seal: format!("{stream}:sealed"),
            stream,
            group,
        };
        let stream = keys.stream.clone();
        Ok(Broker {
            inner: Arc::new(BrokerInner {
                client,
                keys,
                options: options.clone(),
                conn: OnceCell::new(),
                group_ready: AtomicBool::new(false),
                stats: Stats {
                    stream,
                    ..Stats::default()
                },
                scripts: Scripts {
                    enqueue: Script::new(ENQUEUE),
                    own: Script::new(OWN),
                    claim: Script::new(CLAIM),
                    renew: Script::new(RENEW),
                    settle: Script::new(SETTLE),
                    release_all: Script::new(RELEASE_ALL),
                    put_once: Script::new(PUT_ONCE),
                    set_count: Script::new(SET_COUNT),
                },
            }),
        })
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// A connection manager with this response timeout.
    async fn connect(&self, response_timeout: Duration) -> anyhow::Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(self.inner.client.clone(), config)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to Redis for the stream {}",
                    self.keys().stream
                )
            })
    }

    /// The shared connection (made at the first call; it reconnects by
    /// itself), with the consumer group made if need be.
    async fn conn(&self) -> anyhow::Result<ConnectionManager> {
        let mut conn = self
            .inner
            .conn
            .get_or_try_init(|| self.connect(Duration::from_secs(10)))
            .await?
            .clone();
        if !self.inner.group_ready.load(Ordering::Acquire) {
            let made: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&self.keys().stream)
                .arg(&self.keys().group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match made {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot make the consumer group of {}", self.keys().stream)
                    });
                }
            }
            self.inner.group_ready.store(true, Ordering::Release);
        }
        Ok(conn)
    }

    /// Notes an error: a missing group (the server lost its data) is made
    /// again at the next call.
    fn noted<E>(&self, e: E) -> anyhow::Error
    where
        E: Into<anyhow::Error>,
    {
        let e = e.into();
        let lost_group = e
            .chain()
            .filter_map(|c| c.downcast_ref::<redis::RedisError>())
            .any(|r| r.code() == Some("NOGROUP"));
        if lost_group {
            self.inner.group_ready.store(false, Ordering::Release);
        }
        e
    }

    pub(crate) async fn enqueue(&self, rows: Vec<(String, String)>) -> anyhow::Result<u64> {
        let mut conn = self.conn().await?;
        let mut added = 0;
        for chunk in rows.chunks(MAX_BATCH) {
            let mut call = self.inner.scripts.enqueue.key(&self.keys().stream);
            call.key(&self.keys().ids);
            for (id, payload) in chunk {
                call.arg(id).arg(payload);
            }
            let n: u64 = call
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.noted(e))
                .with_context(|| format!("enqueuing to {}", self.keys().stream))?;
            added += n;
        }
        Ok(added)
    }

    pub(crate) async fn seal(&self) -> anyhow::Result<()> {
        let mut conn = self.conn().await?;
        let () = redis::cmd("SET")
            .arg(&self.keys().seal)
            .arg(1)
            .query_async(&mut conn)
            .await
            .with_context(|| format!("sealing {}", self.keys().stream))?;
        Ok(())
    }

    pub(crate) async fn counts(&self) -> anyhow::Result<QueueCounts> {
        let mut conn = self.conn().await?;
        let keys = self.keys();
        let (ids, done, dead, pending): (u64, Option<u64>, u64, Value) = redis::pipe()
            .cmd("SCARD")
            .arg(&keys.ids)
            .cmd("GET")
            .arg(&keys.done)
            .cmd("XLEN")
            .arg(&keys.dead)
            .cmd("XPENDING")
            .arg(&keys.stream)
            .arg(&keys.group)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.noted(e))
            .with_context(|| format!("counting {}", keys.stream))?;
        let leased = match pending {
            Value::Array(parts) => parts.first().and_then(int).unwrap_or(0) as u64,
            _ => 0,
        };
        let done = done.unwrap_or(0);
        Ok(QueueCounts {
            pending: ids.saturating_sub(done + dead + leased),
            leased,
            done,
            dead,
        })
    }

    pub(crate) async fn dead_letters(&self) -> anyhow::Result<Vec<DeadItem>> {
        let mut conn = self.conn().await?;
        let entries: Value = redis::cmd("XRANGE")
            .arg(&self.keys().dead)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .with_context(|| format!("reading the dead letters of {}", self.keys().stream))?;
        let mut out = Vec::new();
        for entry in array(&entries) {
            let parts = array(entry);
            let fields = parts.get(1).map(field_map).unwrap_or_default();
            let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
            out.push(DeadItem {
                job_id: get("job_id"),
                stage: get("stage"),
                kind: get("kind"),
                error: get("error"),
                attempts: get("attempts").parse().unwrap_or(0),
                deliveries: get("deliveries").parse().unwrap_or(0),
                payload: get("payload"),
            });
        }
        Ok(out)
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BrokerStats {
            claimed: get(&s.claimed),
            redelivered: get(&s.redelivered),
            dead_lettered: get(&s.dead_lettered),
            lease_renewals: get(&s.lease_renewals),
            ack_batches: get(&s.ack_batches),
            ack_errors: get(&s.ack_errors),
            acks_abandoned: get(&s.acks_abandoned),
            read_errors: get(&s.read_errors),
            renew_errors: get(&s.renew_errors),
            released: get(&s.released),
        }
    }

    pub(crate) fn result_sink(&self, name: &str) -> ResultSink {
        let key = format!("{}:results:{name}", self.keys().stream);
        ResultSink {
            broker: self.clone(),
            dups: format!("{key}:dups"),
            key,
        }
    }

    pub(crate) fn source<T>(&self) -> RedisSource<T> {
        let name = self.inner.options.consumer.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "host".to_string());
            format!(
                "{host}-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        let (tx, rx) = mpsc::unbounded_channel();
        RedisSource {
            shared: Arc::new(Shared {
                broker: self.clone(),
                name,
                in_flight: InFlight::default(),
                ledger: Arc::new(Mutex::new(Ledger::default())),
                tx,
                joined: AtomicBool::new(false),
            }),
            acks: Some(rx),
            read: None,
            history: Some("0-0".to_string()),
            claim_cursor: "0-0".to_string(),
            next_claim: Instant::now(),
            suspects: VecDeque::new(),
            _item: PhantomData,
        }
    }

    /// Runs [`SETTLE`] on `ops`; returns (done, dead, released).
    async fn settle(&self, name: &str, ops: &[Op]) -> anyhow::Result<(u64, u64, u64)> {
        let mut conn = self.conn().await?;
        let keys = self.keys();
        let mut call = self.inner.scripts.settle.key(&keys.stream);
        call.key(&keys.dead)
            .key(&keys.done)
            .arg(&keys.group)
            .arg(name)
            .arg(RELEASED_IDLE_MS);
        for op in ops {
            match op {
                Op::Done(entry) => call.arg("a").arg(entry).arg(&NO_FIELDS[..]),
                Op::Gone(entry) => call.arg("x").arg(entry).arg(&NO_FIELDS[..]),
                Op::Release(entry) => call.arg("r").arg(entry).arg(&NO_FIELDS[..]),
                Op::Dead(d) => call
                    .arg("d")
                    .arg(&d.entry)
                    .arg(&d.job_id)
                    .arg(&d.stage)
                    .arg(&d.kind)
                    .arg(&d.error)
                    .arg(d.attempts)
                    .arg(d.deliveries),
            };
        }
        let (done, dead, released): (u64, u64, u64) = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.noted(e))
            .with_context(|| format!("acknowledging {} outcomes on {}", ops.len(), keys.stream))?;
        Ok((done, dead, released))
    }

    /// Runs [`OWN`] or [`CLAIM`]; returns the next cursor and the entries.
    async fn deliver(
        &self,
        script: &Script,
        name: &str,
        args: &[String],
    ) -> anyhow::Result<(String, Vec<Delivered>)> {
        let mut conn = self.conn().await?;
        let keys = self.keys();
        let mut call = script.key(&keys.stream);
        call.arg(&keys.group).arg(name);
        for a in args {
            call.arg(a);
        }
        let reply: Value = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.noted(e))
            .with_context(|| format!("taking entries of {}", keys.stream))?;
        let parts = array(&reply);
        let cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let entries = parts
            .get(1)
            .map(|list| {
                array(list)
                    .iter()
                    .filter_map(|e| {
                        let e = array(e);
                        Some(Delivered {
                            entry: e.first().and_then(text)?,
                            deliveries: e.get(1).and_then(int).unwrap_or(1).max(1) as u32,
                            fields: e.get(2).and_then(|f| match f {
                                Value::Nil => None,
                                f => Some(field_map(f)),
                            }),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((cursor, entries))
    }

    /// New entries for `name`, at most `count`, waiting up to `block`.
    async fn read_new(
        &self,
        conn: &mut ConnectionManager,
        name: &str,
        count: usize,
        block: Option<Duration>,
    ) -> anyhow::Result<Vec<Delivered>> {
        let keys = self.keys();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&keys.group)
            .arg(name)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&keys.stream).arg(">");
        let reply: Value = cmd
            .query_async(conn)
            .await
            .map_err(|e| self.noted(e))
            .with_context(|| format!("reading new entries of {}", keys.stream))?;
        let mut out = Vec::new();
        for stream in array(&reply) {
            let stream = array(stream);
            for e in stream.get(1).map(array).unwrap_or(&[]) {
                let e = array(e);
                if let Some(entry) = e.first().and_then(text) {
                    out.push(Delivered {
                        entry,
                        deliveries: 1,
                        fields: e.get(1).map(field_map),
                    });
                }
            }
        }
        Ok(out)
    }

    /// How many entries the group's consumers hold, all of them.
    async fn held_by_anyone(&self) -> anyhow::Result<u64> {
        let mut conn = self.conn().await?;
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.keys().stream)
            .arg(&self.keys().group)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.noted(e))?;
        Ok(array(&reply).first().and_then(int).unwrap_or(0) as u64)
    }

    async fn sealed(&self) -> anyhow::Result<bool> {
        let mut conn = self.conn().await?;
        let n: u64 = redis::cmd("EXISTS")
            .arg(&self.keys().seal)
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    /// Renews the leases of `entries` that `name` still holds.
    async fn renew(&self, name: &str, entries: &[String]) -> anyhow::Result<u64> {
        let mut conn = self.conn().await?;
        let mut renewed = 0;
        for chunk in entries.chunks(500) {
            let mut call = self.inner.scripts.renew.key(&self.keys().stream);
            call.arg(&self.keys().group).arg(name);
            for e in chunk {
                call.arg(e);
            }
            let n: u64 = call
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.noted(e))?;
            renewed += n;
        }
        Ok(renewed)
    }

    /// Sets the delivery counts of (entry, count) pairs `name` still holds.
    async fn set_counts(&self, name: &str, counts: &[(String, u32)]) -> anyhow::Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut call = self.inner.scripts.set_count.key(&self.keys().stream);
        call.arg(&self.keys().group).arg(name);
        for (entry, n) in counts {
            call.arg(entry).arg(*n);
        }
        let _: i64 = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.noted(e))
            .with_context(|| format!("setting delivery counts on {}", self.keys().stream))?;
        Ok(())
    }

    /// Releases all that `name` holds, synchronously (from a `Drop`), on a
    /// connection of its own with short timeouts.
    fn release_all_blocking(&self, name: &str) -> anyhow::Result<u64> {
        let mut conn = self
            .inner
            .client
            .get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        let n: u64 = self
            .inner
            .scripts
            .release_all
            .key(&self.keys().stream)
            .arg(&self.keys().group)
            .arg(name)
            .arg(RELEASED_IDLE_MS)
            .invoke(&mut conn)?;
        Ok(n)
    }
}

fn check_options(o: &QueueOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        !o.claim_idle.is_zero(),
        "queue option claim_idle must be above zero"
    );
    anyhow::ensure!(
        !o.claim_every.is_zero(),
        "queue option claim_every must be above zero"
    );
    anyhow::ensure!(
        o.renew_every.is_zero() || o.renew_every < o.claim_idle,
        "queue option renew_every ({:?}) must be shorter than claim_idle ({:?}), \
         or a live consumer's entries are taken by its peers (a third of it is the rule)",
        o.renew_every,
        o.claim_idle
    );
    anyhow::ensure!(
        !o.read_block.is_zero(),
        "queue option read_block must be above zero"
    );
    anyhow::ensure!(
        !o.ack_timeout.is_zero(),
        "queue option ack_timeout must be above zero (it bounds how long outcomes are retried)"
    );
    if let Some(name) = &o.consumer {
        anyhow::ensure!(!name.is_empty(), "queue option consumer is empty");
    }
    Ok(())
}

fn array(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(_) | Value::SimpleString(_) => text(v)?.parse().ok(),
        _ => None,
    }
}

/// A flat `[field, value, ...]` array (or a map) as a map.
fn field_map(v: &Value) -> HashMap<String, String> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        v => array(v)
            .chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
            .collect(),
    }
}

/// A result sink keyed by job id: each job id's first result is kept;
/// later writes of the same id (an item run again after a crash or a
/// claim) are refused and counted. From
/// [`WorkQueue::result_sink`](super::WorkQueue::result_sink).
///
/// ```no_run
/// # async fn demo(queue: bergtalzug::queue::WorkQueue) -> anyhow::Result<()> {
/// let sink = queue.result_sink("totals")?;
/// if !sink.put("order-17", &42u64).await? {
///     // a duplicate: this job id's result was written before
/// }
/// assert_eq!(sink.get::<u64>("order-17").await?, Some(42));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ResultSink {
    broker: Broker,
    key: String,
    dups: String,
}

impl std::fmt::Debug for ResultSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultSink")
            .field("key", &self.key)
            .finish()
    }
}

impl ResultSink {
    /// Writes `value` (as JSON) for `job_id` unless it has a result
    /// already; returns whether this write was the first. Atomic on the
    /// server: two consumers writing the same id at once keep one.
    ///
    /// # Errors
    ///
    /// `value` does not serialise, or Redis fails (then nothing was
    /// written: a retry is safe).
    pub async fn put(&self, job_id: &str, value: &impl Serialize) -> anyhow::Result<bool> {
        let json = serde_json::to_string(value)
            .with_context(|| format!("cannot serialise the result of {job_id}"))?;
        let mut conn = self.broker.conn().await?;
        let first: u64 = self
            .broker
            .inner
            .scripts
            .put_once
            .key(&self.key)
            .key(&self.dups)
            .arg(job_id)
            .arg(json)
            .invoke_async(&mut conn)
            .await
            .with_context(|| format!("writing the result of {job_id} to {}", self.key))?;
        Ok(first == 1)
    }

    /// The result of `job_id`, if written.
    ///
    /// # Errors
    ///
    /// Redis fails, or the stored JSON does not fit `V`.
    pub async fn get<V: DeserializeOwned>(&self, job_id: &str) -> anyhow::Result<Option<V>> {
        let mut conn = self.broker.conn().await?;
        let json: Option<String> = redis::cmd("HGET")
            .arg(&self.key)
            .arg(job_id)
            .query_async(&mut conn)
            .await?;
        json.map(|j| {
            serde_json::from_str(&j)
                .with_context(|| format!("the result of {job_id} in {}", self.key))
        })
        .transpose()
    }

    /// How many job ids have a result.
    ///
    /// # Errors
    ///
    /// Redis fails.
    pub async fn len(&self) -> anyhow::Result<u64> {
        let mut conn = self.broker.conn().await?;
        Ok(redis::cmd("HLEN")
            .arg(&self.key)
            .query_async(&mut conn)
            .await?)
    }

    /// Whether no job id has a result.
    ///
    /// # Errors
    ///
    /// Redis fails.
    pub async fn is_empty(&self) -> anyhow::Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// How many writes were refused because their job id had a result.
    ///
    /// # Errors
    ///
    /// Redis fails.
    pub async fn duplicates(&self) -> anyhow::Result<u64> {
        let mut conn = self.broker.conn().await?;
        let n: Option<u64> = redis::cmd("GET")
            .arg(&self.dups)
            .query_async(&mut conn)
            .await?;
        Ok(n.unwrap_or(0))
    }
}

/// An outcome to write.
#[derive(Debug)]
enum Op {
    Done(String),
    Gone(String),
    Release(String),
    Dead(DeadOp),
}

#[derive(Debug)]
struct DeadOp {
    entry: String,
    job_id: String,
    stage: String,
    kind: String,
    error: String,
    attempts: u32,
    deliveries: u32,
}

impl Op {
    fn entry(&self) -> &str {
        match self {
            Op::Done(e) | Op::Gone(e) | Op::Release(e) => e,
            Op::Dead(d) => &d.entry,
        }
    }
}

/// Outcomes for the acknowledger task; `done` is told once they are
/// written.
struct Batch {
    ops: Vec<Op>,
    done: Option<oneshot::Sender<()>>,
}

/// What this consumer holds: the entry of each job id it handed out, and
/// the entries whose outcome is not written yet. Both are renewed.
#[derive(Default)]
struct Ledger {
    by_job: HashMap<String, Holding>,
    unwritten: HashSet<String>,
}

struct Holding {
    entry: String,
    deliveries: u32,
    /// How many copies were handed out (a claimed entry that this
    /// consumer holds already is refused by the pipeline as a duplicate).
    copies: usize,
}

impl Ledger {
    fn hold(&mut self, job_id: &str, entry: &str, deliveries: u32) {
        match self.by_job.get_mut(job_id) {
            Some(h) if h.entry == entry => h.copies += 1,
            _ => {
                self.by_job.insert(
                    job_id.to_string(),
                    Holding {
                        entry: entry.to_string(),
                        deliveries,
                        copies: 1,
                    },
                );
            }
        }
    }

    /// The holding of a finished job id, gone from the ledger.
    fn finish(&mut self, job_id: &str) -> Option<Holding> {
        let h = self.by_job.remove(job_id)?;
        self.unwritten.insert(h.entry.clone());
        Some(h)
    }

    /// One copy given back; the holding when it was the last.
    fn give_back(&mut self, job_id: &str) -> Option<Holding> {
        let h = self.by_job.get_mut(job_id)?;
        if h.copies > 1 {
            h.copies -= 1;
            return None;
        }
        self.finish(job_id)
    }

    fn entries(&self) -> Vec<String> {
        self.by_job
            .values()
            .map(|h| h.entry.clone())
            .chain(self.unwritten.iter().cloned())
            .collect()
    }
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a consumer's source, acknowledger and keeper share.
struct Shared {
    broker: Broker,
    name: String,
    in_flight: InFlight,
    ledger: Arc<Mutex<Ledger>>,
    tx: mpsc::UnboundedSender<Batch>,
    /// Whether this consumer has read (so has something to release).
    joined: AtomicBool,
}

impl Shared {
    /// Sends `ops` to be written; with `wait`, returns once they are.
    async fn write(&self, ops: Vec<Op>, wait: bool) {
        if ops.is_empty() && !wait {
            return;
        }
        let (done, written) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if self.tx.send(Batch { ops, done }).is_err() {
            tracing::error!(target: "bergtalzug::queue",
                "the acknowledgement task of {} is gone; outcomes not written run again", self.name);
            return;
        }
        if let Some(written) = written {
            let _ = written.await;
        }
    }
}

impl Drop for Shared {
    /// Releases whatever this consumer still holds in Redis (entries of a
    /// read that was dropped, suspects never handed out), so that a peer
    /// takes them at its next claim scan rather than after `claim_idle`.
    fn drop(&mut self) {
        if !self.joined.load(Ordering::Acquire) {
            return;
        }
        match self.broker.release_all_blocking(&self.name) {
            Ok(n) => bump!(&self.broker.inner.stats, released, n),
            Err(e) => tracing::warn!(target: "bergtalzug::queue",
                "consumer {} could not release what it holds on leaving: {e:#}; \
                 peers take it after claim_idle", self.name),
        }
    }
}

/// The consumer side on Redis (see docs/scale-out.md).
pub(crate) struct RedisSource<T> {
    shared: Arc<Shared>,
    /// The acknowledgements' receiver, until the first fetch starts the
    /// task that writes them.
    acks: Option<mpsc::UnboundedReceiver<Batch>>,
    /// The connection for blocking reads, of its own.
    read: Option<ConnectionManager>,
    /// Where the reading of this consumer's own pending entries is; `None`
    /// once they are all taken back.
    history: Option<String>,
    claim_cursor: String,
    next_claim: Instant,
    /// Entries at their last allowed delivery: handed out one at a time,
    /// when nothing else is in flight.
    suspects: VecDeque<WorkItem<T>>,
    _item: PhantomData<fn() -> T>,
}

impl<T> RedisSource<T> {
    pub(crate) fn consumer_name(&self) -> &str {
        &self.shared.name
    }

    fn options(&self) -> &QueueOptions {
        &self.shared.broker.inner.options
    }

    /// Starts the acknowledgement and renewal tasks (at the first fetch,
    /// inside the runtime).
    fn start(&mut self) {
        let Some(rx) = self.acks.take() else {
            return;
        };
        self.shared.joined.store(true, Ordering::Release);
        tokio::spawn(write_acks(
            self.shared.broker.clone(),
            self.shared.name.clone(),
            self.shared.ledger.clone(),
            rx,
        ));
        let every = self.options().renew_every;
        if !every.is_zero() {
            tokio::spawn(renew_leases(Arc::downgrade(&self.shared), every));
        }
    }

    pub(crate) fn acknowledger(&mut self) -> Box<dyn Acknowledger> {
        Box::new(RedisAcknowledger {
            shared: self.shared.clone(),
        })
    }
}

impl<T: DeserializeOwned + Send + 'static> RedisSource<T> {
    /// Up to `count` items: own pending entries first (after a restart),
    /// then idle ones claimed from peers (every `claim_every`), then new
    /// ones; suspects alone. See [`super::QueueSource::fetch`].
    pub(crate) async fn fetch(&mut self, count: usize) -> anyhow::Result<Refill<T>> {
        let answer = self.try_fetch(count.max(1)).await;
        if answer.is_err() {
            bump!(&self.shared.broker.inner.stats, read_errors, 1);
        }
        answer
    }

    /// One step at a time, returning as soon as a step found items: an
    /// error in a later step then cannot strand what an earlier one took.
    async fn try_fetch(&mut self, count: usize) -> anyhow::Result<Refill<T>> {
        self.start();
        let broker = self.shared.broker.clone();
        let stats = &broker.inner.stats;
        let name = self.shared.name.clone();
        let mut out = Vec::new();
        if let Some(cursor) = self.history.clone() {
            let (_, got) = broker
                .deliver(
                    &broker.inner.scripts.own,
                    &name,
                    &[cursor, count.to_string()],
                )
                .await?;
            self.history = got.last().map(|d| d.entry.clone());
            self.absorb(got, &mut out).await;
        }
        if out.is_empty() && self.suspects.len() < count && Instant::now() >= self.next_claim {
            let idle = self.options().claim_idle.as_millis().to_string();
            let (next, got) = broker
                .deliver(
                    &broker.inner.scripts.claim,
                    &name,
                    &[idle, self.claim_cursor.clone(), count.to_string()],
                )
                .await?;
            bump!(stats, claimed, got.len() as u64);
            if next == "0-0" {
                self.next_claim = Instant::now() + self.options().claim_every;
            }
            self.claim_cursor = next;
            self.absorb(got, &mut out).await;
        }
        let mut sealed = false;
        if out.is_empty() {
            let follow = self.options().follow;
            if !follow {
                // Before the read: an entry enqueued before the seal is then
                // seen by the read.
                sealed = broker.sealed().await?;
            }
            let block = (self.suspects.is_empty() && (follow || !sealed))
                .then_some(self.options().read_block);
            broker.conn().await?; // the group exists
            let read = match &mut self.read {
                Some(conn) => conn,
                None => {
                    let timeout = self.options().read_block + Duration::from_secs(10);
                    self.read.insert(broker.connect(timeout).await?)
                }
            };
            let got = broker.read_new(read, &name, count, block).await?;
            self.absorb(got, &mut out).await;
        }
        if !out.is_empty() {
            self.shared.in_flight.add(out.len());
            return Ok(Refill::Items(out));
        }
        if !self.suspects.is_empty() {
            self.shared.in_flight.drained().await;
            if let Some(suspect) = self.suspects.pop_front() {
                // Its delivery counts again now that it runs.
                let counted = lock(&self.shared.ledger)
                    .by_job
                    .get(&suspect.job_id().to_string())
                    .map(|h| (h.entry.clone(), h.deliveries));
                if let Some(counted) = counted
                    && let Err(e) = broker.set_counts(&name, &[counted]).await
                {
                    tracing::warn!(target: "bergtalzug::queue",
                        "consumer {name}: counting a suspect's delivery failed: {e:#}");
                }
                self.shared.in_flight.add(1);
                return Ok(Refill::Items(vec![suspect]));
            }
        }
        if sealed && broker.held_by_anyone().await? == 0 {
            return Ok(Refill::Exhausted);
        }
        Ok(Refill::NothingYet)
    }

    /// Sorts what a step delivered into `out` (and suspects, and dead
    /// letters sent to be written); nothing here fails.
    async fn absorb(&mut self, got: Vec<Delivered>, out: &mut Vec<WorkItem<T>>) {
        let mut dead = Vec::new();
        let mut uncounted = Vec::new();
        self.take(got, out, &mut dead, &mut uncounted);
        self.shared.write(dead, false).await;
        if let Err(e) = self
            .shared
            .broker
            .set_counts(&self.shared.name, &uncounted)
            .await
        {
            tracing::warn!(target: "bergtalzug::queue",
                "consumer {}: not counting waiting suspects failed: {e:#}", self.shared.name);
        }
    }

    /// Sorts delivered entries: items to hand out, suspects to run alone,
    /// and dead letters (past `max_deliveries`, or unreadable).
    ///
    /// A suspect's delivery is not counted while it waits here (its count
    /// is set back by one, in `uncounted`): other suspects read with it
    /// must not lose their last chance to the one that kills the process.
    /// It is counted again when it is handed out.
    fn take(
        &mut self,
        got: Vec<Delivered>,
        out: &mut Vec<WorkItem<T>>,
        dead: &mut Vec<Op>,
        uncounted: &mut Vec<(String, u32)>,
    ) {
        let max = self.options().max_deliveries;
        let stats = &self.shared.broker.inner.stats;
        let mut ledger = lock(&self.shared.ledger);
        for d in got {
            if d.deliveries > 1 {
                bump!(stats, redelivered, 1);
            }
            let Some(fields) = d.fields else {
                ledger.unwritten.insert(d.entry.clone());
                dead.push(Op::Gone(d.entry));
                continue;
            };
            let job_id = fields.get("id").cloned().unwrap_or_else(|| d.entry.clone());
            let unfit = |kind: &str, error: String| {
                Op::Dead(DeadOp {
                    entry: d.entry.clone(),
                    job_id: job_id.clone(),
                    stage: "queue".into(),
                    kind: kind.into(),
                    error,
                    attempts: 0,
                    deliveries: d.deliveries.saturating_sub(1),
                })
            };
            if d.deliveries > max {
                ledger.unwritten.insert(d.entry.clone());
                dead.push(unfit(
                    "max deliveries",
                    format!(
                        "delivered {} times, more than max_deliveries ({max}): \
                         the consumers it was given to died with it",
                        d.deliveries
                    ),
                ));
                continue;
            }
            let parsed = fields
                .get("p")
                .context("the entry has no payload field p")
                .and_then(|p| {
                    serde_json::from_str::<T>(p)
                        .context("the payload does not deserialise as the item type")
                });
            let data = match parsed {
                Ok(data) => data,
                Err(e) => {
                    ledger.unwritten.insert(d.entry.clone());
                    dead.push(unfit("unreadable payload", format!("{e:#}")));
                    continue;
                }
            };
            ledger.hold(&job_id, &d.entry, d.deliveries);
            let item = WorkItem::with_job_id(job_id, data);
            if max >= 2 && d.deliveries == max {
                uncounted.push((d.entry.clone(), max - 1));
                self.suspects.push_back(item);
            } else {
                out.push(item);
            }
        }
    }

    /// Gives back items that were not admitted: released at once (a
    /// refused duplicate of an item still running keeps its entry).
    pub(crate) async fn release(&mut self, unadmitted: Vec<WorkItem<T>>) {
        let n = unadmitted.len();
        let ops: Vec<_> = {
            let mut ledger = lock(&self.shared.ledger);
            unadmitted
                .iter()
                .filter_map(|i| ledger.give_back(&i.job_id().to_string()))
                .map(|h| Op::Release(h.entry))
                .collect()
        };
        self.shared.write(ops, true).await;
        if self.shared.in_flight.remove(n) == 0 {
            self.shared.in_flight.drained.notify_waiters();
        }
    }
}

/// Writes acknowledgements in batches, on the shared connection (never
/// behind a blocking read), retrying a failed batch until it is written or
/// `ack_timeout` has passed since its first failure (then its entries stay
/// pending in Redis, for a consumer to take back and run again).
async fn write_acks(
    broker: Broker,
    name: String,
    ledger: Arc<Mutex<Ledger>>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
) {
    let stats = &broker.inner.stats;
    let give_up_after = broker.inner.options.ack_timeout;
    while let Some(first) = rx.recv().await {
        let mut ops = first.ops;
        let mut waiting = vec![first.done];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(batch) => {
                    ops.extend(batch.ops);
                    waiting.push(batch.done);
                }
                Err(_) => break,
            }
        }
        if !ops.is_empty() {
            let mut backoff = Duration::from_millis(50);
            let mut failing_since = None;
            loop {
                match broker.settle(&name, &ops).await {
                    Ok((_, dead, released)) => {
                        bump!(stats, dead_lettered, dead);
                        bump!(stats, released, released);
                        bump!(stats, ack_batches, 1);
                        break;
                    }
                    Err(e) => {
                        bump!(stats, ack_errors, 1);
                        let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= give_up_after {
                            bump!(stats, acks_abandoned, ops.len() as u64);
                            tracing::error!(target: "bergtalzug::queue",
                                "consumer {name}: could not write {} outcomes for {give_up_after:?} \
                                 (ack_timeout): {e:#}; given up: their entries stay pending in Redis \
                                 and run again once a consumer takes them back (after claim_idle)",
                                ops.len());
                            break;
                        }
                        tracing::warn!(target: "bergtalzug::queue",
                            "consumer {name}: writing {} outcomes failed: {e:#}; retrying in {backoff:?}",
                            ops.len());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let mut ledger = lock(&ledger);
            for op in &ops {
                ledger.unwritten.remove(op.entry());
            }
        }
        for done in waiting.into_iter().flatten() {
            let _ = done.send(());
        }
    }
}

/// Renews, every `every`, the lease of each entry this consumer holds
/// (handed out, suspect, or finished and not yet written), if it still
/// holds it. Ends with the consumer.
async fn renew_leases(shared: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let entries = lock(&shared.ledger).entries();
        if entries.is_empty() {
            continue;
        }
        let stats = &shared.broker.inner.stats;
        match shared.broker.renew(&shared.name, &entries).await {
            Ok(n) => bump!(stats, lease_renewals, n),
            Err(e) => {
                bump!(stats, renew_errors, 1);
                tracing::warn!(target: "bergtalzug::queue",
                    "consumer {}: renewing {} leases failed: {e:#}", shared.name, entries.len());
            }
        }
    }
}

/// Takes a consumer's outcomes to the acknowledgement task; the last one
/// of a busy spell waits until everything is written (so a run does not
/// end with outcomes unwritten).
struct RedisAcknowledger {
    shared: Arc<Shared>,
}

impl Acknowledger for RedisAcknowledger {
    fn ack(&mut self, outcomes: Vec<Ack>) -> AckFuture<'_> {
        Box::pin(async move {
            let n = outcomes.len();
            let ops: Vec<_> = {
                let mut ledger = lock(&self.shared.ledger);
                outcomes
                    .into_iter()
                    .filter_map(|ack| {
                        // An injected item has no entry.
                        let holding = ledger.finish(&ack.job_id.to_string())?;
                        Some(match ack.error {
                            None => Op::Done(holding.entry),
                            Some(e) if e.kind == ItemErrorKind::Cancelled => {
                                Op::Release(holding.entry)
                            }
                            Some(e) => Op::Dead(DeadOp {
                                entry: holding.entry,
                                job_id: ack.job_id.to_string(),
                                stage: e.stage,
                                kind: e.kind.to_string(),
                                error: e.message,
                                attempts: e.attempts,
                                deliveries: holding.deliveries,
                            }),
                        })
                    })
                    .collect()
            };
            let idle = self.shared.in_flight.remove(n) == 0;
            self.shared.write(ops, idle).await;
            if idle {
                self.shared.in_flight.drained.notify_waiters();
            }
        })
    }
}
