//! End to end against a real S3-compatible server on loopback: `moto` in
//! server mode (PyPI's `moto[server]`) is started here, the program runs
//! with an `s3://` destination, and the test checks that every valid file
//! arrived in the bucket as readable Parquet with all its rows, that no
//! invalid one did, and that every invalid one was reported with its check.
//! Two files answer HTTP 503 once: they arrive too, after a retry.
//!
//! The server is `$MOTO_SERVER`, or `moto_server` on the PATH; `.ci/run`
//! installs it into a virtualenv and sets `MOTO_SERVER`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etl_duckdb::dataset::{self, Expected};
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

const BUCKET: &str = "etl-test";
const PREFIX: &str = "orders/run-1";

/// The moto server; killed when dropped.
struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_server() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return path.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|p| p.is_file())
        })
        .expect(
            "this test needs moto's S3 server: pip install 'moto[server]' (in a venv), \
             then put moto_server on the PATH or set MOTO_SERVER to its path",
        )
}

fn start_moto(log: &std::path::Path) -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(moto_server())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start moto_server");
    Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_files_arrive_in_s3_and_invalid_ones_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let moto_log = dir.path().join("moto.log");
    let mut moto = start_moto(&moto_log);

    // Wait for it to answer, then make the bucket (moto takes unsigned
    // requests).
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http.get(&moto.url).send().await.is_ok() {
            break;
        }
        if let Some(status) = moto.child.try_wait().unwrap() {
            panic!(
                "moto_server exited ({status}): {}",
                std::fs::read_to_string(&moto_log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let made = http
        .put(format!("{}/{BUCKET}", moto.url))
        .send()
        .await
        .unwrap();
    assert!(
        made.status().is_success(),
        "create bucket: {}",
        made.status()
    );

    // The program, as a user runs it.
    let (valid, rows) = (12, 2_000);
    let report_path = dir.path().join("report.json");
    let output = tokio::task::spawn_blocking({
        let url = moto.url.clone();
        let report_path = report_path.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_etl-duckdb"))
                .arg(format!("s3://{BUCKET}/{PREFIX}"))
                .args(["--files", &valid.to_string(), "--rows", &rows.to_string()])
                // Two files answer 503 once: the download stage retries them.
                .args(["--flaky", "2"])
                .arg("--report")
                .arg(&report_path)
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ENDPOINT_URL", url)
                .env("AWS_ALLOW_HTTP", "true")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "etl-duckdb failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );

    // What should have happened, from the same generator.
    let files = dataset::generate(valid, rows);
    let expected_keys: BTreeMap<String, u64> = files
        .iter()
        .filter_map(|f| match f.expected {
            Expected::Valid { rows } => Some((
                format!("{PREFIX}/{}", f.name.replace(".csv", ".parquet")),
                rows,
            )),
            Expected::Rejected(_) => None,
        })
        .collect();

    // The bucket holds exactly the valid files, each readable Parquet with
    // all its rows.
    let s3 = AmazonS3Builder::new()
        .with_endpoint(&moto.url)
        .with_allow_http(true)
        .with_bucket_name(BUCKET)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap();
    let listed: Vec<_> = s3
        .list(Some(&Path::from(PREFIX)))
        .try_collect()
        .await
        .unwrap();
    let keys: BTreeSet<String> = listed.iter().map(|m| m.location.to_string()).collect();
    assert_eq!(
        keys,
        expected_keys.keys().cloned().collect::<BTreeSet<_>>(),
        "the bucket should hold exactly the valid files"
    );
    let duck = duckdb::Connection::open_in_memory().unwrap();
    for (key, rows) in &expected_keys {
        let bytes = s3
            .get(&Path::from(key.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let local = dir.path().join("check.parquet");
        std::fs::write(&local, &bytes).unwrap();
        let (count, distinct, negative): (i64, i64, i64) = duck
            .query_row(
                &format!(
                    "SELECT count(*), count(DISTINCT order_id), count(*) FILTER (WHERE amount < 0) \
                     FROM read_parquet('{}')",
                    local.display()
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(count as u64, *rows, "{key}: rows");
        assert_eq!(distinct, count, "{key}: order ids unique");
        assert_eq!(negative, 0, "{key}: amounts");
    }

    // The report: every invalid file rejected by its check, the missing one
    // failed once in download (a 404 is not retried), nothing else failed.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let rejected: BTreeMap<String, String> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let reason = d["reason"].as_str().unwrap();
            let file = d["file"].as_str().unwrap();
            assert!(reason.contains(file), "the reason names the file: {reason}");
            assert_eq!(d["stage"], "validate");
            assert_eq!(d["attempts"], 1, "{file}: a rejection is not retried");
            (file.to_string(), d["check"].as_str().unwrap().to_string())
        })
        .collect();
    let expected_rejected: BTreeMap<String, String> = files
        .iter()
        .filter_map(|f| match f.expected {
            Expected::Rejected(check) => Some((f.name.clone(), check.to_string())),
            Expected::Valid { .. } => None,
        })
        .collect();
    assert_eq!(rejected, expected_rejected);

    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["file"], dataset::MISSING);
    assert_eq!(failed[0]["stage"], "download");
    assert_eq!(failed[0]["attempts"], 1, "a 404 is not retried");
    assert!(failed[0]["reason"].as_str().unwrap().contains("404"));

    assert_eq!(
        report["stored"].as_array().unwrap().len(),
        expected_keys.len()
    );
    let download = &report["stages"][0];
    assert_eq!(download["name"], "download");
    assert_eq!(download["retried"], 2, "the two flaky files, once each");
    assert_eq!(
        report["downloaded"].as_array().unwrap().len(),
        files.len(),
        "all but the missing file downloaded"
    );
}
