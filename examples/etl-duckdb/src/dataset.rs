//! The embedded default input: CSV files of orders, most valid, a few
//! deliberately invalid, each for a different [`Check`].
//!
//! Deterministic: the same `(valid, rows)` always gives the same bytes, so
//! a test can generate the set again to know what each file should become.

use crate::validate::Check;

/// One generated file and what the pipeline should make of it.
#[derive(Debug, Clone)]
pub struct CsvFile {
    /// The file's name (also its URL path and job id).
    pub name: String,
    /// Its bytes.
    pub body: Vec<u8>,
    /// What validation should say.
    pub expected: Expected,
}

/// What validation should make of a generated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Valid, with this many data rows.
    Valid {
        /// Data rows.
        rows: u64,
    },
    /// Rejected by this check.
    Rejected(Check),
}

/// A name listed for download that the server does not have (HTTP 404): a
/// download failure that must not be retried.
pub const MISSING: &str = "orders-missing.csv";

const HEADER: &str = "order_id,customer_id,order_date,quantity,unit_price,country";
const COUNTRIES: [&str; 8] = ["DE", "FR", "CH", "AT", "IT", "NL", "US", "JP"];

/// A deterministic pseudo-random number from `seed` (splitmix64).
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The data rows of file number `file` (without the header).
fn rows(file: u64, count: usize) -> Vec<String> {
    (0..count as u64)
        .map(|i| {
            let r = mix(file << 32 | i);
            let order_id = file * 10_000_000 + i + 1;
            let customer_id = r % 50_000 + 1;
            let (year, month, day) = (2024 + (r >> 16) % 2, 1 + (r >> 20) % 12, 1 + (r >> 24) % 28);
            let quantity = 1 + (r >> 32) % 50;
            let cents = (r >> 40) % 100_000;
            let country = COUNTRIES[((r >> 56) % 8) as usize];
            format!(
                "{order_id},{customer_id},{year}-{month:02}-{day:02},{quantity},{}.{:02},{country}",
                cents / 100,
                cents % 100
            )
        })
        .collect()
}

fn csv(header: &str, rows: &[String]) -> Vec<u8> {
    let mut text = String::with_capacity(rows.len() * 48 + header.len() + 1);
    text.push_str(header);
    text.push('\n');
    for row in rows {
        text.push_str(row);
        text.push('\n');
    }
    text.into_bytes()
}

/// Replaces field `field` of `row` with `value`.
fn set_field(row: &str, field: usize, value: &str) -> String {
    let mut fields: Vec<&str> = row.split(',').collect();
    fields[field] = value;
    fields.join(",")
}

/// `valid` valid files of `rows` rows each, then one invalid file per check.
pub fn generate(valid: usize, rows_per_file: usize) -> Vec<CsvFile> {
    let rows_per_file = rows_per_file.max(50);
    let mut files: Vec<CsvFile> = (0..valid as u64)
        .map(|n| CsvFile {
            name: format!("orders-{n:04}.csv"),
            body: csv(HEADER, &rows(n + 1, rows_per_file)),
            expected: Expected::Valid {
                rows: rows_per_file as u64,
            },
        })
        .collect();

    // Each invalid file starts as a valid one (file numbers past the valid
    // ones) and is broken in one way, on line 43 (data row 41).
    let base = |k: u64| rows(valid as u64 + 1 + k, rows_per_file);
    let bad = |name: &str, check: Check, body: Vec<u8>| CsvFile {
        name: format!("orders-bad-{name}.csv"),
        body,
        expected: Expected::Rejected(check),
    };

    // readable: a quote opened and never closed.
    let mut r = base(0);
    r[41] = set_field(&r[41], 5, "\"DE");
    files.push(bad("unclosed-quote", Check::Readable, csv(HEADER, &r)));

    // columns: no unit_price column.
    let r: Vec<String> = base(1)
        .iter()
        .map(|row| {
            let mut f: Vec<&str> = row.split(',').collect();
            f.remove(4);
            f.join(",")
        })
        .collect();
    let header = "order_id,customer_id,order_date,quantity,country";
    files.push(bad("missing-column", Check::Columns, csv(header, &r)));

    // not-empty: a header and nothing else.
    files.push(bad("header-only", Check::NotEmpty, csv(HEADER, &[])));

    // not-null: an order without a customer.
    let mut r = base(3);
    r[41] = set_field(&r[41], 1, "");
    files.push(bad("empty-customer", Check::NotNull, csv(HEADER, &r)));

    // types: a quantity in words.
    let mut r = base(4);
    r[41] = set_field(&r[41], 3, "ten");
    files.push(bad("quantity-in-words", Check::Types, csv(HEADER, &r)));

    // ranges: a negative quantity.
    let mut r = base(5);
    r[41] = set_field(&r[41], 3, "-3");
    files.push(bad("negative-quantity", Check::Ranges, csv(HEADER, &r)));

    // unique-key: a row sent twice.
    let mut r = base(6);
    r[42] = r[41].clone();
    files.push(bad("duplicate-order", Check::UniqueKey, csv(HEADER, &r)));

    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_invalid_file_per_check() {
        let files = generate(3, 100);
        for check in Check::ALL {
            let n = files
                .iter()
                .filter(|f| f.expected == Expected::Rejected(check))
                .count();
            assert_eq!(n, 1, "{check}");
        }
        assert_eq!(files.len(), 3 + Check::ALL.len());
    }

    #[test]
    fn deterministic() {
        let a = generate(2, 60);
        let b = generate(2, 60);
        assert!(a.iter().zip(&b).all(|(x, y)| x.body == y.body));
    }
}
