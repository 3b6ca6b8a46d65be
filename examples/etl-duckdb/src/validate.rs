//! The validate stage: checks one CSV file with DuckDB and turns it into
//! Parquet.
//!
//! The file must have the [`COLUMNS`] (extra columns are ignored); every
//! required value present, of its SQL type and in its range; and no order id
//! twice. The checks run in the order of [`Check`] and the first that fails
//! rejects the file with a [`Rejection`] naming the file, the check, the
//! column and the first offending line. A valid file is written as Parquet
//! (zstd) with the typed columns plus `amount = quantity * unit_price`,
//! sorted by `order_id`.
//!
//! Each worker of the stage holds its own in-memory DuckDB database
//! ([`open`], bound with `sync_stage_with`: built the first time a worker
//! needs one, dropped when the stage ends) with one DuckDB thread: the
//! stage runs one worker per core, so parallelism comes from validating
//! several files at once, not from DuckDB's own pool.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use duckdb::Connection;

/// A required column: its name, SQL type and the range its values must be in.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// The header name.
    pub name: &'static str,
    /// The DuckDB type every value must cast to.
    pub sql_type: &'static str,
    /// A SQL condition on the typed value, written `{v}`.
    pub rule: &'static str,
    /// The rule in words, for rejections.
    pub rule_text: &'static str,
}

/// The columns every file must have, in the order of the Parquet output.
pub const COLUMNS: &[Column] = &[
    Column {
        name: "order_id",
        sql_type: "BIGINT",
        rule: "{v} > 0",
        rule_text: "> 0",
    },
    Column {
        name: "customer_id",
        sql_type: "BIGINT",
        rule: "{v} > 0",
        rule_text: "> 0",
    },
    Column {
        name: "order_date",
        sql_type: "DATE",
        rule: "{v} BETWEEN DATE '2020-01-01' AND DATE '2030-12-31'",
        rule_text: "between 2020-01-01 and 2030-12-31",
    },
    Column {
        name: "quantity",
        sql_type: "INTEGER",
        rule: "{v} BETWEEN 1 AND 10000",
        rule_text: "between 1 and 10000",
    },
    Column {
        name: "unit_price",
        sql_type: "DECIMAL(10,2)",
        rule: "{v} >= 0 AND {v} < 100000",
        rule_text: "between 0 and 99999.99",
    },
    Column {
        name: "country",
        sql_type: "VARCHAR",
        rule: "regexp_full_match({v}, '[A-Z]{2}')",
        rule_text: "two capital letters (ISO 3166 code)",
    },
];

/// The column that must be unique within a file.
pub const KEY: &str = "order_id";

/// The checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// DuckDB can parse the file as CSV with a header.
    Readable,
    /// Every required column is in the header.
    Columns,
    /// There is at least one data row.
    NotEmpty,
    /// No required value is empty.
    NotNull,
    /// Every value casts to its column's type.
    Types,
    /// Every value is in its column's range.
    Ranges,
    /// No order id appears twice.
    UniqueKey,
}

impl Check {
    /// Every check, in order.
    pub const ALL: [Check; 7] = [
        Check::Readable,
        Check::Columns,
        Check::NotEmpty,
        Check::NotNull,
        Check::Types,
        Check::Ranges,
        Check::UniqueKey,
    ];

    /// The check's name, as rejections spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Readable => "readable",
            Check::Columns => "columns",
            Check::NotEmpty => "not-empty",
            Check::NotNull => "not-null",
            Check::Types => "types",
            Check::Ranges => "ranges",
            Check::UniqueKey => "unique-key",
        }
    }

    /// The check named in a rejection's message (`check `types` failed ...`),
    /// e.g. read back from a failed item's error text.
    pub fn from_message(message: &str) -> Option<Check> {
        Check::ALL
            .into_iter()
            .find(|c| message.contains(&format!("check `{}` failed", c.as_str())))
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a file is invalid. Permanent: the same bytes will fail the same way.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The file's name.
    pub file: String,
    /// The check that failed.
    pub check: Check,
    /// What was found, with the column and the first offending line.
    pub detail: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: check `{}` failed: {}",
            self.file, self.check, self.detail
        )
    }
}

impl std::error::Error for Rejection {}

/// A valid file, as Parquet.
#[derive(Debug)]
pub struct Validated {
    /// Data rows in the file.
    pub rows: u64,
    /// The Parquet file's bytes.
    pub parquet: bytes::Bytes,
}

