//! `Async`: the handler's future is awaited on the worker actor's own task,
//! one item at a time; `workers` actors give the stage its concurrency.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;

use super::{Attempt, Reporter, RunCtx, panic_message};
use crate::handler::{Payload, StageHandler};
use crate::item::{ItemErrorKind, WorkItem};

pub(crate) async fn run(ctx: &Arc<RunCtx>, items: Vec<WorkItem<Payload>>) -> Result<(), String> {
    let StageHandler::Async(handler) = &ctx.handler else {
        return Err(format!("stage `{}` has no async handler", ctx.stage));
    };
    let mut reporter = Reporter::new(ctx, items.len());
    let mut items = items.into_iter();
    while let Some(mut item) = items.next() {
        let started = Instant::now();
        let attempt = Attempt::begin(ctx, &mut item, started);
        reporter.started(&attempt);
        // A handler that panics while building its future is caught too.
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(item))) {
            Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
            Err(payload) => Err(payload),
        };
        let now = Instant::now();
        match result {
            Ok(Ok(out)) => reporter.push(attempt.succeed(ctx, out, now), started, now),
            Ok(Err(e)) => reporter.push(
                attempt.fail(ctx, ItemErrorKind::Failed, format!("{e:#}"), now),
                started,
                now,
            ),
            Err(payload) => {
                let message = panic_message(&*payload);
                let outcome = attempt.fail(ctx, ItemErrorKind::Panicked, message.clone(), now);
                reporter.panicked(outcome, started, items.collect(), message.clone());
                return Err(message);
            }
        }
    }
    reporter.finish();
    Ok(())
}
