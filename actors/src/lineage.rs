//! The tracker's ledger of splits: which admitted item each derived item
//! descends from, and when an admitted item with descendants is finished.
//!
//! An admitted item is one *node* until a split stage turns it into
//! children: each child is a node of its own, and the parent stops being
//! one when its split ends ([`Lineage::retired`], or its own result after
//! children, [`Lineage::ended`]). A *family* (an admitted item that split,
//! and every descendant) is finished when it has no open node left; its
//! combined outcome is a success only if every final node (a descendant
//! that reached a result, or a failed parent) succeeded.
//!
//! **Keys.** Derived ids are the pipeline's own ([`JobId::derived`]: the
//! parent's id and an index, never equal to an id a user chose), so a
//! user id spelled like a child's (`"a/0"`) is another item, and an item
//! whose id is not derived is never looked up among the families: only a
//! splitter's messages about its own parents reach them. Admitted items
//! with the same id (possible only with tracking off, which does not
//! refuse duplicates) that split at once share one family: each is one
//! more root of it and one more open node, their same-spelled children are
//! counted in `copies`, and when the family finishes each root gets the
//! combined outcome. So every admitted item is settled exactly once
//! whatever ids users choose.
//!
//! Invariant: `open` of a family = its nodes not yet finished nor retired;
//! the map of derived items holds exactly the open derived nodes (counted
//! with their copies). So the ledger's size is the number of live derived
//! items, which the splitters' budgets bound.

use rustc_hash::FxHashMap;

use crate::item::{ItemError, ItemErrorKind, JobId, WorkItemResult};

/// How many failed descendants a combined outcome names (the count is
/// exact; the list stops here, so that a family of a million failures
/// does not hold a million ids).
pub(crate) const NAMED_FAILURES: usize = 1000;

/// A family's state while some of its nodes are open.
#[derive(Debug)]
struct Family {
    /// The admitted items it is the family of (1 unless ids repeat).
    roots: u64,
    open: u64,
    finals: u64,
    failed_count: u64,
    failed: Vec<JobId>,
    first_error: Option<ItemError>,
}

