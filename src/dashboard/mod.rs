//! A live dashboard in the browser (feature `dashboard`): the stages of
//! running pipelines, their queues, rates, latencies, failures and stalls,
//! charted over the last minutes and updated every second.
//!
//! ```no_run
//! use bergtalzug::dashboard::Dashboard;
//! use bergtalzug::prelude::*;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PipelineConfig::new("squares", vec![StageConfig::new("square", ExecutionType::Async)]);
//! let pipeline = Pipeline::builder(config)?
//!     .source(sources::iter(0..1_000_000u64))
//!     .async_stage("square", |item: WorkItem<u64>| async move { Ok(item.map(|n| n * n)) })
//!     .build()?;
//! let dashboard = Dashboard::serve("127.0.0.1:9000").await?;   // loopback: this machine only
//! dashboard.watch(&pipeline);                                    // as many as you like
//! eprintln!("dashboard at {}", dashboard.url());
//! pipeline.run().await?;
//! # Ok(()) }
//! ```
//!
//! # What it serves
//!
//! One page (`/`, its script and style embedded in the binary: no CDN, no
//! build step, works offline) and a JSON API for other tools:
//! `/api/stats` (every watched pipeline as of its last sample),
//! `/api/history` (the same with the charts' samples) and `/api/events`
//! (server-sent events: `hello`, as `/api/history`, then a `tick` with the
//! new samples after each one). `docs/dashboard.md` describes the fields.
//!
//! # Security
//!
//! - It binds where it is told: `127.0.0.1` (loopback) is reachable from
//!   this machine only, and then requests must name a loopback `Host`
//!   (no DNS rebinding). Bind `0.0.0.0` only on a network you trust: the
//!   page shows job ids and error messages.
//! - Read-only by default. [`DashboardBuilder::controls`] turns on `stop`
//!   and `abort` (`POST /api/pipelines/{id}/stop|abort`), each behind the
//!   token given, sent as `Authorization: Bearer <token>`; the page reads
//!   it from its address's fragment (`/#token=...`, never sent to the
//!   server in the address).
//!
//! # Cost
//!
//! Nothing a pipeline waits for: the dashboard reads `stats()` once per
//! [`DashboardBuilder::sample_every`] (1 s by default) per pipeline, and
//! while someone watches it also holds a lossy
//! `subscribe_filtered(EventFilter::failures())` subscription (kept
//! [`EVENTS_LINGER`] after the last viewer left), which drops its oldest
//! events rather than hold the pipeline back. Failures before anyone
//! watched are counted in the stats but not listed. Every limit on
//! clients (connections, request heads, viewers, per-viewer buffers) is
//! in [`DashboardBuilder`]; `benches/dashboard.rs` measures the cost.

mod api;
mod board;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::watch;

use crate::Pipeline;

pub use api::{EVENTS_LINGER, VIEWER_BUFFER};
pub use server::{HEADER_TIMEOUT, MAX_HEAD};

/// Connections served at once by default.
pub const MAX_CONNECTIONS: usize = 64;

/// Viewers of the event stream at once by default.
pub const MAX_VIEWERS: usize = 16;

/// A dashboard being served: a cheap, cloneable handle. It serves until
/// [`Dashboard::shutdown`] or the end of the tokio runtime it was started on.
#[derive(Clone)]
pub struct Dashboard {
    hub: Arc<api::Hub>,
    addr: SocketAddr,
    shutdown: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("addr", &self.addr)
            .field("pipelines", &self.hub.boards().len())
            .field("viewers", &self.hub.viewer_count())
            .finish()
    }
}

/// How a dashboard is served; [`Dashboard::builder`].
#[derive(Debug, Clone)]
pub struct DashboardBuilder {
    controls: Option<String>,
    sample_every: Duration,
    history: Duration,
    max_connections: usize,
    max_viewers: usize,
    header_timeout: Duration,
}

