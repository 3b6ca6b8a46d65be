//! How a child finds a Process stage's handler before `main` builds the
//! pipeline: by its address.
//!
//! The parent starts its own executable again, so every function sits at
//! the same distance from any other one in the child as in the parent (the
//! image is loaded whole at one random base). The parent sends three
//! distances from [`anchor`]: that of [`trampoline`], instantiated for the
//! stage's handler type (a [`Call`]) and resource type, that of the
//! resource's constructor ([`no_resource`](super::child::no_resource) for
//! a stage without one) and that of the handler. The child adds them to
//! its own `anchor` and calls the trampoline with the other two.
//!
//! This is sound only if the child runs the very same executable image and
//! all three functions lie in it, which is checked on both sides:
//!
//! - the parent sends the distances only when all three addresses lie in a
//!   mapping of its executable file (not, say, in a dynamic library loaded
//!   at another base), read from `/proc/self/maps`;
//! - the child uses them only when its executable is the parent's: the same
//!   device, inode, size and modification time of `/proc/self/exe`.
//!
//! The child checks the mappings again on its side. The variables are set
//! only by the parent; whoever can set a process's environment can make it
//! run other code anyway (`LD_PRELOAD`).
//!
//! Otherwise the child falls through to `main`, and the builder's
//! `process_stage` call for the stage finds the handler by name (see the
//! module docs of [`crate::process`]). This module is the crate's only
//! `unsafe` code.
#![allow(unsafe_code)]

use std::os::unix::fs::MetadataExt;

use super::child::{Call, Init};

/// The fixed point distances are taken from.
#[inline(never)]
fn anchor() -> usize {
    std::hint::black_box(0x6265_7267)
}

/// The child's entry for a stage whose handler is an `F` with a resource
/// `R`: serves the handler at address `handler` with the constructor at
/// address `init` and never returns.
fn trampoline<R, F: Call<R>>(init: usize, handler: usize) -> ! {
    assert_eq!(
        std::mem::size_of::<F>(),
        std::mem::size_of::<usize>(),
        "a handler is a `fn` pointer"
    );
    // SAFETY: `init` and `handler` are the addresses of an `Init<R>` and of
    // an `F` in this very executable image: they were computed by
    // `Entry::of::<R, F>` in a parent running the same file (checked by
    // `same_executable`), and this trampoline was instantiated for the
    // same `R` and `F` there. `F` is a `fn` pointer type (`Call` is
    // implemented for nothing else, and its size was checked above), and
    // `fn` pointers and `usize` have the same size on every supported
    // target.
    let (init, handler) = unsafe {
        (
            std::mem::transmute::<usize, Init<R>>(init),
            std::mem::transmute_copy::<usize, F>(&handler),
        )
    };
    super::child::serve(init, handler)
}

/// Where a stage's constructor and handler are, as distances from
/// [`anchor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    trampoline: isize,
    init: isize,
    handler: isize,
}

impl Entry {
    /// The entry of `handler` with its resource's constructor `init`;
    /// `None` when an address is outside this executable's own mappings.
    pub(crate) fn of<R, F: Call<R>>(init: Init<R>, handler: F) -> Option<Entry> {
        let entry = Entry::unchecked(init, handler);
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let exe = executable_id()?;
        entry
            .addresses()
            .iter()
            .all(|a| in_executable(&maps, exe.ino, *a))
            .then_some(entry)
    }

    /// The same distances, computed without checking the mappings: for a
    /// child to compare a handler it holds with the one it was sent.
    pub(crate) fn unchecked<R, F: Call<R>>(init: Init<R>, handler: F) -> Entry {
        let base = anchor as fn() -> usize as usize;
        let distance = |address: usize| address.wrapping_sub(base) as isize;
        Entry {
            trampoline: distance(trampoline::<R, F> as fn(usize, usize) -> ! as usize),
            init: distance(init as usize),
            handler: distance(handler.address()),
        }
    }

    /// The addresses here: trampoline, constructor, handler.
    fn addresses(self) -> [usize; 3] {
        let base = anchor as fn() -> usize as usize;
        [self.trampoline, self.init, self.handler].map(|d| base.wrapping_add(d as usize))
    }

    /// As sent in the environment: `trampoline:init:handler`.
    pub(crate) fn to_env(self) -> String {
        format!("{}:{}:{}", self.trampoline, self.init, self.handler)
    }

    pub(crate) fn from_env(text: &str) -> Option<Entry> {
        let mut parts = text.split(':').map(|p| p.parse::<isize>().ok());
        let entry = Entry {
            trampoline: parts.next()??,
            init: parts.next()??,
            handler: parts.next()??,
        };
        parts.next().is_none().then_some(entry)
    }

