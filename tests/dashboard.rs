//! The dashboard (feature `dashboard`): its API says what `stats()` says,
//! hostile or careless clients cannot touch the pipeline it shows, and in
//! a real browser (headless Chromium, over the DevTools protocol) the page
//! follows a run to its end.
//!
//! The browser test skips, saying why, when no Chromium is installed,
//! unless `BERGTALZUG_REQUIRE_CHROMIUM=1` (as in `.ci/run`) makes that a
//! failure. It leaves a screenshot in `target/dashboard-screenshot.png`.

#[path = "dashboard/cdp.rs"]
mod cdp;
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bergtalzug::dashboard::Dashboard;
use bergtalzug::prelude::*;
use common::within;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

const LIMIT: Duration = Duration::from_secs(60);

/// A pipeline that runs until stopped: one Async stage of 4 workers, each
/// item taking `pace`; every `fail_every`-th item fails with a message of
/// `len` bytes.
fn endless(pace: Duration, fail_every: u64, len: usize) -> Pipeline<u64> {
    let config = common::config(
        "endless",
        vec![
            StageConfig::new("work", ExecutionType::Async)
                .workers(4)
                .queue_size(20),
        ],
    )
    .retain_results(false);
    let message = "x".repeat(len);
    Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..u64::MAX))
        .async_stage("work", move |item: WorkItem<u64>| {
            let message = message.clone();
            async move {
                tokio::time::sleep(pace).await;
                if item.data.is_multiple_of(fail_every) {
                    anyhow::bail!("item {} failed: {message}", item.data);
                }
                Ok(item)
            }
        })
        .build()
        .unwrap()
}

/// Items the pipeline's stage finished so far.
async fn done(pipeline: &Pipeline<u64>) -> u64 {
    let stats = pipeline.stats().await.unwrap();
    stats.stages[0].processed + stats.stages[0].failed
}

