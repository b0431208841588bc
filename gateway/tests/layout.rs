//! The gateway's import rule, checked on its sources (`src/lib.rs` states it): the core
//! (`gridsense-core`) at the bottom; then `config`, `platform`, `status`; then `store`; then
//! `report` (the assessment report gathered from the store and rendered); then the edges — `ingest`, `delivery`, `http`, `broker` — each importing only from the layers
//! below and its own folder, never from another edge; `app` above them, `cli` at the top.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::unwrap_used, clippy::indexing_slicing)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// The core's modules, re-exported under `crate::`.
const CORE: &[&str] = &[
    "assessment",
    "cluster",
    "batch",
    "calendar",
    "cases",
    "downlink",
    "geo",
    "health",
    "intake",
    "pipeline",
    "registry",
    "rules",
    "telemetry",
];

/// What a top-level module may import from `crate::` besides the core and itself.
fn allowed(module: &str) -> Option<&'static [&'static str]> {
    Some(match module {
        "config" | "platform" => &[],
        "status" => &["config"],
        "store" => &["config", "status"],
        "report" => &["config", "status", "store"],
        "ingest" | "delivery" | "http" | "broker" => {
            &["config", "status", "platform", "store", "report"]
        }
        "app" => &[
            "config", "status", "platform", "store", "report", "ingest", "delivery", "http",
            "broker",
        ],
        // The top, and the crate root that declares everything.
        "cli" | "lib" | "main" => return None,
        _ => &[],
    })
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first path segment of every `crate::` path in `code` (comments left out), including
/// each item of a `crate::{a::…, b, …}` group.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // `gridsense_crate::…` or `my_crate::…` are not this crate.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => items.push(std::mem::take(&mut item)),
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && c != ',' {
                    item.push(c);
                }
            }
            items.push(item);
            found.extend(items.iter().filter_map(|i| first_segment(i.trim())));
        } else if let Some(s) = first_segment(rest) {
            found.insert(s);
        }
    }
    found
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name != "self").then_some(name)
}

#[test]
fn no_module_imports_from_another_edge_or_from_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs").to_owned();
        let Some(allowed) = allowed(&module) else { continue };
        checked += 1;
        let code = std::fs::read_to_string(file).unwrap();
        for import in crate_imports(&code) {
            if import != module
                && !CORE.contains(&import.as_str())
                && !allowed.contains(&import.as_str())
            {
                broken.push(format!("{}: crate::{import}", relative.display()));
            }
        }
    }
    assert!(checked > 30, "only {checked} files checked: is the layout still src/<module>?");
    assert!(broken.is_empty(), "imports against the layering:\n{}", broken.join("\n"));
}

#[test]
fn the_parser_sees_grouped_and_inline_paths_and_skips_comments() {
    let code = "use crate::{\n    a::B,\n    c::{d, e::F},\n    g,\n};\nfn x() { crate::h::i(); }\n// crate::j\nuse gridsense_crate::k;\n";
    let found: Vec<String> = crate_imports(code).into_iter().collect();
    assert_eq!(found, ["a", "c", "g", "h"]);
}