    /// Serves the stage and never returns, if every address lies in this
    /// executable's mappings here too; returns otherwise.
    ///
    /// Call only in a child whose executable [`executable_id`] found equal
    /// to that of the parent that made this entry.
    pub(crate) fn serve(self) {
        let addresses = self.addresses();
        let Some(exe) = executable_id() else { return };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        if !addresses.iter().all(|a| in_executable(&maps, exe.ino, *a)) {
            return;
        }
        let [trampoline, init, handler] = addresses;
        // SAFETY: the parent made this entry with `Entry::of`, which checked
        // that every address lies in its executable's mappings, and the
        // caller checked that this process runs the same executable file;
        // the image is loaded whole at one base, so the same distances from
        // `anchor` give the same functions here (and they lie in this
        // executable's mappings, checked above): `trampoline::<R, F>` for
        // the stage's resource and handler types, which takes the
        // addresses of an `Init<R>` and of an `F`.
        let trampoline = unsafe { std::mem::transmute::<usize, fn(usize, usize) -> !>(trampoline) };
        trampoline(init, handler)
    }
}

/// Which executable file a process runs: `/proc/self/exe`'s device, inode,
/// size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExecutableId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// This process's executable file.
pub(crate) fn executable_id() -> Option<ExecutableId> {
    let m = std::fs::metadata("/proc/self/exe").ok()?;
    Some(ExecutableId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

impl ExecutableId {
    pub(crate) fn to_env(self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            self.dev, self.ino, self.size, self.mtime, self.mtime_nsec
        )
    }

    pub(crate) fn from_env(text: &str) -> Option<ExecutableId> {
        let mut parts = text.split(':');
        let id = ExecutableId {
            dev: parts.next()?.parse().ok()?,
            ino: parts.next()?.parse().ok()?,
            size: parts.next()?.parse().ok()?,
            mtime: parts.next()?.parse().ok()?,
            mtime_nsec: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(id)
    }
}

/// Whether `addr` lies in a mapping of the file with inode `ino`, per
/// `/proc/self/maps` (`start-end perms offset dev inode path`).
fn in_executable(maps: &str, ino: u64, addr: usize) -> bool {
    maps.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let Some((start, end)) = fields.next().and_then(|r| r.split_once('-')) else {
            return false;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            return false;
        };
        let inode = fields.nth(3).and_then(|i| i.parse::<u64>().ok());
        (start..end).contains(&addr) && inode == Some(ino)
    })
}

#[cfg(test)]
mod tests {
    use super::super::child::no_resource;
    use super::*;
    use crate::item::WorkItem;
    use crate::shape::Batch;

    type ItemFn<I, O> = fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>;

    fn double(item: WorkItem<u32>) -> anyhow::Result<WorkItem<u64>> {
        Ok(item.map(|n| n as u64 * 2))
    }

    fn open() -> anyhow::Result<u8> {
        Ok(0)
    }

    fn count(seen: &mut u8, item: WorkItem<u32>) -> anyhow::Result<WorkItem<u64>> {
        *seen += 1;
        Ok(item.map(u64::from))
    }

    fn sum(batch: Batch<u32>) -> anyhow::Result<Vec<anyhow::Result<u64>>> {
        Ok(batch
            .items()
            .iter()
            .map(|i| Ok(u64::from(i.data)))
            .collect())
    }

    #[test]
    fn entries_of_functions_in_the_executable_round_trip() {
        let double: ItemFn<u32, u64> = double;
        let entry = Entry::of(no_resource, double).expect("double is in the test executable");
        assert_eq!(Entry::from_env(&entry.to_env()), Some(entry));
        assert_eq!(Entry::unchecked(no_resource, double), entry);
        assert_eq!(Entry::from_env("1:2"), None);
        // Another instantiation is another entry.
        fn same(item: WorkItem<u32>) -> anyhow::Result<WorkItem<u32>> {
            Ok(item)
        }
        let same: ItemFn<u32, u32> = same;
        assert_ne!(Entry::unchecked(no_resource, same), entry);
        // So are a handler with a resource, and a batch handler.
        type CountFn = fn(&mut u8, WorkItem<u32>) -> anyhow::Result<WorkItem<u64>>;
        let with = Entry::of(open, count as CountFn).expect("in the test executable");
        assert_ne!(with, entry);
        assert_eq!(Entry::from_env(&with.to_env()), Some(with));
        type SumFn = fn(Batch<u32>) -> anyhow::Result<Vec<anyhow::Result<u64>>>;
        let batches = Entry::of(no_resource, sum as SumFn).expect("in the test executable");
        assert_ne!(batches, entry);
    }

    #[test]
    fn executable_ids_round_trip() {
        let id = executable_id().unwrap();
        assert_eq!(ExecutableId::from_env(&id.to_env()), Some(id));
        assert_eq!(ExecutableId::from_env("1:2:3"), None);
    }

    #[test]
    fn addresses_outside_the_executable_are_refused() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let ino = executable_id().unwrap().ino;
        let on_heap = Box::new(5u8);
        assert!(!in_executable(&maps, ino, &*on_heap as *const u8 as usize));
        assert!(in_executable(&maps, ino, anchor as fn() -> usize as usize));
    }
}