/// What validating a file can end with besides success.
#[derive(Debug)]
pub enum Invalid {
    /// The file broke a check: reject it, do not retry.
    Rejected(Rejection),
    /// Something outside the file went wrong (disk, DuckDB itself).
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Invalid {
    fn from(e: anyhow::Error) -> Self {
        Invalid::Internal(e)
    }
}

impl From<duckdb::Error> for Invalid {
    fn from(e: duckdb::Error) -> Self {
        Invalid::Internal(e.into())
    }
}

/// A DuckDB connection for [`validate`]: an in-memory database of its own,
/// with one DuckDB thread.
///
/// # Errors
///
/// DuckDB could not open the database or take the settings.
pub fn open() -> anyhow::Result<Connection> {
    let conn = Connection::open_in_memory().context("cannot open DuckDB")?;
    conn.execute_batch("SET threads = 1; SET preserve_insertion_order = true;")
        .context("cannot set up DuckDB")?;
    Ok(conn)
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A SQL identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// DuckDB's message, its first two lines only (it goes on with hints).
fn short_message(e: &duckdb::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(2)
        .collect();
    lines.join(" ")
}

/// Validates the CSV `body` of `file` on `conn` (from [`open`]) and returns
/// it as Parquet. Uses `work_dir` for the two files DuckDB reads and
/// writes, and removes them; `conn` is left as it was given.
pub fn validate(
    conn: &Connection,
    file: &str,
    body: &[u8],
    work_dir: &Path,
) -> Result<Validated, Invalid> {
    // Prefixed, so that no file's input is another file's output.
    let csv = work_dir.join(format!("in-{file}"));
    let parquet = work_dir.join(format!("out-{file}.parquet"));
    std::fs::write(&csv, body).with_context(|| format!("cannot write {}", csv.display()))?;
    let outcome = run_checks(conn, file, &csv, &parquet);
    // The connection serves the worker's next file: its tables go whatever
    // happened.
    let dropped = conn.execute_batch("DROP TABLE IF EXISTS raw; DROP TABLE IF EXISTS typed;");
    let result = outcome.and_then(|rows| dropped.map(|()| rows).map_err(Invalid::from));
    let _ = std::fs::remove_file(&csv);
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => {
            let _ = std::fs::remove_file(&parquet);
            return Err(e);
        }
    };
    let bytes =
        std::fs::read(&parquet).with_context(|| format!("cannot read {}", parquet.display()));
    let _ = std::fs::remove_file(&parquet);
    Ok(Validated {
        rows,
        parquet: bytes?.into(),
    })
}

/// The first column (in [`COLUMNS`] order) with rows where `bad(column)`
/// holds, found in one scan of `table`: the column, how many rows, the first
/// line (`line_expr`) and its value (`value(column)`).
fn first_offender(
    conn: &Connection,
    table: &str,
    line_expr: &str,
    value: impl Fn(&Column) -> String,
    bad: impl Fn(&Column) -> String,
) -> Result<Option<(Column, i64, i64, String)>, Invalid> {
    let aggregates: Vec<String> = COLUMNS
        .iter()
        .map(|c| {
            let when = bad(c);
            format!(
                "count(*) FILTER (WHERE {when}), min({line_expr}) FILTER (WHERE {when}), \
                 arg_min({}, {line_expr}) FILTER (WHERE {when})",
                value(c)
            )
        })
        .collect();
    let sql = format!("SELECT {} FROM {table}", aggregates.join(", "));
    let found = conn.query_row(&sql, [], |row| {
        for (i, c) in COLUMNS.iter().enumerate() {
            let count: i64 = row.get(3 * i)?;
            if count > 0 {
                let line: Option<i64> = row.get(3 * i + 1)?;
                let value: Option<String> = row.get(3 * i + 2)?;
                return Ok(Some((
                    *c,
                    count,
                    line.unwrap_or_default(),
                    value.unwrap_or_default(),
                )));
            }
        }
        Ok(None)
    })?;
    Ok(found)
}

fn run_checks(conn: &Connection, file: &str, csv: &Path, parquet: &Path) -> Result<u64, Invalid> {
    let reject = |check: Check, detail: String| {
        Err(Invalid::Rejected(Rejection {
            file: file.to_string(),
            check,
            detail,
        }))
    };
    let csv = csv.to_str().context("work path is not UTF-8")?;
    let parquet = parquet.to_str().context("work path is not UTF-8")?;

    // readable: every value as text first, so that types are ours to check.
    let load = format!(
        "CREATE OR REPLACE TEMP TABLE raw AS \
         SELECT * FROM read_csv({}, header = true, all_varchar = true, delim = ',', quote = '\"', \
         escape = '\"', strict_mode = true)",
        literal(csv)
    );
    if let Err(e) = conn.execute_batch(&load) {
        // DuckDB names the work file: name the user's file instead.
        let message = short_message(&e).replace(csv, file);
        return reject(
            Check::Readable,
            format!("DuckDB cannot parse it as CSV: {message}"),
        );
    }

    // columns
    let mut stmt = conn.prepare("SELECT column_name FROM (DESCRIBE raw)")?;
    let present: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let missing: Vec<&str> = COLUMNS
        .iter()
        .map(|c| c.name)
        .filter(|name| !present.iter().any(|p| p == name))
        .collect();
    if !missing.is_empty() {
        return reject(
            Check::Columns,
            format!(
                "missing required column(s) {} (header has: {})",
                missing.join(", "),
                present.join(", ")
            ),
        );
    }

    // not-empty
    let rows: i64 = conn.query_row("SELECT count(*) FROM raw", [], |r| r.get(0))?;
    if rows == 0 {
        return reject(
            Check::NotEmpty,
            "the header has no data rows under it".into(),
        );
    }

    // not-null, types: one scan each over the text values (line numbers:
    // the header is line 1, the first row line 2).
    let text = |c: &Column| ident(c.name);
    if let Some((c, count, line, _)) = first_offender(conn, "raw", "rowid + 2", text, |c| {
        format!("{0} IS NULL OR trim({0}) = ''", ident(c.name))
    })? {
        return reject(
            Check::NotNull,
            format!(
                "column {} is empty on {count} row(s), first on line {line}",
                c.name
            ),
        );
    }
    if let Some((c, count, line, value)) = first_offender(conn, "raw", "rowid + 2", text, |c| {
        format!("TRY_CAST({} AS {}) IS NULL", ident(c.name), c.sql_type)
    })? {
        return reject(
            Check::Types,
            format!(
                "column {}: {count} value(s) are not {}, first on line {line}: {value:?}",
                c.name, c.sql_type
            ),
        );
    }

    // ranges, on the typed table the output is written from
    let casts: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("CAST({0} AS {1}) AS {0}", ident(c.name), c.sql_type))
        .collect();
    conn.execute_batch(&format!(
        "CREATE OR REPLACE TEMP TABLE typed AS SELECT rowid + 2 AS line, {} FROM raw",
        casts.join(", ")
    ))?;
    let as_text = |c: &Column| format!("CAST({} AS VARCHAR)", ident(c.name));
    if let Some((c, count, line, value)) = first_offender(conn, "typed", "line", as_text, |c| {
        format!("NOT ({})", c.rule.replace("{v}", &ident(c.name)))
    })? {
        return reject(
            Check::Ranges,
            format!(
                "column {}: {count} value(s) not {}, first on line {line}: {value}",
                c.name, c.rule_text
            ),
        );
    }

    // unique-key
    let key = ident(KEY);
    let duplicate: Option<(String, i64, i64, i64, i64)> = conn
        .query_row(
            &format!(
                "SELECT CAST({key} AS VARCHAR), n, first, second, count(*) OVER () FROM ( \
                   SELECT {key}, count(*) AS n, min(line) AS first, \
                          list_sort(list(line))[2] AS second \
                   FROM typed GROUP BY {key} HAVING count(*) > 1) \
                 ORDER BY first LIMIT 1"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            duckdb::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    if let Some((value, n, first, second, keys)) = duplicate {
        return reject(
            Check::UniqueKey,
            format!(
                "{KEY} {value} appears {n} times (lines {first} and {second}); \
                 {keys} duplicated key(s) in all"
            ),
        );
    }

    // transform and write
    let names: Vec<String> = COLUMNS.iter().map(|c| ident(c.name)).collect();
    conn.execute_batch(&format!(
        "COPY (SELECT {}, CAST(quantity * unit_price AS DECIMAL(18,2)) AS amount \
               FROM typed ORDER BY {key}) \
         TO {} (FORMAT parquet, COMPRESSION zstd)",
        names.join(", "),
        literal(parquet)
    ))?;
    Ok(rows as u64)
}
