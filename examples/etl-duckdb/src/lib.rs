//! A real ETL job on bergtalzug: download CSV files over HTTP, validate and
//! transform each with DuckDB into Parquet, store the result in an object
//! store (a local directory or S3).
//!
//! ```text
//!   source: URLs ──> download (Async, many workers, retried)
//!                ──> validate (Cpu, one worker per core: DuckDB checks, Parquet)
//!                ──> store    (Async, many workers, retried: object_store)
//! ```
//!
//! - [`job`]: the pipeline, its three handlers, and the run's [`job::Report`].
//! - [`validate`]: the DuckDB checks and the Parquet output.
//! - [`destination`]: `s3://bucket/prefix` or a local directory.
//! - [`dataset`] and [`serve`]: the embedded default input, CSV files made
//!   here (a few deliberately invalid) and served on loopback HTTP.
//! - [`report`]: where failed items go (the rejected files and their reasons).

pub mod dataset;
pub mod destination;
pub mod job;
pub mod report;
pub mod serve;
pub mod validate;
