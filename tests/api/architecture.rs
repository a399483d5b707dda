//! The crate's layering, read from its sources: no import between top-level modules runs back
//! up (the module graph has no cycle), and only start-up names the kinds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its non-test code names as `crate::…`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            let top = relative.split('/').next().unwrap().trim_end_matches(".rs").to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere; comments name modules without importing them.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let names = graph.entry(top.clone()).or_default();
            for line in code.lines().map(|l| l.split("//").next().unwrap()) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String =
                        line[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if !name.is_empty() && name != top {
                        names.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// A path from `from` to `to`, if there is one.
fn path(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut queue = vec![vec![from.to_string()]];
    while let Some(route) = queue.pop() {
        let last = route.last().unwrap();
        for next in graph.get(last).into_iter().flatten() {
            if next == to {
                let mut found = route.clone();
                found.push(next.clone());
                return Some(found);
            }
            if seen.insert(next.clone()) {
                let mut longer = route.clone();
                longer.push(next.clone());
                queue.push(longer);
            }
        }
    }
    None
}

#[test]
fn no_import_runs_back_up() {
    let graph = imports();
    assert!(graph.len() > 10, "the sources were not read: {graph:?}");
    let mut cycles = Vec::new();
    for (module, names) in &graph {
        for name in names {
            if let Some(back) = path(&graph, name, module) {
                cycles.push(format!("{module} -> {}", back.join(" -> ")));
            }
        }
    }
    assert!(cycles.is_empty(), "imports that run back up:\n{}", cycles.join("\n"));
}

#[test]
fn only_start_up_names_the_kinds() {
    let graph = imports();
    let naming: Vec<&String> = graph.iter().filter(|(_, names)| names.contains("kinds")).map(|(m, _)| m).collect();
    assert_eq!(naming, ["startup"], "modules that import the kinds");
}
