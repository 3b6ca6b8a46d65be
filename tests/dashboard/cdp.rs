//! Just enough of the Chrome DevTools Protocol to drive headless Chromium
//! from a test: start it, open a page, evaluate JavaScript, collect console
//! errors, take a screenshot. Commands are JSON over one websocket (the
//! browser's), to a page target attached with `flatten: true`.
//!
//! Hand-written on `tokio-tungstenite` rather than a CDP crate: the few
//! commands a test needs fit in this file, where a full binding (generated
//! from the protocol's schema) takes minutes to build.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// The Chromium binary on `PATH`, if there is one.
pub fn find_chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome", "chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
}

type Pending = Arc<Mutex<Vec<(u64, oneshot::Sender<Value>)>>>;

/// A headless browser with one page.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<String>,
    pending: Pending,
    next_id: Mutex<u64>,
    session: String,
    /// Console errors and uncaught exceptions seen on the page.
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Browser {
    /// Starts `chromium` headless and opens an empty page.
    pub async fn start(chromium: &Path) -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1400,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find("ws://") {
                    return Ok(line[at..].trim().to_string());
                }
            }
            anyhow::bail!("chromium exited without a DevTools address")
        })
        .await??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        let (mut sink, mut source) = socket.split();
        let (out, mut outgoing) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(text) = outgoing.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        {
            let (pending, errors) = (pending.clone(), errors.clone());
            tokio::spawn(async move {
                while let Some(Ok(message)) = source.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = value.get("id").and_then(Value::as_u64) {
                        let mut pending = pending.lock().unwrap();
                        if let Some(i) = pending.iter().position(|(p, _)| *p == id) {
                            let _ = pending.swap_remove(i).1.send(value);
                        }
                    } else if let Some(error) = console_error(&value) {
                        errors.lock().unwrap().push(error);
                    }
                }
            });
        }
        let mut browser = Browser {
            child,
            _profile: profile,
            out,
            pending,
            next_id: Mutex::new(0),
            session: String::new(),
            errors,
        };
        let target = browser
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].as_str().unwrap_or_default().to_string();
        let attached = browser
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.page(domain, json!({})).await?;
        }
        Ok(browser)
    }

    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = {
            let mut next = self.next_id.lock().unwrap();
            *next += 1;
            *next
        };
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().push((id, tx));
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.out
            .send(message.to_string())
            .map_err(|_| anyhow::anyhow!("the DevTools socket closed"))?;
        let answer = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| anyhow::anyhow!("{method}: no answer in 30 s"))??;
        if let Some(error) = answer.get("error") {
            anyhow::bail!("{method}: {error}");
        }
        Ok(answer["result"].clone())
    }

    /// A command to the page.
    pub async fn page(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.call(Some(&session), method, params).await
    }

    /// Opens `url` in the page.
    pub async fn navigate(&self, url: &str) -> anyhow::Result<()> {
        self.page("Page.navigate", json!({ "url": url })).await?;
        Ok(())
    }

    /// The value of `expression` (JSON-serialisable), evaluated in the page;
    /// a promise is awaited.
    pub async fn eval(&self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .page(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            anyhow::bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let shot = self
            .page(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await?;
        let data = shot["data"].as_str().unwrap_or_default();
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }

    /// Ends the browser.
    pub async fn close(mut self) {
        let _ = self.call(None, "Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.start_kill();
    }
}

/// The text of a console error or an uncaught exception, if `event` is one.
fn console_error(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.exceptionThrown" => Some(format!("exception: {}", params["exceptionDetails"])),
        "Runtime.consoleAPICalled" if params["type"] == "error" => {
            Some(format!("console.error: {}", params["args"]))
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => {
            Some(format!("log: {}", params["entry"]["text"]))
        }
        _ => None,
    }
}
