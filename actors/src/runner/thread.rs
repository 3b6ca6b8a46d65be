//! `Thread`: each batch runs on one of tokio's blocking threads, so a
//! blocking handler never stalls the runtime. A stage has at most `workers`
//! batches out at once, so at most `workers` threads are busy for it.

use std::sync::Arc;

use super::{RunCtx, run_blocking};
use crate::handler::Payload;
use crate::item::WorkItem;

pub(crate) async fn run(ctx: Arc<RunCtx>, items: Vec<WorkItem<Payload>>) -> Result<(), String> {
    match tokio::task::spawn_blocking(move || run_blocking(&ctx, items)).await {
        Ok(result) => result,
        Err(e) => Err(format!("blocking task ended abnormally: {e}")),
    }
}
