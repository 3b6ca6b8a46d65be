//! Files -> records -> batches into files: the split-then-batch shape.
//!
//! Writes `FILES` input files of `RECORDS` CSV lines each (`kind,value`, a
//! few of them corrupt, one file empty) into a temporary directory, then
//! runs a pipeline:
//!
//! 1. `read` (Thread): each file splits into its records, read lazily line
//!    by line (`Children::try_iter`): a corrupt line fails alone; the
//!    empty file is filtered.
//! 2. `write` (Async batch stage, `batch(200, 50 ms)`, batched by `kind`):
//!    each batch is appended to `out/<kind>.csv` in one write (where a
//!    database would take one `INSERT` of many rows);
//!
//! and checks the accounting: every file acked once (success only if all
//! its records were written), every record written once.
//!
//! ```text
//! cargo run --release --example files_to_batches -- [FILES] [RECORDS]
//! ```

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bergtalzug::Ack;
use bergtalzug::prelude::*;
use bergtalzug::shape::{Batch, Children};

/// One record of an input file.
#[derive(Debug)]
struct Record {
    kind: String,
    value: u64,
}

fn parse(line: std::io::Result<String>) -> anyhow::Result<Record> {
    let line = line?;
    let (kind, value) = line
        .split_once(',')
        .ok_or_else(|| anyhow::anyhow!("no comma in {line:?}"))?;
    Ok(Record {
        kind: kind.to_string(),
        value: value.parse()?,
    })
}

/// The input files, acked once each.
struct Files {
    paths: Vec<PathBuf>,
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl Source for Files {
    type Item = PathBuf;
    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<PathBuf>>> {
        let n = count.min(self.paths.len());
        Ok(self
            .paths
            .drain(..n)
            .map(|p| {
                let id = p.file_name().unwrap().to_string_lossy().into_owned();
                WorkItem::with_job_id(id, p)
            })
            .collect())
    }
    fn wants_acks(&self) -> bool {
        true
    }
    async fn ack(&mut self, outcomes: Vec<Ack>) {
        self.acks.lock().unwrap().extend(outcomes);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let files: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let records: usize = args.next().map_or(Ok(5000), |a| a.parse())?;
    let dir = std::env::temp_dir().join(format!("bergtalzug-shapes-{}", std::process::id()));
    let out = dir.join("out");
    std::fs::create_dir_all(&out)?;
    let kinds = ["users", "orders", "events"];
    let mut paths = Vec::new();
    let mut corrupt = 0;
    for f in 0..files {
        let path = dir.join(format!("input-{f}.csv"));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path)?);
        // The last file is empty: filtered, a success.
        let n = if f + 1 == files { 0 } else { records };
        for r in 0..n {
            if f == 1 && r % 1000 == 999 {
                writeln!(w, "garbage line {r}")?;
                corrupt += 1;
            } else {
                writeln!(w, "{},{}", kinds[r % kinds.len()], r)?;
            }
        }
        paths.push(path);
    }

    let config = PipelineConfig::new(
        "files_to_batches",
        vec![
            StageConfig::new("read", ExecutionType::Thread)
                .workers(2)
                .queue_size(2),
            StageConfig::new("write", ExecutionType::Async)
                .workers(2)
                .queue_size(2)
                .batch(200, Duration::from_millis(50)),
        ],
    )
    .stats_interval(Duration::ZERO)
    .retain_results(false);
    let acks = Arc::new(Mutex::new(Vec::new()));
    let source = Files {
        paths,
        acks: acks.clone(),
    };
    let out_dir = out.clone();
    let pipeline = Pipeline::builder(config)?
        .source(source)
        .sync_stage("read", |file: WorkItem<PathBuf>| {
            let lines = std::io::BufReader::new(std::fs::File::open(&file.data)?).lines();
            Ok(file.map(|_| Children::try_iter(lines.map(parse))))
        })
        .split()
        .batch_by("write", |record: &WorkItem<Record>| {
            record.data.kind.clone()
        })
        .async_batch_stage("write", move |batch: Batch<Record>| {
            let out_dir = out_dir.clone();
            async move {
                let records = batch.into_items();
                let kind = records[0].data.kind.clone();
                let mut text = String::new();
                for r in &records {
                    text.push_str(&format!("{},{}\n", r.data.kind, r.data.value));
                }
                // One append per batch (a database would take one INSERT).
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out_dir.join(format!("{kind}.csv")))?;
                file.write_all(text.as_bytes())?;
                Ok(records.into_iter().map(|r| Ok(r.data.value)).collect())
            }
        })
        .build()?;
    pipeline.run().await?;
    let stats = pipeline.stats().await?;

    // The accounting.
    let acks = acks.lock().unwrap().clone();
    assert_eq!(acks.len(), files, "one ack per file");
    let failed: Vec<&Ack> = acks.iter().filter(|a| !a.is_success()).collect();
    let expect_failed = usize::from(files > 2 && records >= 1000);
    assert_eq!(
        failed.len(),
        expect_failed,
        "only the file with corrupt lines fails"
    );
    let mut written: HashMap<String, usize> = HashMap::new();
    for kind in kinds {
        let path = out.join(format!("{kind}.csv"));
        let n = std::fs::read_to_string(&path).map_or(0, |t| t.lines().count());
        written.insert(kind.to_string(), n);
    }
    let total: usize = written.values().sum();
    let good = (files.saturating_sub(1)) * records - corrupt;
    assert_eq!(total, good, "every good record written once");
    println!(
        "{files} files, {} records: {total} written in batches ({written:?}), {corrupt} corrupt records failed alone, {} file(s) acked as failed{}",
        stats.derived_items_finished,
        failed.len(),
        failed
            .first()
            .map(|a| format!(
                " ({}: {})",
                a.job_id,
                a.error.as_ref().map_or("", |e| e.message.as_str())
            ))
            .unwrap_or_default()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
