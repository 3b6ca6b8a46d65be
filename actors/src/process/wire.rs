//! The parent's side of what crosses: how a Process stage's item becomes a
//! job frame, how its input is had again from that frame (for a retry, or
//! to run it elsewhere), and how a reply becomes its output.
//!
//! Two shapes, one [`Wire`] each:
//!
//! - [`Items`]: one item per job, its output item in the reply;
//! - [`Batches`]: a whole batch per job (one frame each way, whatever its
//!   size), one outcome per item in the reply. The items' ids and metadata
//!   stay in the parent ([`Wire::Aside`]): the child gets each item's id,
//!   custom metadata and data, and the outcomes are paired with the items
//!   here, as a batch handler's are in the other models.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::frame::{self, BatchJob, BatchRef, ItemReply, Job, JobRef};
use crate::item::{JobId, Permanent, WorkItem, WorkItemMetadata};
use crate::shape::{Batch, Unbatched};

/// How a stage's items of type `I` cross to a worker process, and its
/// outputs of type `O` back.
pub(crate) trait Wire<I, O>: Send + Sync + 'static {
    /// What the parent keeps of an item while a worker process has it.
    type Aside: Send + 'static;
    /// What a reply carries when the handler returned.
    type Done: DeserializeOwned + Send + 'static;
    /// What is kept of `item` (taken before it is encoded).
    fn aside(item: &WorkItem<I>) -> Self::Aside;
    /// The job frame of `item`, whose custom metadata is `custom` (as it
    /// crosses). Calls the data's `Serialize`, user code.
    fn encode(item: &WorkItem<I>, custom: &str, limit: usize) -> Result<Vec<u8>, String>;
    /// The item's data again, from its frame's payload.
    fn input(payload: &[u8], aside: &Self::Aside) -> Result<I, String>;
    /// The output of a reply to the item; else why the reply does not fit
    /// it, and what was kept of it.
    fn output(done: Self::Done, aside: Self::Aside) -> Result<O, (String, Self::Aside)>;
}

/// One item per job: `process_stage`, `process_stage_using`.
pub(crate) struct Items;

impl<I, O> Wire<I, O> for Items
where
    I: Serialize + DeserializeOwned + Send + 'static,
    O: DeserializeOwned + Send + 'static,
{
    type Aside = ();
    type Done = O;

    fn aside(_: &WorkItem<I>) {}

    fn encode(item: &WorkItem<I>, custom: &str, limit: usize) -> Result<Vec<u8>, String> {
        let job = JobRef {
            job_id: &item.head.job_id.to_string(),
            attempts: item.head.metadata.attempts,
            custom,
            data: &item.data,
        };
        frame::encode(&job, limit)
    }

    fn input(payload: &[u8], (): &()) -> Result<I, String> {
        frame::decode::<Job<I>>(payload).map(|job| job.data)
    }

    fn output(done: O, (): ()) -> Result<O, (String, ())> {
        Ok(done)
    }
}

/// A whole batch per job: `process_batch_stage`,
/// `process_batch_stage_using`.
pub(crate) struct Batches;

/// A batch's items' ids and metadata, in order.
type Members = Vec<(JobId, WorkItemMetadata)>;

impl<I, O> Wire<Batch<I>, Unbatched<O>> for Batches
where
    I: Serialize + DeserializeOwned + Send + 'static,
    O: DeserializeOwned + Send + 'static,
{
    type Aside = Members;
    type Done = Vec<ItemReply<O>>;

    fn aside(item: &WorkItem<Batch<I>>) -> Members {
        item.data.members()
    }

    fn encode(item: &WorkItem<Batch<I>>, custom: &str, limit: usize) -> Result<Vec<u8>, String> {
        let items = &item.data.items;
        let ids: Vec<String> = items.iter().map(|i| i.head.job_id.to_string()).collect();
        let customs = items
            .iter()
            .map(|i| frame::custom_to_wire(&i.head.metadata.custom))
            .collect::<Result<Vec<String>, String>>()?;
        let batch = BatchRef {
            key: item.data.key,
            items: items
                .iter()
                .zip(ids.iter().zip(&customs))
                // A batch's attempt is each of its items' attempt.
                .map(|(i, (id, custom))| JobRef {
                    job_id: id,
                    attempts: item.head.metadata.attempts,
                    custom,
                    data: &i.data,
                })
                .collect(),
        };
        let job = JobRef {
            job_id: &item.head.job_id.to_string(),
            attempts: item.head.metadata.attempts,
            custom,
            data: &batch,
        };
        frame::encode(&job, limit)
    }

    fn input(payload: &[u8], members: &Members) -> Result<Batch<I>, String> {
        let job = frame::decode::<Job<BatchJob<I>>>(payload)?;
        let BatchJob { key, items } = job.data;
        if items.len() != members.len() {
            return Err(format!(
                "the batch's frame holds {} items, not {}",
                items.len(),
                members.len()
            ));
        }
        let items = items
            .into_iter()
            .zip(members)
            .map(|(job, (id, metadata))| {
                WorkItem::from_parts(id.clone(), job.data, metadata.clone())
            })
            .collect();
        Ok(Batch { items, key })
    }

    fn output(
        outcomes: Vec<ItemReply<O>>,
        members: Members,
    ) -> Result<Unbatched<O>, (String, Members)> {
        if outcomes.len() != members.len() {
            let message = format!(
                "the worker process sent {} outcomes for a batch of {} items",
                outcomes.len(),
                members.len()
            );
            return Err((message, members));
        }
        Ok(Unbatched(
            members
                .into_iter()
                .zip(outcomes)
                .map(|((id, metadata), outcome)| {
                    let outcome = match outcome {
                        ItemReply::Done(out) => Ok(out),
                        ItemReply::Failed { message, permanent } => Err(error(message, permanent)),
                    };
                    (id, metadata, outcome)
                })
                .collect(),
        ))
    }
}

