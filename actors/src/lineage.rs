//! The tracker's ledger of splits: which admitted item each derived item
//! descends from, and when an admitted item with descendants is finished.
//!
//! An admitted item is one *node* until a split stage turns it into
//! children: each child is a node of its own, and the parent stops being
//! one when its split ends ([`Lineage::retired`]). A *family* (an admitted
//! item that split, and every descendant) is finished when it has no open
//! node left; its combined outcome is a success only if every final node
//! (a descendant that reached a result, or a filtered or failed parent)
//! succeeded.
//!
//! Invariant: `open` of a family = its nodes not yet finished nor retired;
//! the map of derived items holds exactly the open derived nodes. So the
//! ledger's size is the number of live derived items, which the splitters'
//! budgets bound.

use rustc_hash::FxHashMap;

use crate::item::{ItemError, ItemErrorKind, JobId, WorkItemResult};

/// How many failed descendants a combined outcome names (the count is
/// exact; the list stops here, so that a family of a million failures
/// does not hold a million ids).
pub(crate) const NAMED_FAILURES: usize = 1000;

/// A family's state while some of its nodes are open.
#[derive(Debug)]
struct Family {
    open: u64,
    finals: u64,
    failed_count: u64,
    failed: Vec<JobId>,
    first_error: Option<ItemError>,
}

impl Family {
    fn new() -> Self {
        Family {
            open: 1,
            finals: 0,
            failed_count: 0,
            failed: Vec::new(),
            first_error: None,
        }
    }

    fn final_node(&mut self, result: &WorkItemResult) {
        self.finals += 1;
        if let Some(error) = &result.error {
            self.failed_count += 1;
            if self.failed.len() < NAMED_FAILURES {
                self.failed.push(result.job_id.clone());
            }
            self.first_error.get_or_insert_with(|| error.clone());
        }
    }

    fn close(self, root: JobId) -> Combined {
        let error = self.first_error.map(|mut first| {
            first.message = format!(
                "{} of {} items it split into failed; the first: {}",
                self.failed_count, self.finals, first.message
            );
            first
        });
        Combined {
            root,
            error,
            failed: self.failed,
        }
    }
}

/// The combined outcome of an admitted item whose descendants are all
/// finished.
#[derive(Debug)]
pub(crate) struct Combined {
    pub(crate) root: JobId,
    /// The first failure among its final items (its message counts them),
    /// `None` when all succeeded.
    pub(crate) error: Option<ItemError>,
    /// The ids of the final items that failed (at most [`NAMED_FAILURES`]).
    pub(crate) failed: Vec<JobId>,
}

/// What a finished node settles.
#[derive(Debug)]
pub(crate) enum Settled {
    /// An admitted item that never split: it is its own outcome.
    Plain,
    /// A node of a family that still has open nodes.
    Open,
    /// The last open node of a family: the admitted item is finished.
    Family(Combined),
}

/// The ledger.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    /// Each open derived node: its family's root and the stage whose split
    /// made it.
    derived: FxHashMap<JobId, (JobId, u16)>,
    /// Each admitted item that split and is not finished.
    families: FxHashMap<JobId, Family>,
}

impl Lineage {
    /// The root of `id`'s family (itself when it is not derived).
    fn root_of(&self, id: &JobId) -> JobId {
        match self.derived.get(id) {
            Some((root, _)) => root.clone(),
            None => id.clone(),
        }
    }

    /// A split in stage `stage` made `children` of `parent` (more may come).
    pub(crate) fn derived(&mut self, parent: &JobId, children: Vec<JobId>, stage: u16) {
        let root = self.root_of(parent);
        let family = self
            .families
            .entry(root.clone())
            .or_insert_with(Family::new);
        family.open += children.len() as u64;
        for child in children {
            self.derived.insert(child, (root.clone(), stage));
        }
    }

    /// `parent`'s split ended after it made children: it is no node any
    /// more. Returns the stage that made `parent`, when it was derived.
    pub(crate) fn retired(&mut self, parent: &JobId) -> (Option<u16>, Settled) {
        let (root, made_by) = match self.derived.remove(parent) {
            Some((root, stage)) => (root, Some(stage)),
            None => (parent.clone(), None),
        };
        (made_by, self.close_one(root, None))
    }

