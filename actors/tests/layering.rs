//! The engine's layering rule (docs/architecture.md, "Layout"): every file
//! sits on one floor and imports only from its own floor or those below,
//! and no files import each other in a cycle of more than 2.
//!
//! Imports are read as `tools/modcycles.py` reads them: `crate::a::b` and
//! `super::a` paths (also inside `use crate::{..}` groups), outside
//! comments and `#[cfg(test)]` modules, resolved to the longest module path
//! that is a file. A file's own submodules are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floors, bottom up. A module path ending in `::*` places every file
/// below that directory.
const FLOORS: &[(&str, u8)] = &[
    // 1. The contract's data.
    ("clock", 1),
    ("config", 1),
    ("contain", 1),
    ("dead_letter", 1),
    ("error", 1),
    ("event", 1),
    ("item", 1),
    ("lineage", 1),
    ("outcome", 1),
    ("resource", 1),
    ("shape", 1),
    ("source", 1),
    ("stats", 1),
    ("timers", 1),
    // 2. Ports: traits over the data.
    ("ports", 2),
    // 3. Runners and worker processes.
    ("runner", 3),
    ("runner::*", 3),
    ("process", 3),
    ("process::*", 3),
    // 4. Actors, the blackboard and the accounting.
    ("batcher", 4),
    ("binding", 4),
    ("gauges", 4),
    ("metrics", 4),
    ("monitor", 4),
    ("root", 4),
    ("shared", 4),
    ("source_actor", 4),
    ("splitter", 4),
    ("stage", 4),
    ("stage::*", 4),
    ("tally", 4),
    ("tracker", 4),
    ("worker", 4),
    // 5. The front door.
    ("builder", 5),
    ("embed", 5),
    ("pipeline", 5),
    ("", 5), // lib.rs
];

const FLOOR_NAMES: [&str; 6] = [
    "",
    "data",
    "ports",
    "runners and worker processes",
    "actors",
    "front door",
];

type Module = Vec<String>;

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".to_string()
    } else {
        m.join("::")
    }
}

fn floor(m: &Module) -> Option<u8> {
    let path = m.join("::");
    FLOORS
        .iter()
        .find(|(p, _)| *p == path)
        .or_else(|| {
            FLOORS.iter().find(|(p, _)| {
                p.strip_suffix("::*")
                    .is_some_and(|dir| m.len() > 1 && m[..m.len() - 1].join("::") == dir)
            })
        })
        .map(|(_, f)| *f)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("a dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(root: &Path, file: &Path) -> Module {
    let rel = file
        .strip_prefix(root)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The text without line comments and without what follows the first
/// `#[cfg(test)]` (the tests module, by the crate's convention).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The lowercase path segments at the start of `s` (`a::b::C` gives
/// `[a, b]`), and whether a `{` group follows them.
fn segments(s: &str) -> (Vec<String>, Option<usize>) {
    let mut segs = Vec::new();
    let mut rest = s;
    loop {
        let rest_trim = rest.trim_start();
        if rest_trim.starts_with('{') {
            return (segs, Some(s.len() - rest_trim.len()));
        }
        let end = rest_trim
            .find(|c: char| !is_ident(c))
            .unwrap_or(rest_trim.len());
        let ident = &rest_trim[..end];
        if ident.is_empty() || !ident.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
            return (segs, None);
        }
        segs.push(ident.to_string());
        rest = &rest_trim[end..];
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => return (segs, None),
        }
    }
}

/// Every path named after `prefix` (`crate::` or `super::`), group members
/// expanded.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = code[at..].find(prefix) {
        let start = at + i;
        at = start + prefix.len();
        if start > 0 && code[..start].ends_with(is_ident) {
            continue;
        }
        expand(&code[at..], Vec::new(), &mut out);
    }
    out
}

fn expand(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let (segs, group) = segments(s);
    let mut path = base;
    path.extend(segs);
    match group {
        None => out.push(path),
        Some(open) => {
            // The members of `{ .. }`, split at top-level commas.
            let body = &s[open + 1..];
            let mut depth = 0;
            let mut member = 0;
            for (i, c) in body.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        expand(&body[member..i], path.clone(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&body[member..i], path.clone(), out);
                        member = i + 1;
                    }
                    _ => {}
                }
            }
        }
    }
}

