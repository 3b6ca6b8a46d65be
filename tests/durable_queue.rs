//! The durable work queue (feature `sqlite`): what it records of a run.