/// Asserts that the pipeline still moves: more items finish within 5 s.
async fn assert_flows(pipeline: &Pipeline<u64>) {
    let before = done(pipeline).await;
    within(Duration::from_secs(5), async {
        while done(pipeline).await < before + 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn get(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// Sends `request` and reads until the server closes: the status (none if
/// the connection was closed without an answer) and the whole response.
async fn http(addr: SocketAddr, request: &str) -> (Option<u16>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request.as_bytes()).await;
    read_response(&mut stream).await
}

async fn read_response(stream: &mut TcpStream) -> (Option<u16>, String) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    (status, text)
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, text) = http(addr, &get(addr, path)).await;
    assert_eq!(status, Some(200), "{text}");
    let body = &text[text.find("\r\n\r\n").expect("a head") + 4..];
    serde_json::from_str(body).unwrap()
}

/// Opens the event stream and reads up to its first event.
async fn viewer(addr: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    within(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\n\n") {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    (stream, String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_what_stats_says_and_unknown_paths_get_404() {
    let config = common::config(
        "finite",
        vec![
            StageConfig::new("a", ExecutionType::Async).workers(2),
            StageConfig::new("b", ExecutionType::Thread).workers(2),
        ],
    );
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::iter(0..500u64))
        .async_stage("a", |item: WorkItem<u64>| async move { Ok(item) })
        .sync_stage("b", |item: WorkItem<u64>| {
            anyhow::ensure!(item.data % 100 != 3, "item {} is bad", item.data);
            Ok(item)
        })
        .build()
        .unwrap();
    let dashboard = Dashboard::builder()
        .sample_every(Duration::from_millis(20))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();
    let results = within(LIMIT, pipeline.run()).await.unwrap();
    assert_eq!(results.len(), 500);

    let (status, page) = http(addr, &get(addr, "/")).await;
    assert_eq!(status, Some(200));
    assert!(
        page.contains("text/html") && page.contains("page.js"),
        "{page}"
    );
    for path in ["/page.js", "/page.css"] {
        assert_eq!(http(addr, &get(addr, path)).await.0, Some(200), "{path}");
    }
    for path in ["/nope", "/api", "/api/pipelines/0", "/../../etc/passwd"] {
        assert_eq!(http(addr, &get(addr, path)).await.0, Some(404), "{path}");
    }
    let post = format!(
        "POST /api/pipelines/0/stop HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(http(addr, &post).await.0, Some(403), "controls are off");

    // The final stats, once the dashboard's sampler saw the end.
    let view = within(Duration::from_secs(10), async {
        loop {
            let json = get_json(addr, "/api/stats").await;
            if json["pipelines"][0]["phase"] == "finished" {
                break json;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let stats = pipeline.stats().await.unwrap();
    let shown = &view["pipelines"][0];
    assert_eq!(shown["name"], "finite");
    assert_eq!(shown["stats"]["completed_items"], stats.completed_items);
    assert_eq!(shown["stats"]["failed_items"], 5);
    assert_eq!(shown["progress"], 1.0);
    for (i, stage) in stats.stages.iter().enumerate() {
        let s = &shown["stats"]["stages"][i];
        assert_eq!(s["name"], stage.name.as_str());
        assert_eq!(s["processed"], stage.processed);
        assert_eq!(s["failed"], stage.failed);
        let config = &pipeline.config().stages[i];
        assert_eq!(shown["stages"][i]["queue_size"], config.queue_size);
        assert_eq!(shown["stages"][i]["workers"], config.workers);
    }
    let history = get_json(addr, "/api/history").await;
    let samples = history["pipelines"][0]["history"].as_array().unwrap().len();
    assert!(samples > 0, "the charts have samples");
    dashboard.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_request_head_is_refused_and_the_pipeline_goes_on() {
    let pipeline = endless(Duration::from_millis(1), 1_000_000, 0);
    pipeline.start().await.unwrap();
    let dashboard = Dashboard::serve("127.0.0.1:0").await.unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();

    let huge = format!(
        "GET /api/stats HTTP/1.1\r\nHost: {addr}\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let (_, (status, text)) = tokio::join!(
        async { write.write_all(huge.as_bytes()).await.is_ok() },
        async {
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut buf)).await;
            let text = String::from_utf8_lossy(&buf).into_owned();
            (text.get(9..12).map(str::to_string), text)
        }
    );
    // 431 if the answer arrived before the reset; never a 200.
    assert!(
        status.is_none() || status.as_deref() == Some("431"),
        "{text}"
    );
    assert_flows(&pipeline).await;
    let json = get_json(addr, "/api/stats").await;
    assert_eq!(json["pipelines"][0]["name"], "endless", "still serves");
    within(LIMIT, pipeline.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hold_at_most_the_connection_limit_and_time_out() {
    let pipeline = endless(Duration::from_millis(1), 1_000_000, 0);
    pipeline.start().await.unwrap();
    let dashboard = Dashboard::builder()
        .max_connections(8)
        .header_timeout(Duration::from_millis(800))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();

    // Eight clients that send half a request head and then nothing.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET /api/stats HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes())
            .await
            .unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, text) = http(addr, &get(addr, "/api/stats")).await;
    assert_eq!(status, Some(503), "past the limit: refused at once; {text}");
    assert_flows(&pipeline).await;

    // The server closes them once their time for a head is up.
    within(Duration::from_secs(10), async {
        for stream in &mut slow {
            let (status, _) = read_response(stream).await;
            assert_ne!(status, Some(200));
        }
    })
    .await;
    let json = get_json(addr, "/api/stats").await;
    assert_eq!(json["pipelines"][0]["phase"], "running", "serves again");
    assert_flows(&pipeline).await;
    within(LIMIT, pipeline.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_never_reads_is_dropped_and_never_waited_for() {
    // Every item fails with 4 kB of message: each tick carries the last 50
    // failures, about 200 kB, 20 times a second. A viewer may be 8 ticks
    // (400 ms) behind.
    let pipeline = endless(Duration::from_millis(1), 1, 4_000);
    let dashboard = Dashboard::builder()
        .sample_every(Duration::from_millis(50))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    pipeline.start().await.unwrap();
    let addr = dashboard.local_addr();

    // One viewer reads everything, counting ticks.
    let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (mut good, hello) = viewer(addr).await;
    assert!(hello.contains("event: hello"), "{hello}");
    let reader = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            let mut chunk = vec![0u8; 1 << 16];
            let mut tail = String::new();
            while let Ok(n) = good.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                tail.push_str(&String::from_utf8_lossy(&chunk[..n]));
                let found = tail.matches("event: tick").count() as u64;
                ticks.fetch_add(found, std::sync::atomic::Ordering::Relaxed);
                tail = tail[tail.len().saturating_sub(16)..].to_string();
                tail = tail.replace("event: tick", "");
            }
        }
    });
    // The other asks for the stream and never reads a byte.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(addr).await.unwrap();
    stuck
        .write_all(format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();

    within(Duration::from_secs(30), async {
        while dashboard.viewers_dropped() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(dashboard.viewers(), 1, "the reading viewer stays");
    let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
    assert_flows(&pipeline).await;
    within(Duration::from_secs(10), async {
        while ticks.load(std::sync::atomic::Ordering::Relaxed) < before + 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Its connection was closed: what was sent before drains, then the end.
    let mut drained = 0usize;
    within(Duration::from_secs(30), async {
        let mut chunk = vec![0u8; 1 << 16];
        while let Ok(n) = stuck.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            drained += n;
        }
    })
    .await;
    assert!(drained < 64 << 20, "bounded: {drained} bytes");
    within(LIMIT, pipeline.stop()).await.unwrap();
    reader.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_past_the_limit_are_refused() {
    let pipeline = endless(Duration::from_millis(1), 1_000_000, 0);
    pipeline.start().await.unwrap();
    let dashboard = Dashboard::builder()
        .max_viewers(2)
        .sample_every(Duration::from_millis(20))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();
    let (first, hello) = viewer(addr).await;
    assert!(hello.starts_with("HTTP/1.1 200") && hello.contains("text/event-stream"));
    let (_second, hello) = viewer(addr).await;
    assert!(hello.contains("event: hello"), "{hello}");
    let (status, _) = http(addr, &get(addr, "/api/events")).await;
    assert_eq!(status, Some(503));
    assert_eq!(dashboard.viewers(), 2);
    // One leaves: its place is free again.
    drop(first);
    within(Duration::from_secs(10), async {
        loop {
            let (_third, hello) = viewer(addr).await;
            if hello.contains("event: hello") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_flows(&pipeline).await;
    within(LIMIT, pipeline.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_need_the_token() {
    let pipeline = endless(Duration::from_millis(1), 1_000_000, 0);
    pipeline.start().await.unwrap();
    let dashboard = Dashboard::builder()
        .controls("s3cret")
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();
    let post = |path: &str, token: Option<&str>| {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let json = get_json(addr, "/api/stats").await;
    assert_eq!(json["controls"], true);
    for token in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
        let (status, _) = http(addr, &post("/api/pipelines/0/abort", token)).await;
        assert_eq!(status, Some(401), "{token:?}");
    }
    assert!(pipeline.is_running() && !pipeline.is_finished());
    let (status, _) = http(addr, &post("/api/pipelines/7/abort", Some("s3cret"))).await;
    assert_eq!(status, Some(404), "no such pipeline");
    let (status, _) = http(addr, &post("/api/pipelines/0/abort", Some("s3cret"))).await;
    assert_eq!(status, Some(202));
    within(Duration::from_secs(10), async {
        while !pipeline.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(pipeline.stats().await.unwrap().cancelled_items > 0 || pipeline.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused_on_loopback() {
    let pipeline = endless(Duration::from_millis(1), 1_000_000, 0);
    let dashboard = Dashboard::serve("127.0.0.1:0").await.unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();
    let port = addr.port();
    for host in ["evil.example", "evil.example:80", "127.0.0.1.evil.example"] {
        let request =
            format!("GET /api/stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(http(addr, &request).await.0, Some(403), "{host}");
    }
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let request =
            format!("GET /api/stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(http(addr, &request).await.0, Some(200), "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_subscribed_to_only_while_someone_watches() {
    let pipeline = endless(Duration::from_millis(1), 10, 10);
    let dashboard = Dashboard::builder()
        .sample_every(Duration::from_millis(20))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    pipeline.start().await.unwrap();
    let addr = dashboard.local_addr();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let json = get_json(addr, "/api/stats").await;
    let shown = &json["pipelines"][0];
    assert_eq!(shown["watching_events"], false, "nobody watches");
    assert_eq!(shown["failures_heard"], 0);
    assert!(shown["stats"]["failed_items"].as_u64().unwrap() > 0);

    let (_viewer, _) = viewer(addr).await;
    within(Duration::from_secs(10), async {
        loop {
            let json = get_json(addr, "/api/stats").await;
            let shown = &json["pipelines"][0];
            if shown["watching_events"] == true && shown["failures_heard"].as_u64().unwrap() > 0 {
                let failure = &shown["failures"][0];
                assert_eq!(failure["stage"], "work");
                assert!(
                    failure["error"]
                        .as_str()
                        .unwrap()
                        .contains("failed: xxxxxxxxxx")
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within(LIMIT, pipeline.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_pipelines_of_any_input_type_share_one_dashboard() {
    let numbers = endless(Duration::from_millis(1), 1_000_000, 0);
    let words = Pipeline::builder(common::config(
        "words",
        vec![StageConfig::new("upper", ExecutionType::Cpu).workers(1)],
    ))
    .unwrap()
    .source(sources::iter(["a", "b", "c"].map(String::from)))
    .sync_stage("upper", |item: WorkItem<String>| {
        Ok(item.map(|w| w.to_uppercase()))
    })
    .build()
    .unwrap();
    let dashboard = Dashboard::builder()
        .sample_every(Duration::from_millis(20))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&numbers);
    dashboard.watch(&words);
    numbers.start().await.unwrap();
    within(LIMIT, words.run()).await.unwrap();
    let addr = dashboard.local_addr();
    within(Duration::from_secs(10), async {
        loop {
            let json = get_json(addr, "/api/stats").await;
            let shown = json["pipelines"].as_array().unwrap();
            assert_eq!(shown.len(), 2);
            assert_eq!(
                (shown[0]["id"].clone(), shown[0]["name"].clone()),
                (0.into(), "endless".into())
            );
            assert_eq!(
                (shown[1]["id"].clone(), shown[1]["name"].clone()),
                (1.into(), "words".into())
            );
            if shown[0]["phase"] == "running" && shown[1]["phase"] == "finished" {
                assert_eq!(shown[1]["stats"]["completed_items"], 3);
                assert_eq!(shown[1]["stages"][0]["model"], "cpu");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within(LIMIT, numbers.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_stalls_are_listed_while_watched() {
    // Item 3 panics (its worker is replaced); item 5 is held for 1.5 s,
    // past the 200 ms stall threshold.
    let config = common::config(
        "trouble",
        vec![StageConfig::new("work", ExecutionType::Async).workers(2)],
    )
    .stall_threshold(Duration::from_millis(200));
    let pipeline = Pipeline::builder(config)
        .unwrap()
        .source(sources::items(
            (0..10u64).map(|n| WorkItem::with_job_id(format!("job-{n}"), n)),
        ))
        .async_stage("work", |item: WorkItem<u64>| async move {
            if item.data == 3 {
                panic!("item 3 breaks its worker");
            }
            if item.data == 5 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            Ok(item)
        })
        .build()
        .unwrap();
    let dashboard = Dashboard::builder()
        .sample_every(Duration::from_millis(20))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let addr = dashboard.local_addr();
    let (_viewer, _) = viewer(addr).await;
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.run().await }
    });
    let seen = within(Duration::from_secs(10), async {
        loop {
            let json = get_json(addr, "/api/stats").await;
            let shown = json["pipelines"][0].clone();
            if !shown["restarts"].as_array().unwrap().is_empty()
                && shown["stalls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["job_id"] == "job-5")
            {
                break shown;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let restart = &seen["restarts"][0];
    assert_eq!(restart["stage"], "work");
    assert!(
        restart["reason"]
            .as_str()
            .unwrap()
            .contains("item 3 breaks its worker"),
        "{restart}"
    );
    assert_ne!(restart["worker"], restart["replacement"]);
    let stall = seen["stalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["job_id"] == "job-5")
        .expect("job-5 stalled");
    assert_eq!(
        (stall["job_id"].clone(), stall["stage"].clone()),
        ("job-5".into(), "work".into())
    );
    assert!(stall["age_now"].as_f64().unwrap() >= stall["age_reported"].as_f64().unwrap());
    assert!(stall["age_reported"].as_f64().unwrap() >= 0.2);
    let failure = &seen["failures"][0];
    assert_eq!(
        (failure["job_id"].clone(), failure["kind"].clone()),
        ("job-3".into(), "panicked".into())
    );
    within(LIMIT, run).await.unwrap().unwrap();
}

// The browser test.

const ITEMS: u64 = 120;
const FAILING: u64 = 7;

/// fetch (Async, gated by the test) → parse (Thread; item 7 fails) → store (Async).
fn gated(gate: Arc<Semaphore>) -> Pipeline<u64> {
    let config = common::config(
        "browser",
        vec![
            StageConfig::new("fetch", ExecutionType::Async)
                .workers(4)
                .queue_size(10),
            StageConfig::new("parse", ExecutionType::Thread)
                .workers(2)
                .queue_size(10),
            StageConfig::new("store", ExecutionType::Async)
                .workers(2)
                .queue_size(10),
        ],
    );
    let items = (0..ITEMS).map(|n| WorkItem::with_job_id(format!("item-{n}"), n));
    Pipeline::builder(config)
        .unwrap()
        .source(sources::items(items))
        .async_stage("fetch", move |item: WorkItem<u64>| {
            let gate = gate.clone();
            async move {
                gate.acquire().await?.forget();
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(item)
            }
        })
        .sync_stage("parse", |item: WorkItem<u64>| {
            anyhow::ensure!(
                item.data != FAILING,
                "injected failure of item {}",
                item.data
            );
            Ok(item)
        })
        .async_stage("store", |item: WorkItem<u64>| async move { Ok(item) })
        .build()
        .unwrap()
}

/// Waits until `condition` holds of the page (a JavaScript expression).
async fn page_until(browser: &cdp::Browser, condition: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if browser.eval(condition).await.unwrap() == Value::Bool(true) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The page's numbers for the pipeline and each stage, as JSON.
const PAGE_NUMBERS: &str = r#"(() => {
  const p = document.querySelector('[data-pipeline="browser"]');
  if (!p) return null;
  const v = (root, f) => { const n = root.querySelector(`[data-field="${f}"]`); return n ? n.getAttribute("data-value") : null; };
  return {
    phase: v(p, "phase"), completed: v(p, "completed_items"), failed: v(p, "failed_items"), admitted: v(p, "admitted_items"),
    stages: [...p.querySelectorAll("[data-stage]")].map(s => ({ name: s.getAttribute("data-stage"),
      processed: v(s, "processed"), failed: v(s, "failed"), queued: v(s, "queue"), busy: v(s, "busy") })),
  };
})()"#;

/// What the page should show for `stats`, in the same shape.
fn expected_numbers(stats: &PipelineStats, phase: &str) -> Value {
    serde_json::json!({
        "phase": phase,
        "completed": stats.completed_items.to_string(),
        "failed": stats.failed_items.to_string(),
        "admitted": stats.admitted_items.to_string(),
        "stages": stats.stages.iter().map(|s| serde_json::json!({
            "name": s.name, "processed": s.processed.to_string(), "failed": s.failed.to_string(),
            "queued": s.queued.to_string(), "busy": s.in_flight.min(s.workers).to_string(),
        })).collect::<Vec<_>>(),
    })
}

/// Waits until the page shows what `stats()` says (the pipeline holds
/// still meanwhile): the sampler's next round and the browser's redraw.
async fn page_matches(browser: &cdp::Browser, pipeline: &Pipeline<u64>, phase: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let want = expected_numbers(&pipeline.stats().await.unwrap(), phase);
        let shown = browser.eval(PAGE_NUMBERS).await.unwrap();
        if shown == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page shows {shown}\nstats() says {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Chromium, or `None` after saying why the test skips; a failure instead
/// when `BERGTALZUG_REQUIRE_CHROMIUM=1`.
fn chromium_or_skip() -> Option<std::path::PathBuf> {
    let found = cdp::find_chromium();
    if found.is_none() {
        let required = std::env::var("BERGTALZUG_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "BERGTALZUG_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install -y chromium)"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install -y chromium to run this test)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_stop_button_stops_the_pipeline_with_the_token() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let pipeline = endless(Duration::from_millis(1), 1_000_000, 0);
    pipeline.start().await.unwrap();
    let dashboard = Dashboard::builder()
        .controls("tok3n")
        .sample_every(Duration::from_millis(100))
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let browser = within(LIMIT, cdp::Browser::start(&chromium)).await.unwrap();
    browser
        .navigate(&format!("{}#token=tok3n", dashboard.url()))
        .await
        .unwrap();
    page_until(
        &browser,
        r#"!!document.querySelector('[data-pipeline="endless"] button[data-action="stop"]')"#,
        "the stop button",
    )
    .await;
    assert_flows(&pipeline).await;
    browser
        .eval(r#"document.querySelector('[data-action="stop"]').click(); true"#)
        .await
        .unwrap();
    within(Duration::from_secs(10), async {
        while !pipeline.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let stats = pipeline.stats().await.unwrap();
    assert_eq!(stats.cancelled_items, 0, "a graceful stop");
    assert_eq!(stats.active_items, 0);
    page_until(
        &browser,
        r#"document.querySelector('[data-pipeline="endless"] [data-field="phase"]').getAttribute("data-value") === "finished"
            && !document.querySelector('[data-action="stop"]')"#,
        "the stopped run, without its buttons",
    )
    .await;
    let errors = browser.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_page_follows_the_run_to_its_end() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let gate = Arc::new(Semaphore::new(0));
    let pipeline = gated(gate.clone());
    let sample = Duration::from_millis(200);
    let dashboard = Dashboard::builder()
        .sample_every(sample)
        .serve("127.0.0.1:0")
        .await
        .unwrap();
    dashboard.watch(&pipeline);
    let run = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.run().await }
    });
    let browser = within(LIMIT, cdp::Browser::start(&chromium)).await.unwrap();
    browser.navigate(&dashboard.url()).await.unwrap();
    page_until(
        &browser,
        r#"document.querySelectorAll('[data-pipeline="browser"] [data-stage]').length === 3"#,
        "the three stages",
    )
    .await;
    let order = browser
        .eval(r#"[...document.querySelectorAll("[data-stage]")].map(s => s.getAttribute("data-stage")).join(",")"#)
        .await
        .unwrap();
    assert_eq!(order, "fetch,parse,store", "in order");

    // 40 items through, then the pipeline holds still at the gate.
    gate.add_permits(40);
    within(LIMIT, async {
        while pipeline.stats().await.unwrap().completed_items < 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    page_matches(&browser, &pipeline, "running").await;

    // The failure the parse stage was made to produce is listed.
    page_until(
        &browser,
        r#"(() => { const row = document.querySelector('[data-list="failures"] tr[data-job="item-7"]');
            return !!row && row.textContent.includes("parse") && row.textContent.includes("injected failure of item 7"); })()"#,
        "item-7's failure in the failures list",
    )
    .await;

    // The charts move while items flow.
    let chart = r#"(() => { const c = document.querySelector('[data-pipeline="browser"] [data-chart="throughput"]');
        return { points: Number(c.getAttribute("data-points")), max: Number(c.getAttribute("data-max")), pixels: c.toDataURL() }; })()"#;
    let before = browser.eval(chart).await.unwrap();
    for _ in 0..10 {
        gate.add_permits(4);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(sample * 3).await;
    let after = browser.eval(chart).await.unwrap();
    assert!(
        after["points"].as_u64() > before["points"].as_u64(),
        "more samples: {} then {}",
        before["points"],
        after["points"]
    );
    assert!(
        after["max"].as_f64().unwrap() > 0.0,
        "a throughput above 0 drawn"
    );
    assert_ne!(after["pixels"], before["pixels"], "the chart was redrawn");

    // The rest, to the end: the final totals.
    gate.add_permits(ITEMS as usize);
    let results = within(LIMIT, run).await.unwrap().unwrap();
    assert_eq!(results.len() as u64, ITEMS);
    page_matches(&browser, &pipeline, "finished").await;
    let final_numbers = browser.eval(PAGE_NUMBERS).await.unwrap();
    assert_eq!(final_numbers["completed"], ITEMS.to_string());
    assert_eq!(final_numbers["failed"], "1");
    page_until(
        &browser,
        r#"document.querySelector('[data-pipeline="browser"] [data-field="progress"]').getAttribute("data-value") === "1""#,
        "progress at 100 %",
    )
    .await;

    let shot = browser.screenshot().await.unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp is in target")
        .join("dashboard-screenshot.png");
    std::fs::write(&path, &shot).unwrap();
    eprintln!("screenshot: {}", path.display());

    let errors = browser.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    browser.close().await;
    dashboard.shutdown();
}

/// Not a check: takes the README's screenshot of a dashboard someone
/// runs, e.g. the quickstart's (docs/dashboard.md says how):
/// `BERGTALZUG_SCREENSHOT_URL=http://127.0.0.1:9000/ cargo test --features
/// dashboard --test dashboard -- --ignored screenshot`, into
/// `BERGTALZUG_SCREENSHOT_TO` (default `docs/dashboard.png`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a tool for the docs: needs a dashboard running at BERGTALZUG_SCREENSHOT_URL"]
async fn screenshot() {
    let url = std::env::var("BERGTALZUG_SCREENSHOT_URL").expect("BERGTALZUG_SCREENSHOT_URL");
    let to =
        std::env::var("BERGTALZUG_SCREENSHOT_TO").unwrap_or_else(|_| "docs/dashboard.png".into());
    let chromium = cdp::find_chromium().expect("chromium on PATH");
    let browser = cdp::Browser::start(&chromium).await.unwrap();
    browser.navigate(&url).await.unwrap();
    page_until(
        &browser,
        "document.querySelectorAll('[data-stage]').length > 0",
        "a pipeline",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    std::fs::write(&to, browser.screenshot().await.unwrap()).unwrap();
    browser.close().await;
}
