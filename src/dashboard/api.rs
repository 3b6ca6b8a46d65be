//! The dashboard's routes, the viewers of its event stream, and the
//! sampler that feeds them.
//!
//! | route | method | answer |
//! |---|---|---|
//! | `/` | GET | the page (`page.html`, `page.js`, `page.css`, embedded) |
//! | `/api/stats` | GET | every watched pipeline, as of its last sample (JSON) |
//! | `/api/history` | GET | the same with the charts' samples (JSON) |
//! | `/api/events` | GET | server-sent events: `hello` (as `/api/history`), then a `tick` per sample |
//! | `/api/pipelines/{id}/stop` | POST | graceful stop (controls on, `Authorization: Bearer <token>`) |
//! | `/api/pipelines/{id}/abort` | POST | abort (the same) |
//!
//! Each viewer of `/api/events` has a buffer of [`VIEWER_BUFFER`]
//! messages; the sampler never waits for one: a viewer whose buffer is
//! full is dropped and its connection closed.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{Notify, mpsc};

use super::board::{Board, Phase};

/// How many messages (samples) a viewer of the event stream may be behind
/// before it is dropped.
pub const VIEWER_BUFFER: usize = 8;

/// How long the failures subscription is kept after the last viewer left
/// (a page reload does not lose the failures of the moment).
pub const EVENTS_LINGER: Duration = Duration::from_secs(10);

/// The close switch of one HTTP connection, put in each of its requests.
#[derive(Clone)]
pub(crate) struct Connection {
    pub(crate) close: Arc<Notify>,
}

/// One viewer of the event stream.
struct Viewer {
    tx: mpsc::Sender<Message>,
    close: Arc<Notify>,
}

/// One server-sent event, serialised once for every viewer.
#[derive(Clone)]
struct Message {
    kind: &'static str,
    json: Arc<str>,
}

struct Viewers {
    list: Vec<Viewer>,
    /// When the last viewer left (`None` while some watch, or none ever did).
    left_at: Option<Instant>,
    /// Viewers dropped because they did not read.
    dropped_slow: u64,
}

/// What the routes and the sampler share.
pub(crate) struct Hub {
    pub(crate) boards: RwLock<Vec<Arc<Board>>>,
    viewers: Mutex<Viewers>,
    pub(crate) controls: Option<String>,
    pub(crate) max_viewers: usize,
    pub(crate) sample_every: Duration,
    history_len: usize,
}

impl Hub {
    pub(crate) fn new(
        controls: Option<String>,
        max_viewers: usize,
        sample_every: Duration,
        history_len: usize,
    ) -> Hub {
        Hub {
            boards: RwLock::new(Vec::new()),
            viewers: Mutex::new(Viewers {
                list: Vec::new(),
                left_at: None,
                dropped_slow: 0,
            }),
            controls,
            max_viewers,
            sample_every,
            history_len,
        }
    }

