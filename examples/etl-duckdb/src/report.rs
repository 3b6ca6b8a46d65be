//! What the run reports: the files each stage passed, and the files that
//! failed with their stage and reason. A file that fails validation is
//! *rejected* (its check is named); any other failure (a 404, a store that
//! keeps refusing) is *failed*.

use std::sync::{Arc, Mutex};

use bergtalzug::prelude::*;
use serde::Serialize;

use crate::validate::Check;

/// A file that did not make it, and why.
#[derive(Debug, Clone, Serialize)]
pub struct DeadFile {
    /// The file's name (its job id).
    pub file: String,
    /// The stage it failed in.
    pub stage: String,
    /// How it failed (`failed`, `timed out`, `panicked` ...).
    pub kind: String,
    /// The validation check that rejected it, when one did.
    pub check: Option<Check>,
    /// The error, with its chain.
    pub reason: String,
    /// Attempts made in that stage.
    pub attempts: u32,
}

impl DeadFile {
    /// The record of `job_id`, failed with `error`.
    pub fn new(job_id: &JobId, error: &ItemError) -> Self {
        DeadFile {
            file: job_id.to_string(),
            stage: error.stage.clone(),
            kind: error.kind.to_string(),
            check: Check::from_message(&error.message),
            reason: error.message.clone(),
            attempts: error.attempts,
        }
    }

    /// Whether validation rejected the file (rather than another failure).
    pub fn is_rejection(&self) -> bool {
        self.check.is_some()
    }
}

/// The failed files of a run, in the order they failed.
pub type DeadFiles = Arc<Mutex<Vec<DeadFile>>>;

/// The pipeline's dead-letter sink: records each failed item in `dead`.
///
/// Bound with the builder's `.on_dead_letter(...)`, which hands over every
/// item that ends without success, once.
pub fn dead_letter_sink(dead: DeadFiles) -> impl FnMut(DeadLetter) + Send + 'static {
    move |letter: DeadLetter| {
        dead.lock()
            .expect("not poisoned")
            .push(DeadFile::new(&letter.job_id, &letter.error));
    }
}
