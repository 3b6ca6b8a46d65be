//! How a child finds a Process stage's handler before `main` builds the
//! pipeline: by its address.
//!
//! The parent starts its own executable again, so every function sits at
//! the same distance from any other one in the child as in the parent (the
//! image is loaded whole at one random base). The parent sends two
//! distances from [`anchor`]: that of [`trampoline`], instantiated for the
//! stage's input and output types, and that of the handler. The child adds
//! them to its own `anchor` and calls the trampoline with the handler.
//!
//! This is sound only if the child runs the very same executable image and
//! both functions lie in it, which is checked on both sides:
//!
//! - the parent sends the distances only when both addresses lie in a
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

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::item::WorkItem;

/// A Process stage's handler.
pub(crate) type Handler<I, O> = fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>;

/// The fixed point distances are taken from.
#[inline(never)]
fn anchor() -> usize {
    std::hint::black_box(0x6265_7267)
}

/// The child's entry for a stage from `I` to `O`: serves `handler` (an
/// address of a [`Handler<I, O>`]) and never returns.
fn trampoline<I, O>(handler: usize) -> !
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    // SAFETY: `handler` is the address of a `Handler<I, O>` in this very
    // executable image: it was computed by `Entry::of::<I, O>` in a parent
    // running the same file (checked by `same_executable`), and this
    // trampoline was instantiated for the same `I` and `O` there. `fn`
    // pointers and `usize` have the same size on every supported target.
    let handler: Handler<I, O> = unsafe { std::mem::transmute::<usize, Handler<I, O>>(handler) };
    super::child::serve(handler)
}

/// Where a stage's handler is, as distances from [`anchor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    trampoline: isize,
    handler: isize,
}

impl Entry {
    /// The entry of `handler`, a stage from `I` to `O`; `None` when either
    /// address is outside this executable's own mappings.
    pub(crate) fn of<I, O>(handler: Handler<I, O>) -> Option<Entry>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
    {
        let trampoline = trampoline::<I, O> as fn(usize) -> ! as usize;
        let handler = handler as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let exe = executable_id()?;
        if !in_executable(&maps, exe.ino, trampoline) || !in_executable(&maps, exe.ino, handler) {
            return None;
        }
        let base = anchor as fn() -> usize as usize;
        Some(Entry {
            trampoline: trampoline.wrapping_sub(base) as isize,
            handler: handler.wrapping_sub(base) as isize,
        })
    }

    /// The same distances, computed without checking the mappings: for a
    /// child to compare a handler it holds with the one it was sent.
    pub(crate) fn unchecked<I, O>(handler: Handler<I, O>) -> Entry
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
    {
        let base = anchor as fn() -> usize as usize;
        Entry {
            trampoline: (trampoline::<I, O> as fn(usize) -> ! as usize).wrapping_sub(base) as isize,
            handler: (handler as usize).wrapping_sub(base) as isize,
        }
    }

    /// As sent in the environment: `trampoline:handler`.
    pub(crate) fn to_env(self) -> String {
        format!("{}:{}", self.trampoline, self.handler)
    }

    pub(crate) fn from_env(text: &str) -> Option<Entry> {
        let (t, h) = text.split_once(':')?;
        Some(Entry {
            trampoline: t.parse().ok()?,
            handler: h.parse().ok()?,
        })
    }

    /// Serves the stage and never returns, if both addresses lie in this
    /// executable's mappings here too; returns otherwise.
    ///
    /// Call only in a child whose executable [`executable_id`] found equal
    /// to that of the parent that made this entry.
    pub(crate) fn serve(self) {
        let base = anchor as fn() -> usize as usize;
        let trampoline = base.wrapping_add(self.trampoline as usize);
        let handler = base.wrapping_add(self.handler as usize);
        let Some(exe) = executable_id() else { return };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        if !in_executable(&maps, exe.ino, trampoline) || !in_executable(&maps, exe.ino, handler) {
            return;
        }
        // SAFETY: the parent made this entry with `Entry::of`, which checked
        // that both addresses lie in its executable's mappings, and the
        // caller checked that this process runs the same executable file;
        // the image is loaded whole at one base, so the same distances from
        // `anchor` give the same functions here (and they lie in this
        // executable's mappings, checked above): `trampoline::<I, O>` for
        // the stage's types, which takes a `Handler<I, O>` address.
        let trampoline = unsafe { std::mem::transmute::<usize, fn(usize) -> !>(trampoline) };
        trampoline(handler)
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
    use super::*;

    fn double(item: WorkItem<u32>) -> anyhow::Result<WorkItem<u64>> {
        Ok(item.map(|n| n as u64 * 2))
    }

    #[test]
    fn entries_of_functions_in_the_executable_round_trip() {
        let entry = Entry::of::<u32, u64>(double).expect("double is in the test executable");
        assert_eq!(Entry::from_env(&entry.to_env()), Some(entry));
        assert_eq!(Entry::unchecked::<u32, u64>(double), entry);
        // Another instantiation is another entry.
        fn same(item: WorkItem<u32>) -> anyhow::Result<WorkItem<u32>> {
            Ok(item)
        }
        assert_ne!(Entry::unchecked::<u32, u32>(same), entry);
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