    fn viewers(&self) -> MutexGuard<'_, Viewers> {
        self.viewers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn boards(&self) -> Vec<Arc<Board>> {
        self.boards
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn add(&self, pipeline: Arc<dyn super::board::Watched>) -> Arc<Board> {
        let mut boards = self.boards.write().unwrap_or_else(|e| e.into_inner());
        let board = Board::new(boards.len(), pipeline, self.history_len);
        boards.push(board.clone());
        drop(boards);
        if self.watched() {
            board.watch_events(true);
        }
        board
    }

    /// Viewers connected to the event stream now.
    pub(crate) fn viewer_count(&self) -> usize {
        self.viewers().list.len()
    }

    pub(crate) fn dropped_slow(&self) -> u64 {
        self.viewers().dropped_slow
    }

    /// Someone watches, or did less than [`EVENTS_LINGER`] ago.
    fn watched(&self) -> bool {
        let viewers = self.viewers();
        !viewers.list.is_empty() || viewers.left_at.is_some_and(|t| t.elapsed() < EVENTS_LINGER)
    }

    /// Every board as JSON: with the samples after `after[i]` for board
    /// `i` (all for `None`), or none (`history` false).
    fn snapshot(&self, history: Option<&[u64]>) -> String {
        let boards = self.boards();
        let controls = self.controls.is_some();
        let pipelines: Vec<serde_json::Value> = boards
            .iter()
            .map(|b| {
                let after = match history {
                    None => Some(u64::MAX),
                    Some(after) => after.get(b.id).copied(),
                };
                b.view(after, controls)
            })
            .collect();
        serde_json::json!({
            "controls": controls,
            "sample_every": self.sample_every.as_secs_f64(),
            "viewers": self.viewer_count(),
            "pipelines": pipelines,
        })
        .to_string()
    }

    /// One round of the sampler: samples every board, holds the failures
    /// subscriptions while someone watches, and sends the new samples to
    /// the viewers. `sent[i]`: samples of board `i` the viewers have.
    pub(crate) async fn tick(&self, sent: &mut Vec<u64>) {
        let boards = self.boards();
        let watched = self.watched();
        for board in &boards {
            board.sample().await;
            board.watch_events(watched && board.phase() != Phase::Finished);
        }
        if self.viewer_count() == 0 {
            sent.clear();
            sent.extend(boards.iter().map(|b| b.samples_taken()));
            return;
        }
        sent.resize(boards.len(), 0);
        let json: Arc<str> = self.snapshot(Some(sent)).into();
        for (board, n) in boards.iter().zip(sent.iter_mut()) {
            *n = board.samples_taken();
        }
        self.broadcast(Message { kind: "tick", json });
    }

    /// Sends to every viewer without waiting: a viewer whose buffer is full
    /// is dropped and its connection closed; a viewer gone is forgotten.
    fn broadcast(&self, message: Message) {
        let mut viewers = self.viewers();
        let before = viewers.list.len();
        let mut slow = 0;
        viewers
            .list
            .retain(|v| match v.tx.try_send(message.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    v.close.notify_one();
                    slow += 1;
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        viewers.dropped_slow += slow;
        if before > 0 && viewers.list.is_empty() {
            viewers.left_at = Some(Instant::now());
        }
    }

    /// A new viewer, if there is room: its stream starts with `hello`.
    fn join(&self, close: Arc<Notify>) -> Option<mpsc::Receiver<Message>> {
        let (tx, rx) = mpsc::channel(VIEWER_BUFFER);
        let mut viewers = self.viewers();
        viewers.list.retain(|v| !v.tx.is_closed());
        if viewers.list.len() >= self.max_viewers {
            return None;
        }
        viewers.list.push(Viewer {
            tx: tx.clone(),
            close,
        });
        viewers.left_at = None;
        drop(viewers);
        for board in self.boards() {
            board.watch_events(board.phase() != Phase::Finished);
        }
        let hello = Message {
            kind: "hello",
            json: self.snapshot(Some(&[])).into(),
        };
        let _ = tx.try_send(hello);
        Some(rx)
    }
}

/// The router over `hub`.
pub(crate) fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/page.js", get(script))
        .route("/page.css", get(style))
        .route("/api/stats", get(stats))
        .route("/api/history", get(history))
        .route("/api/events", get(events))
        .route("/api/pipelines/{id}/{action}", post(control))
        .fallback(not_found)
        .with_state(hub)
}

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn json(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn stats(State(hub): State<Arc<Hub>>) -> Response {
    json(hub.snapshot(None))
}

async fn history(State(hub): State<Arc<Hub>>) -> Response {
    json(hub.snapshot(Some(&[])))
}

async fn events(
    State(hub): State<Arc<Hub>>,
    axum::Extension(connection): axum::Extension<Connection>,
) -> Response {
    let Some(rx) = hub.join(connection.close) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many viewers of the event stream\n",
        )
            .into_response();
    };
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let message = rx.recv().await?;
        let event = Event::default().event(message.kind).data(&*message.json);
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(stream).into_response()
}

async fn control(
    State(hub): State<Arc<Hub>>,
    Path((id, action)): Path<(usize, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = &hub.controls else {
        return (StatusCode::FORBIDDEN, "controls are off\n").into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same(given.as_bytes(), token.as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid token is needed\n",
        )
            .into_response();
    }
    let Some(board) = hub.boards().into_iter().find(|b| b.id == id) else {
        return not_found().await;
    };
    let stop = match action.as_str() {
        "stop" => true,
        "abort" => false,
        _ => return not_found().await,
    };
    tracing::info!(pipeline = %board.name(), "dashboard: {action} asked for");
    // Both return once every item has its outcome: not waited for here.
    tokio::spawn(async move {
        let result = if stop {
            board.stop().await
        } else {
            board.abort().await
        };
        if let Err(error) = result {
            tracing::warn!(pipeline = %board.name(), "dashboard: {error}");
        }
    });
    (StatusCode::ACCEPTED, format!("{action} asked for\n")).into_response()
}

/// Compares in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
