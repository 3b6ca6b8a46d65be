//! The accept loop: HTTP/1 connections served by hyper, within limits a
//! hostile or careless client cannot lift.
//!
//! - at most `max_connections` at once: one more is answered `503` and
//!   closed at once;
//! - a request head must arrive within [`HEADER_TIMEOUT`] and fit in
//!   [`MAX_HEAD`] bytes (hyper answers `431` past that), so slow or huge
//!   requests cost a connection slot for a few seconds at most;
//! - a viewer the event stream drops for not reading has its connection
//!   closed by its [`Connection`] switch;
//! - when bound to loopback, a request must name a loopback host (`Host`),
//!   so that a web page elsewhere cannot read it through DNS rebinding.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceExt;

use super::api::Connection;

/// How long a client has to send a request head, by default.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head (request line and headers) read, in bytes.
pub const MAX_HEAD: usize = 16 * 1024;

/// What a client may take.
pub(crate) struct Limits {
    /// Connections served at once.
    pub(crate) connections: usize,
    /// Time to send a request head.
    pub(crate) header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    let hosts = local.filter(|a| a.ip().is_loopback()).map(loopback_hosts);
    let hosts: Arc<Option<Vec<String>>> = Arc::new(hosts);
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = super::stopping(&mut shutdown) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: wait for some to close.
                tracing::debug!("dashboard: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let router = router.clone();
        let hosts = hosts.clone();
        let header_timeout = limits.header_timeout;
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let close = Arc::new(Notify::new());
            let connection = Connection {
                close: close.clone(),
            };
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let router = router.clone();
                let allowed = host_allowed(&request, hosts.as_ref().as_deref());
                request.extensions_mut().insert(connection.clone());
                async move {
                    if !allowed {
                        return Ok((
                            StatusCode::FORBIDDEN,
                            "the dashboard answers requests for a loopback host only\n",
                        )
                            .into_response());
                    }
                    router.oneshot(request).await
                }
            });
            let _ = stream.set_nodelay(true);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = served => {}
                _ = close.notified() => {}
                _ = super::stopping(&mut shutdown) => {}
            }
        });
    }
}

/// Answers `503` without waiting and closes.
fn refuse(stream: TcpStream) {
    const BODY: &str = "too many connections\n";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(head.as_bytes());
}

fn loopback_hosts(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    let mut hosts = vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        addr.to_string(),
    ];
    if port == 80 {
        // Browsers leave the default port out.
        hosts.extend(["127.0.0.1", "localhost", "[::1]"].map(String::from));
    }
    hosts
}

fn host_allowed<B>(request: &Request<B>, hosts: Option<&[String]>) -> bool {
    let Some(hosts) = hosts else { return true };
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}
