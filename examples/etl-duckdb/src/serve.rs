//! A loopback HTTP server for the embedded default input: `GET /<name>`
//! answers the file's bytes, an unknown name 404. Files listed as flaky
//! answer `503 Service Unavailable` to their first request, to exercise the
//! download stage's retries.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running server; stopped when dropped.
#[derive(Debug)]
pub struct FileServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl FileServer {
    /// The URL of `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// The server's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Files {
    bodies: HashMap<String, Bytes>,
    /// Names whose next request fails with 503 (once each).
    flaky: Mutex<HashSet<String>>,
}

/// Serves `files` (name → bytes) on 127.0.0.1 at a free port.
pub async fn serve(
    files: impl IntoIterator<Item = (String, Bytes)>,
    flaky: impl IntoIterator<Item = String>,
) -> std::io::Result<FileServer> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let files = Arc::new(Files {
        bodies: files.into_iter().collect(),
        flaky: Mutex::new(flaky.into_iter().collect()),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let files = files.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(files.clone(), req));
                // A client that hangs up mid-answer is its own business.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(FileServer { addr, task })
}

async fn answer(
    files: Arc<Files>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let name = req.uri().path().trim_start_matches('/');
    let reply = |status: StatusCode, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        Ok(response)
    };
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
    }
    if files.flaky.lock().expect("not poisoned").remove(name) {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"busy, try again\n"),
        );
    }
    match files.bodies.get(name) {
        Some(body) => reply(StatusCode::OK, body.clone()),
        None => reply(StatusCode::NOT_FOUND, Bytes::from_static(b"no such file\n")),
    }
}