impl Family {
    fn new() -> Self {
        Family {
            roots: 0,
            open: 0,
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
            self.first_error.get_or_insert_with(|| (**error).clone());
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
            roots: self.roots,
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
    /// How many admitted items it settles: 1, unless items with the same
    /// id split at once (tracking off), each of which it settles.
    pub(crate) roots: u64,
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

/// An open derived node.
#[derive(Debug)]
struct Node {
    /// Its family's root.
    root: JobId,
    /// The stage whose split made it.
    stage: u16,
    /// Open nodes with this id: more than 1 only when admitted items with
    /// the same id split at once (the same split stage makes them all).
    copies: u32,
}

/// The ledger.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    /// Each open derived node.
    derived: FxHashMap<JobId, Node>,
    /// Each admitted item that split and is not finished.
    families: FxHashMap<JobId, Family>,
}

impl Lineage {
    /// A split in stage `stage` made `children` of `parent` (more may come);
    /// `first` when they are its first.
    pub(crate) fn derived(
        &mut self,
        parent: &JobId,
        children: Vec<JobId>,
        stage: u16,
        first: bool,
    ) {
        let (root, root_parent) = match self.derived.get(parent) {
            Some(node) => (node.root.clone(), false),
            None => (parent.clone(), true),
        };
        let family = self
            .families
            .entry(root.clone())
            .or_insert_with(Family::new);
        if root_parent && first {
            // The admitted item itself becomes a node of its family.
            family.roots += 1;
            family.open += 1;
        }
        family.open += children.len() as u64;
        for child in children {
            self.derived
                .entry(child)
                .and_modify(|node| node.copies += 1)
                .or_insert_with(|| Node {
                    root: root.clone(),
                    stage,
                    copies: 1,
                });
        }
    }

    /// Takes one copy of the derived node `id`: its root and the stage
    /// that made it.
    fn take(&mut self, id: &JobId) -> Option<(JobId, u16)> {
        let node = self.derived.get_mut(id)?;
        node.copies -= 1;
        let found = (node.root.clone(), node.stage);
        if node.copies == 0 {
            self.derived.remove(id);
        }
        Some(found)
    }

    /// `parent`'s split ended after it made children: it is no node any
    /// more. Returns the stage that made `parent`, when it was derived.
    pub(crate) fn retired(&mut self, parent: &JobId) -> (Option<u16>, Settled) {
        self.end_parent(parent, None)
    }

    /// `result` is the own result of a parent that made children (its
    /// split panicked, or it was cancelled): a final node of its family.
    pub(crate) fn ended(&mut self, result: &WorkItemResult) -> (Option<u16>, Settled) {
        self.end_parent(&result.job_id, Some(result))
    }

    fn end_parent(
        &mut self,
        parent: &JobId,
        result: Option<&WorkItemResult>,
    ) -> (Option<u16>, Settled) {
        let (root, made_by) = match self.take(parent) {
            Some((root, stage)) => (root, Some(stage)),
            None => (parent.clone(), None),
        };
        (made_by, self.close_one(root, result))
    }

    /// An item reached its result. A derived one is a node of its family
    /// (returned: the stage that made it); any other is an admitted item
    /// that did not split (its own outcome), whatever families share its
    /// id.
    pub(crate) fn finished(&mut self, result: &WorkItemResult) -> (Option<u16>, Settled) {
        match self.take(&result.job_id) {
            Some((root, stage)) => (Some(stage), self.close_one(root, Some(result))),
            None => (None, Settled::Plain),
        }
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
    ///
    /// Its open nodes stay in the map of derived items until [`clear`](Self::clear).
    pub(crate) fn lost(&mut self, root: &JobId, message: &str, stage: &str) -> Option<Combined> {
        let mut family = self.families.remove(root)?;
        let error = ItemError::new(stage, ItemErrorKind::Cancelled, message);
        family.failed_count += family.open;
        family.finals += family.open;
        family.first_error.get_or_insert(error);
        Some(family.close(root.clone()))
    }

    /// Forgets every open node and family, once the stages that held them
    /// were killed (after [`lost`](Self::lost) for each admitted item left,
    /// when their ids are known), so that nothing is kept for items that
    /// will never finish. Returns how many open derived nodes each stage's
    /// split had made, for their budgets.
    pub(crate) fn clear(&mut self) -> FxHashMap<u16, usize> {
        let mut made: FxHashMap<u16, usize> = FxHashMap::default();
        for (_, node) in self.derived.drain() {
            *made.entry(node.stage).or_default() += node.copies as usize;
        }
        self.families.clear();
        made
    }

    /// Open derived nodes (for tests and the final check).
    #[cfg(test)]
    fn live(&self) -> usize {
        self.derived.values().map(|n| n.copies as usize).sum()
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
        l.derived(&root, kids[..2].to_vec(), 0, true);
        // A child finishes before its parent's split has ended.
        assert!(matches!(
            l.finished(&ok(&kids[0])),
            (Some(0), Settled::Open)
        ));
        l.derived(&root, kids[2..].to_vec(), 0, false);
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
        l.derived(&root, vec![child.clone()], 0, true);
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        l.derived(&child, vec![grandchild.clone()], 1, true);
        assert!(matches!(l.retired(&child), (Some(0), Settled::Open)));
        let (made_by, settled) = l.finished(&ok(&grandchild));
        assert_eq!(made_by, Some(1));
        assert!(matches!(
            settled,
            Settled::Family(Combined { error: None, .. })
        ));
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn a_user_id_spelled_like_a_child_is_an_item_of_its_own() {
        let mut l = Lineage::default();
        let root = JobId::from("a");
        let child = crate::shape::derived_id(&root, 0);
        let lookalike = JobId::from("a/0");
        l.derived(&root, vec![child.clone()], 0, true);
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        // The user's "a/0" finishing settles itself, not a's child.
        assert!(matches!(
            l.finished(&failed(&lookalike)),
            (None, Settled::Plain)
        ));
        assert_eq!(l.live(), 1, "a's child is still open");
        let (made_by, settled) = l.finished(&ok(&child));
        assert_eq!(made_by, Some(0));
        assert!(matches!(
            settled,
            Settled::Family(Combined {
                error: None,
                roots: 1,
                ..
            })
        ));
        // And a user's "a" that never split, beside an open family "a",
        // is its own outcome.
        l.derived(&root, vec![child.clone()], 0, true);
        assert!(matches!(l.finished(&ok(&root)), (None, Settled::Plain)));
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        assert!(matches!(l.finished(&ok(&child)), (_, Settled::Family(_))));
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn admitted_items_with_one_id_that_split_at_once_are_each_settled() {
        let mut l = Lineage::default();
        let root = JobId::from("x");
        let kids: Vec<JobId> = (0..2).map(|i| crate::shape::derived_id(&root, i)).collect();
        // Two items `x` (tracking off admits both) split into two each.
        l.derived(&root, kids.clone(), 0, true);
        l.derived(&root, kids.clone(), 0, true);
        assert_eq!(l.live(), 4);
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        for kid in kids.iter().chain(&kids) {
            assert!(matches!(l.finished(&ok(kid)), (Some(0), Settled::Open)));
        }
        let (_, settled) = l.retired(&root);
        let Settled::Family(c) = settled else {
            panic!("the last node finishes the family")
        };
        assert_eq!(c.roots, 2, "each admitted `x` is settled");
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn a_parents_own_result_after_children_is_a_final_node() {
        let mut l = Lineage::default();
        let root = JobId::from("p");
        let child = crate::shape::derived_id(&root, 0);
        l.derived(&root, vec![child.clone()], 0, true);
        assert!(matches!(l.ended(&failed(&root)), (None, Settled::Open)));
        let (_, settled) = l.finished(&ok(&child));
        let Settled::Family(c) = settled else {
            panic!("the last node finishes the family")
        };
        assert_eq!(c.failed, vec![root]);
    }

    #[test]
    fn a_lost_family_and_its_open_nodes_are_forgotten() {
        let mut l = Lineage::default();
        let root = JobId::from("r");
        let child = crate::shape::derived_id(&root, 0);
        let grandchildren: Vec<JobId> = (0..2)
            .map(|i| crate::shape::derived_id(&child, i))
            .collect();
        l.derived(&root, vec![child.clone()], 0, true);
        l.derived(&child, grandchildren, 2, true);
        assert!(matches!(l.retired(&root), (None, Settled::Open)));
        let c = l.lost(&root, "killed", "s").expect("r has a family");
        assert_eq!(c.roots, 1);
        assert!(c.error.unwrap().message.starts_with("3 of 3 items"));
        let made = l.clear();
        assert_eq!(
            (made[&0], made[&2]),
            (1, 2),
            "each split's budget is given back"
        );
        assert_eq!(l.live(), 0);
        assert!(l.families.is_empty());
    }
}