struct Graph {
    modules: BTreeSet<Module>,
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

fn graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    files(&root, &mut list);
    let modules: BTreeSet<Module> = list.iter().map(|f| module_of(&root, f)).collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for file in &list {
        let m = module_of(&root, file);
        let text = code(&std::fs::read_to_string(file).expect("readable file"));
        let mut named = paths_after(&text, "crate::");
        let parent: Vec<String> = m[..m.len().saturating_sub(1)].to_vec();
        for p in paths_after(&text, "super::") {
            let mut full = parent.clone();
            full.extend(p);
            named.push(full);
        }
        for path in named {
            let Some(target) = (1..=path.len())
                .rev()
                .map(|k| path[..k].to_vec())
                .find(|prefix| modules.contains(prefix))
            else {
                continue;
            };
            // A module using itself or its own descendant is no import.
            if target == m || (!m.is_empty() && target.starts_with(&m)) {
                continue;
            }
            edges.entry(m.clone()).or_default().insert(target);
        }
    }
    Graph { modules, edges }
}

#[test]
fn every_engine_file_has_a_floor() {
    let g = graph();
    let missing: Vec<String> = g
        .modules
        .iter()
        .filter(|m| floor(m).is_none())
        .map(name)
        .collect();
    assert!(
        missing.is_empty(),
        "place these files on a floor in actors/tests/layering.rs and \
         docs/architecture.md (\"Layout\"): {missing:?}"
    );
}

#[test]
fn no_file_imports_from_a_floor_above_its_own() {
    let g = graph();
    let mut upward = Vec::new();
    for (from, targets) in &g.edges {
        let (Some(f), true) = (floor(from), !from.is_empty()) else {
            continue;
        };
        for to in targets {
            if let Some(t) = floor(to)
                && t > f
            {
                upward.push(format!(
                    "{} ({}) imports {} ({})",
                    name(from),
                    FLOOR_NAMES[f as usize],
                    name(to),
                    FLOOR_NAMES[t as usize]
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that run up a floor (docs/architecture.md, \"Layout\"):\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_import_cycle_is_larger_than_two_files() {
    let g = graph();
    let nodes: Vec<&Module> = g.modules.iter().collect();
    let index = |m: &Module| nodes.iter().position(|n| *n == m).expect("a module");
    let n = nodes.len();
    let mut adj = vec![Vec::new(); n];
    for (from, targets) in &g.edges {
        for to in targets {
            adj[index(from)].push(index(to));
        }
    }
    // Reachability (the graph is small): i and j share a cycle when each
    // reaches the other.
    let reach: Vec<Vec<bool>> = (0..n)
        .map(|start| {
            let mut seen = vec![false; n];
            let mut stack = adj[start].clone();
            while let Some(v) = stack.pop() {
                if !std::mem::replace(&mut seen[v], true) {
                    stack.extend(&adj[v]);
                }
            }
            seen
        })
        .collect();
    let mut largest: Vec<String> = Vec::new();
    for (i, from) in reach.iter().enumerate() {
        let cycle: Vec<String> = (0..n)
            .filter(|&j| j == i || (from[j] && reach[j][i]))
            .map(|j| name(nodes[j]))
            .collect();
        if cycle.len() > 1 && cycle.len() > largest.len() {
            largest = cycle;
        }
    }
    assert!(
        largest.len() <= 2,
        "an import cycle of {} files: {}",
        largest.len(),
        largest.join(", ")
    );
}

#[test]
fn the_reader_finds_imports_in_groups_and_super_paths() {
    // The parser itself: a group with nested members, and a path whose
    // last segment is a type.
    let paths = paths_after(
        "use crate::{item::WorkItem, runner::{hand::Hand, RunCtx}};\nlet x = crate::clock::now();",
        "crate::",
    );
    assert!(paths.contains(&vec!["item".to_string()]));
    assert!(paths.contains(&vec!["runner".to_string(), "hand".to_string()]));
    assert!(paths.contains(&vec!["runner".to_string()]));
    assert!(paths.contains(&vec!["clock".to_string(), "now".to_string()]));
    assert_eq!(code("a // crate::x\n#[cfg(test)]\nuse crate::y;"), "a ");
}
