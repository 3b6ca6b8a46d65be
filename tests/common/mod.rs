//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use bergtalzug::prelude::*;

/// Fails the test if `fut` takes longer than `limit`: a hang is a failure.
pub async fn within<F: Future>(limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: the pipeline hung"),
    }
}

/// Every result has a distinct job id.
pub fn assert_unique_ids(results: &[WorkItemResult]) {
    let ids: HashSet<_> = results.iter().map(|r| r.job_id.clone()).collect();
    assert_eq!(ids.len(), results.len(), "a job id finished twice");
}
