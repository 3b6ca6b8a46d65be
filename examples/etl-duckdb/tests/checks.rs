//! Each generated file gets the verdict it was made for, from real DuckDB;
//! the rejection names the file, the check, the column and the line.

use etl_duckdb::dataset::{self, Expected};
use etl_duckdb::validate::{self, Check, Invalid};

#[test]
fn every_generated_file_gets_its_expected_verdict() {
    let work = tempfile::tempdir().unwrap();
    // One connection for every file, as a worker uses it.
    let conn = validate::open().unwrap();
    for file in dataset::generate(3, 200) {
        let verdict = validate::validate(&conn, &file.name, &file.body, work.path());
        match (file.expected, verdict) {
            (Expected::Valid { rows }, Ok(valid)) => {
                assert_eq!(valid.rows, rows, "{}", file.name);
                assert_eq!(&valid.parquet[..4], b"PAR1", "{}: not Parquet", file.name);
                assert_eq!(&valid.parquet[valid.parquet.len() - 4..], b"PAR1");
            }
            (Expected::Rejected(check), Err(Invalid::Rejected(r))) => {
                assert_eq!(r.check, check, "{}: {r}", file.name);
                assert_eq!(r.file, file.name);
                let message = r.to_string();
                assert!(message.starts_with(&file.name), "{message}");
                assert_eq!(Check::from_message(&message), Some(check), "{message}");
            }
            (expected, Ok(_)) => panic!("{}: expected {expected:?}, it passed", file.name),
            (expected, Err(Invalid::Rejected(r))) => {
                panic!("{}: expected {expected:?}, got {r}", file.name)
            }
            (_, Err(Invalid::Internal(e))) => panic!("{}: {e:#}", file.name),
        }
    }
    // Nothing is left behind in the work directory.
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn rejections_point_at_the_offending_line() {
    let work = tempfile::tempdir().unwrap();
    let files = dataset::generate(0, 100);
    let conn = validate::open().unwrap();
    let reason = |check: Check| {
        let file = files
            .iter()
            .find(|f| f.expected == Expected::Rejected(check))
            .unwrap();
        match validate::validate(&conn, &file.name, &file.body, work.path()) {
            Err(Invalid::Rejected(r)) => r.detail,
            other => panic!("{check}: {other:?}"),
        }
    };
    assert!(reason(Check::Columns).contains("unit_price"));
    let types = reason(Check::Types);
    assert!(
        types.contains("quantity") && types.contains("line 43") && types.contains("\"ten\""),
        "{types}"
    );
    let ranges = reason(Check::Ranges);
    assert!(
        ranges.contains("quantity") && ranges.contains("line 43") && ranges.contains("-3"),
        "{ranges}"
    );
    let nulls = reason(Check::NotNull);
    assert!(
        nulls.contains("customer_id") && nulls.contains("line 43"),
        "{nulls}"
    );
    let dup = reason(Check::UniqueKey);
    assert!(dup.contains("lines 43 and 44"), "{dup}");
}

#[test]
fn a_file_that_is_not_csv_at_all_is_rejected_not_crashed_on() {
    let work = tempfile::tempdir().unwrap();
    let body = b"\x00\x01\x02PAR1 this is binary \xff\xfe\n\x00";
    let conn = validate::open().unwrap();
    match validate::validate(&conn, "binary.csv", body, work.path()) {
        Err(Invalid::Rejected(r)) => {
            assert!(matches!(r.check, Check::Readable | Check::Columns), "{r}")
        }
        other => panic!("{other:?}"),
    }
}
