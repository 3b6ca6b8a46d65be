//! `etl-duckdb`: download CSV files, validate them with DuckDB into Parquet,
//! store them in an object store. See the README beside this crate.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, bail};
use etl_duckdb::dataset::{self, Expected};
use etl_duckdb::destination::Destination;
use etl_duckdb::job::{self, Options};
use etl_duckdb::serve;

const USAGE: &str = "\
usage: etl-duckdb [DEST] [options]

Downloads CSV files, validates each with DuckDB (required columns, types,
ranges, unique order ids), writes the valid ones as Parquet to DEST and
reports the rejected ones with the reason.

DEST  a local directory (default: etl-output) or s3://bucket/prefix
      (S3 settings from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
      AWS_ENDPOINT_URL, AWS_ALLOW_HTTP)

options:
  --urls FILE             download the URLs listed in FILE (one a line)
                          instead of the embedded default: generated files
                          served on a loopback HTTP server
  --files N               valid files to generate (default 100); one
                          invalid file per check is added
  --rows N                rows per generated file (default 20000)
  --flaky N               the first N generated files answer HTTP 503 once
                          (exercises the download retries; default 0)
  --download-workers N    default 32
  --validate-workers N    default: one per core
  --store-workers N       default 32
  --report FILE           also write the report as JSON to FILE
";

struct Args {
    dest: String,
    urls: Option<PathBuf>,
    files: usize,
    rows: usize,
    flaky: usize,
    download_workers: usize,
    validate_workers: usize,
    store_workers: usize,
    report: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = Args {
        dest: "etl-output".into(),
        urls: None,
        files: 100,
        rows: 20_000,
        flaky: 0,
        download_workers: 32,
        validate_workers: cores,
        store_workers: 32,
        report: None,
    };
    let mut it = std::env::args().skip(1);
    let mut dest = None;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        let mut number = |name: &str| -> anyhow::Result<usize> {
            let v = value(name)?;
            v.parse()
                .with_context(|| format!("{name} {v}: not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--urls" => args.urls = Some(value("--urls")?.into()),
            "--report" => args.report = Some(value("--report")?.into()),
            "--files" => args.files = number("--files")?,
            "--rows" => args.rows = number("--rows")?,
            "--flaky" => args.flaky = number("--flaky")?,
            "--download-workers" => args.download_workers = number("--download-workers")?,
            "--validate-workers" => args.validate_workers = number("--validate-workers")?,
            "--store-workers" => args.store_workers = number("--store-workers")?,
            flag if flag.starts_with('-') => bail!("unknown option {flag}\n\n{USAGE}"),
            _ if dest.is_none() => dest = Some(arg),
            _ => bail!("more than one destination given\n\n{USAGE}"),
        }
    }
    if let Some(dest) = dest {
        args.dest = dest;
    }
    Ok(args)
}

/// `(name, url)` for each line of a URL list; the name is the URL's last
/// path segment, made unique with a `-2`, `-3` ... suffix when needed.
fn url_list(text: &str) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|url| {
            let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or(url);
            let base: String = last
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            // No hidden or special names (`.`, `..`) in the work directory.
            let base = if base.is_empty() || base.starts_with('.') {
                format!("file{base}")
            } else {
                base
            };
            let mut name = base.clone();
            let mut n = 1;
            while !seen.insert(name.clone()) {
                n += 1;
                name = format!("{base}-{n}");
            }
            (name, url.to_string())
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let destination = Destination::parse(&args.dest)?;

    // The input: a URL list, or the embedded default on a loopback server
    // (kept alive until the run ends).
    let (files, _server) = match &args.urls {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the URL list {}", path.display()))?;
            println!(
                "Input: the {} URLs in {}",
                text.lines().count(),
                path.display()
            );
            (url_list(&text), None)
        }
        None => {
            let generated = dataset::generate(args.files, args.rows);
            let invalid = generated
                .iter()
                .filter(|f| !matches!(f.expected, Expected::Valid { .. }))
                .count();
            let flaky = generated.iter().take(args.flaky).map(|f| f.name.clone());
            let served = generated
                .iter()
                .map(|f| (f.name.clone(), bytes::Bytes::from(f.body.clone())));
            let server = serve::serve(served, flaky.collect::<Vec<_>>()).await?;
            let mut files: Vec<(String, String)> = generated
                .iter()
                .map(|f| (f.name.clone(), server.url(&f.name)))
                .collect();
            files.push((dataset::MISSING.to_string(), server.url(dataset::MISSING)));
            println!(
                "Input: {} generated CSV files ({} valid, {invalid} invalid, {} rows each) \
                 and one missing, served at {}",
                generated.len(),
                generated.len() - invalid,
                args.rows.max(50),
                server.base_url()
            );
            (files, Some(server))
        }
    };
    println!("Output: {}", destination.display);
    println!();

    let report = job::run(Options {
        files,
        destination,
        download_workers: args.download_workers,
        validate_workers: args.validate_workers,
        store_workers: args.store_workers,
    })
    .await?;
    report.print();
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    Ok(())
}