/// A handler's error as it came back: its chain as one message, marked
/// [`Permanent`] if it was.
pub(crate) fn error(message: String, permanent: bool) -> anyhow::Error {
    if permanent {
        anyhow::Error::new(Permanent(anyhow::Error::msg(message)))
    } else {
        anyhow::Error::msg(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> WorkItem<Batch<String>> {
        let items = (0..3)
            .map(|i| {
                let mut item = WorkItem::with_job_id(format!("row-{i}"), format!("data {i}"));
                item.metadata_mut().custom.insert("n".into(), i.into());
                item
            })
            .collect();
        WorkItem::with_job_id(
            "batch-1",
            Batch {
                items,
                key: Some(7),
            },
        )
    }

    #[test]
    fn a_batch_is_had_again_from_its_frame_and_what_was_kept() {
        let item = batch();
        let kept = <Batches as Wire<Batch<String>, Unbatched<u8>>>::aside(&item);
        let frame =
            <Batches as Wire<Batch<String>, Unbatched<u8>>>::encode(&item, "", 1 << 20).unwrap();
        let again =
            <Batches as Wire<Batch<String>, Unbatched<u8>>>::input(&frame[4..], &kept).unwrap();
        assert_eq!(again.key(), Some(7));
        assert_eq!(again.len(), 3);
        for (a, b) in again.items().iter().zip(item.data.items()) {
            assert_eq!(a.job_id(), b.job_id());
            assert_eq!(a.data, b.data);
            assert_eq!(a.metadata().custom, b.metadata().custom);
            assert_eq!(a.metadata().created(), b.metadata().created());
        }
        // What the child reads: one job, the batch's items inside.
        let job: Job<BatchJob<String>> = frame::decode(&frame[4..]).unwrap();
        assert_eq!(job.job_id, "batch-1");
        assert_eq!(job.data.items.len(), 3);
        assert_eq!(job.data.items[2].job_id, "row-2");
        assert_eq!(job.data.items[2].custom, r#"{"n":2}"#);
    }

    #[test]
    fn outcomes_are_paired_with_their_items_or_refused_when_they_do_not_fit() {
        let item = batch();
        let kept = <Batches as Wire<Batch<String>, Unbatched<u8>>>::aside(&item);
        let outcomes = vec![
            ItemReply::Done(1u8),
            ItemReply::Failed {
                message: "bad row".into(),
                permanent: true,
            },
            ItemReply::Done(3),
        ];
        let Unbatched(members) =
            <Batches as Wire<Batch<String>, Unbatched<u8>>>::output(outcomes, kept.clone())
                .unwrap();
        let ids: Vec<String> = members.iter().map(|(id, ..)| id.to_string()).collect();
        assert_eq!(ids, ["row-0", "row-1", "row-2"]);
        let error = members[1].2.as_ref().unwrap_err();
        assert!(Permanent::is(error), "{error:#}");
        assert_eq!(*members[2].2.as_ref().unwrap(), 3);
        let Err((message, back)) = <Batches as Wire<Batch<String>, Unbatched<u8>>>::output(
            vec![ItemReply::Done(1u8)],
            kept,
        ) else {
            panic!("one outcome for three items was taken");
        };
        assert!(message.contains("1 outcomes for a batch of 3"), "{message}");
        assert_eq!(back.len(), 3);
    }
}
