//! The house rules, checked on the source: in the agent, imports point one way between the
//! folders (`api`/`node` → `agent` → `kernel` → `model`); no crate of the workspace has an
//! import cycle between modules (a module and its own parent or child aside: a root file holds
//! its module's shared types); and no module is longer than ~500 lines before its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir` with its module path (`agent::attach`; the crate root is "").
fn modules(dir: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("source dir")
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name == "bin" {
                    continue;
                }
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut p = prefix.to_vec();
                if !matches!(stem, "mod" | "lib" | "main") {
                    p.push(stem.to_owned());
                }
                out.insert(p.join("::"), path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &[], &mut out);
    out
}

/// The code of a file before its tests, without comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    let before_tests = text.split("#[cfg(test)]").next().unwrap_or_default();
    before_tests
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `module` refers to through `crate::…` and `super::…` paths (each path resolved
/// to the longest module it names), `use` groups `{a, b::c}` expanded one level.
fn references(module: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = |m: &str| {
        m.rsplit_once("::")
            .map_or(String::new(), |(p, _)| p.to_owned())
    };
    let mut paths: Vec<Vec<String>> = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let start = rest.starts_with("crate::") || rest.starts_with("super::");
        let boundary = i == 0 || !ident(bytes[i - 1]);
        if !(start && boundary) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < bytes.len() && ident(bytes[j]) {
            j += 1;
        }
        let path: String = bytes[i..j].iter().collect();
        let mut segs: Vec<String> = path
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let mut base: Vec<String> = Vec::new();
        if segs.first().map(String::as_str) == Some("super") {
            let mut m = module.to_owned();
            while segs.first().map(String::as_str) == Some("super") {
                m = parent(&m);
                segs.remove(0);
            }
            base.extend(m.split("::").filter(|s| !s.is_empty()).map(str::to_owned));
        } else {
            segs.remove(0);
        }
        let mut full = base;
        full.extend(segs);
        // A group: `path::{a, b::c}` refers to each item, not to `path` itself.
        if j < bytes.len() && bytes[j] == '{' {
            let close = bytes[j..]
                .iter()
                .position(|&c| c == '}')
                .map_or(j, |p| j + p);
            let group: String = bytes[j + 1..close].iter().collect();
            for item in group.split(',') {
                let mut p = full.clone();
                p.extend(
                    item.trim()
                        .split("::")
                        .filter(|s| !s.is_empty() && *s != "self")
                        .map(str::to_owned),
                );
                paths.push(p);
            }
        } else {
            paths.push(full);
        }
        i = j;
    }
    paths
        .into_iter()
        .filter_map(|p| {
            (0..=p.len())
                .rev()
                .map(|n| p[..n].join("::"))
                .find(|m| known.contains(m))
        })
        .filter(|m| m != module)
        .collect()
}

fn is_ancestor(a: &str, b: &str) -> bool {
    a.is_empty() || b.starts_with(&format!("{a}::"))
}

/// A cycle between modules of one crate, ignoring parent/child edges, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_owned(), 1);
        stack.push(m.to_owned());
        for n in graph.get(m).into_iter().flatten() {
            if is_ancestor(m, n) || is_ancestor(n, m) {
                continue;
            }
            match state.get(n.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == n).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(n.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(n, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(m, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(dir);
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    mods.iter()
        .map(|(m, path)| (m.clone(), references(m, &code(path), &known)))
        .collect()
}

#[test]
fn no_crate_has_an_import_cycle() {
    for krate in [
        "daemon/src",
        "cni-plugin/src",
        "bench/src",
        "tests/src",
        "proto/src",
    ] {
        let g = graph(&repo().join(krate));
        assert!(g.len() > 1 || krate == "proto/src", "{krate}: {g:?}");
        if let Some(c) = cycle(&g) {
            panic!("{krate}: import cycle {}", c.join(" → "));
        }
    }
}

#[test]
fn the_agents_folders_import_one_way() {
    // What each folder (or top-level file) of daemon/src may import from the others.
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("model", &[][..]),
        ("kernel", &["model"][..]),
        ("agent", &["kernel", "model", "metrics"][..]),
        ("node", &["agent", "kernel", "model", "metrics"][..]),
        ("api", &["agent", "metrics"][..]),
        ("metrics", &["model"][..]),
        ("logging", &["config"][..]),
        ("config", &["kernel", "model", "node", "metrics"][..]),
        (
            "run",
            &["agent", "api", "config", "kernel", "metrics", "node"][..],
        ),
    ]);
    let mut wrong = Vec::new();
    for (module, refs) in graph(&repo().join("daemon/src")) {
        let folder = module.split("::").next().unwrap_or_default();
        if folder.is_empty() {
            continue;
        }
        let Some(may) = allowed.get(folder) else {
            wrong.push(format!("{module}: a folder the house does not know"));
            continue;
        };
        for r in refs {
            let to = r.split("::").next().unwrap_or_default();
            if to != folder && !may.contains(&to) {
                wrong.push(format!("{module} → {r}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the house's direction: {wrong:#?}"
    );
}

#[test]
fn no_module_is_longer_than_about_500_lines_before_its_tests() {
    let mut long = Vec::new();
    for krate in ["daemon/src", "cni-plugin/src"] {
        for path in modules(&repo().join(krate)).into_values() {
            if path.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let lines = text
                .lines()
                .take_while(|l| !l.starts_with("#[cfg(test)]"))
                .count();
            if lines > 520 {
                long.push(format!("{}: {lines}", path.display()));
            }
        }
    }
    assert!(long.is_empty(), "{long:?}");
}
