//! Embedding a pipeline in a ractor actor system.
//!
//! [`Pipeline::spawn_linked`](crate::Pipeline::spawn_linked) starts a
//! pipeline with its root actor linked under a supervisor of yours and
//! returns the root's [`ActorRef`](ractor::ActorRef)`<`[`PipelineMsg`]`<T>>`.
//! Your actors then send it `Inject`, `Stop`, `Abort`, `Stats` and
//! `Subscribe`; events come as your own messages through
//! [`forward_to_actor`] (or `Pipeline::subscribe_actor`), as
//! [`ActorEvent`]s. Your supervisor sees the root end with the reason
//! [`FINISHED`] when the pipeline finished, or `ActorFailed` if it failed.
//! `docs/embedding.md` has the whole story (a supervisor must override
//! ractor's default `handle_supervisor_evt`, which would stop it when the
//! pipeline ends normally).
//!
//! The other variants of `PipelineMsg` come from the pipeline's own
//! actors; their payloads ([`Failure`], [`Filed`], [`Tick`]) cannot be
//! made outside it.

pub use crate::event::{ActorEvent, forward_to_actor};
pub use crate::root::{FINISHED, Failure, Filed, PipelineMsg, Tick};