impl Default for DashboardBuilder {
    fn default() -> Self {
        DashboardBuilder {
            controls: None,
            sample_every: Duration::from_secs(1),
            history: Duration::from_secs(300),
            max_connections: MAX_CONNECTIONS,
            max_viewers: MAX_VIEWERS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

impl DashboardBuilder {
    /// Turns on the controls (stop, abort), for requests that carry
    /// `token` (`Authorization: Bearer <token>`). Off by default: the
    /// dashboard is read-only. An empty token leaves them off.
    pub fn controls(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.controls = (!token.is_empty()).then_some(token);
        self
    }

    /// How often each pipeline's stats are sampled and sent to the
    /// viewers (1 s by default; at least 10 ms).
    pub fn sample_every(mut self, every: Duration) -> Self {
        self.sample_every = every.max(Duration::from_millis(10));
        self
    }

    /// How far back the charts go (5 minutes by default).
    pub fn history(mut self, history: Duration) -> Self {
        self.history = history;
        self
    }

    /// Most connections served at once ([`MAX_CONNECTIONS`] by default);
    /// one more is answered `503` and closed.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Most viewers of the event stream at once ([`MAX_VIEWERS`] by
    /// default); one more is answered `503`.
    pub fn max_viewers(mut self, n: usize) -> Self {
        self.max_viewers = n.max(1);
        self
    }

    /// How long a client has to send a request's head (method, path and
    /// headers): [`HEADER_TIMEOUT`] by default. A connection that takes
    /// longer is closed.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Binds `addr` (port 0: any free port) and serves, on the current
    /// tokio runtime, until [`Dashboard::shutdown`].
    pub async fn serve(self, addr: impl ToSocketAddrs) -> std::io::Result<Dashboard> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let history_len = (self.history.as_secs_f64() / self.sample_every.as_secs_f64())
            .ceil()
            .clamp(2.0, 100_000.0) as usize;
        let hub = Arc::new(api::Hub::new(
            self.controls,
            self.max_viewers,
            self.sample_every,
            history_len,
        ));
        let (shutdown, stopped) = watch::channel(false);
        tokio::spawn(server::serve(
            listener,
            api::router(hub.clone()),
            server::Limits {
                connections: self.max_connections,
                header_timeout: self.header_timeout,
            },
            stopped.clone(),
        ));
        tokio::spawn(sample(hub.clone(), stopped));
        tracing::info!("dashboard at http://{addr}/");
        Ok(Dashboard {
            hub,
            addr,
            shutdown: Arc::new(shutdown),
        })
    }
}

/// The sampler: one round per `sample_every`, until shutdown.
async fn sample(hub: Arc<api::Hub>, mut stopped: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(hub.sample_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = Vec::new();
    loop {
        tokio::select! {
            _ = every.tick() => hub.tick(&mut sent).await,
            _ = stopping(&mut stopped) => break,
        }
    }
}

/// Returns once `shutdown` was sent (or its sender is gone).
pub(crate) async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

impl Dashboard {
    /// Serves a read-only dashboard on `addr` with the defaults; see
    /// [`Dashboard::builder`] for the rest.
    pub async fn serve(addr: impl ToSocketAddrs) -> std::io::Result<Dashboard> {
        DashboardBuilder::default().serve(addr).await
    }

    /// The defaults, to change before [`DashboardBuilder::serve`].
    pub fn builder() -> DashboardBuilder {
        DashboardBuilder::default()
    }

    /// Shows `pipeline` on the dashboard, after those already there, from
    /// now until the dashboard shuts down. Before or after its start.
    pub fn watch<T: Send + 'static>(&self, pipeline: &Pipeline<T>) {
        self.hub.add(Arc::new(pipeline.clone()));
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's address, `http://ip:port/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Viewers of the event stream now (pages open, among others).
    pub fn viewers(&self) -> usize {
        self.hub.viewer_count()
    }

    /// Viewers dropped so far because they stopped reading the event
    /// stream (their buffer of [`VIEWER_BUFFER`] messages was full).
    pub fn viewers_dropped(&self) -> u64 {
        self.hub.dropped_slow()
    }

    /// Stops serving: closes the listener and every connection. The
    /// pipelines go on.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        for board in self.hub.boards() {
            board.watch_events(false);
        }
    }
}