    /// A node reached its result. Returns the stage that made it, when it
    /// was derived.
    pub(crate) fn finished(&mut self, result: &WorkItemResult) -> (Option<u16>, Settled) {
        let (root, made_by) = match self.derived.remove(&result.job_id) {
            Some((root, stage)) => (root, Some(stage)),
            None => (result.job_id.clone(), None),
        };
        (made_by, self.close_one(root, Some(result)))
    }

    fn close_one(&mut self, root: JobId, result: Option<&WorkItemResult>) -> Settled {
        let Some(family) = self.families.get_mut(&root) else {
            return Settled::Plain;
        };
        if let Some(result) = result {
            family.final_node(result);
        }
        family.open -= 1;
        if family.open > 0 {
            return Settled::Open;
        }
        let family = self.families.remove(&root).expect("looked up above");
        Settled::Family(family.close(root))
    }

    /// The admitted item `root` will get no more outcomes (its stages were
    /// killed): its family, if it has one, ends now, its open nodes
    /// cancelled.
    pub(crate) fn lost(&mut self, root: &JobId, message: &str, stage: &str) -> Option<Combined> {
        let mut family = self.families.remove(root)?;
        self.derived.retain(|_, (r, _)| r != root);
        let error = ItemError::new(stage, ItemErrorKind::Cancelled, message);
        family.failed_count += family.open;
        family.finals += family.open;
        family.first_error.get_or_insert(error);
        Some(family.close(root.clone()))
    }

    /// Open derived nodes (for tests and the final check).
    #[cfg(test)]
    fn live(&self) -> usize {
        self.derived.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::WorkItemMetadata;

    fn ok(id: &JobId) -> WorkItemResult {
        WorkItemResult::completed(crate::item::WorkItem::with_job_id(id.clone(), ()), None)
    }

    fn failed(id: &JobId) -> WorkItemResult {
        let error = ItemError::new("s", ItemErrorKind::Failed, "bad");
        WorkItemResult::failed(id.clone(), WorkItemMetadata::default(), error)
    }

    #[test]
    fn an_item_that_never_split_is_its_own_outcome() {
        let mut l = Lineage::default();
        assert!(matches!(
            l.finished(&ok(&"a".into())),
            (None, Settled::Plain)
        ));
    }

    #[test]
    fn a_family_finishes_with_its_last_node_whatever_the_order() {
        let mut l = Lineage::default();
        let root = JobId::from("r");
        let kids: Vec<JobId> = (0..3).map(|i| crate::shape::derived_id(&root, i)).collect();
        l.derived(&root, kids[..2].to_vec(), 0);
        // A child finishes before its parent's split has ended.
        assert!(matches!(
            l.finished(&ok(&kids[0])),
            (Some(0), Settled::Open)
        ));
        l.derived(&root, kids[2..].to_vec(), 0);
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        assert!(matches!(
            l.finished(&failed(&kids[2])),
            (Some(0), Settled::Open)
        ));
        let (_, settled) = l.finished(&ok(&kids[1]));
        let Settled::Family(c) = settled else {
            panic!("the last node finishes the family")
        };
        assert_eq!(c.root, root);
        assert_eq!(c.failed, vec![kids[2].clone()]);
        assert!(c.error.unwrap().message.starts_with("1 of 3 items"));
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn nested_splits_belong_to_the_first_root() {
        let mut l = Lineage::default();
        let root = JobId::from("r");
        let child = crate::shape::derived_id(&root, 0);
        let grandchild = crate::shape::derived_id(&child, 0);
        l.derived(&root, vec![child.clone()], 0);
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        l.derived(&child, vec![grandchild.clone()], 1);
        assert!(matches!(l.retired(&child), (Some(0), Settled::Open)));
        let (made_by, settled) = l.finished(&ok(&grandchild));
        assert_eq!(made_by, Some(1));
        assert!(matches!(
            settled,
            Settled::Family(Combined { error: None, .. })
        ));
        assert_eq!(l.live(), 0);
    }
}
