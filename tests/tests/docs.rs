//! The documentation is part of the product: what README.md and docs/ name must be real. Every
//! link resolves; every `make` target, agent/`sluicectl`/bench flag, alert, metric and
//! annotation they name exists (and every alert, metric and annotation that exists is
//! documented); the defaults they state are the code's; the README stays short.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_tests::bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md and every page under docs/, with their paths.
fn pages() -> Vec<(PathBuf, String)> {
    let mut out = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out.into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("page");
            (p, text)
        })
        .collect()
}

fn all_text() -> String {
    pages()
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join("\n")
}

fn page(name: &str) -> String {
    std::fs::read_to_string(repo().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every distinct match of `prefix` followed by characters in `chars`.
fn tokens(text: &str, prefix: &str, chars: impl Fn(char) -> bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let after = &rest[i + prefix.len()..];
        let end = after.find(|c: char| !chars(c)).unwrap_or(after.len());
        if end > 0 {
            out.insert(format!("{prefix}{}", &after[..end]));
        }
        rest = &rest[i + prefix.len()..];
    }
    out
}

fn help(args: &[&str]) -> String {
    let (binary, rest) = args.split_first().expect("binary");
    let out = Command::new(bin(binary))
        .args(rest)
        .arg("--help")
        .output()
        .expect("--help");
    assert!(out.status.success(), "{args:?} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_readme_is_short_and_every_link_resolves() {
    let readme = page("README.md");
    assert!(
        readme.lines().count() <= 250,
        "README.md has {} lines",
        readme.lines().count()
    );
    for want in ["make demo", "make test"] {
        assert!(readme.contains(want), "README lacks {want}");
    }
    for (path, text) in pages() {
        let dir = path.parent().expect("dir").to_owned();
        for link in tokens(&text, "](", |c| c != ')') {
            let target = link.trim_start_matches("](");
            if target.starts_with("http") {
                continue;
            }
            let file = target.split('#').next().unwrap_or_default();
            assert!(
                dir.join(file).exists(),
                "{}: link to {target} does not resolve",
                path.display()
            );
        }
    }
}

#[test]
fn every_make_target_and_flag_the_docs_name_exists() {
    let text = all_text();
    let makefile = page("Makefile");
    for target in tokens(&text, "`make ", |c| c.is_ascii_lowercase() || c == '-') {
        let name = target.trim_start_matches("`make ");
        assert!(
            makefile.lines().any(|l| l.starts_with(&format!("{name}:"))),
            "`make {name}` is not a Makefile target"
        );
    }
    let helps = [
        help(&["sluice-agent"]),
        help(&["sluice-agent", "install"]),
        help(&["sluicectl"]),
        help(&["sluicectl", "explain"]),
        help(&["sluice-bench"]),
    ]
    .join("\n");
    // Flags of other tools the pages quote (nsenter, ctr, kubectl, kubelet, helm, apt-get).
    let elsewhere = [
        "--net",
        "--base-name",
        "--previous",
        "--field-selector",
        "--allowed-unsafe-sysctls",
        "--create-namespace",
        "--namespace",
        "--set",
        "--download-only",
    ];
    for flag in tokens(&text, "--", |c| c.is_ascii_lowercase() || c == '-') {
        if flag.len() < 4 || elsewhere.contains(&flag.as_str()) {
            continue;
        }
        assert!(
            helps.contains(&format!("{flag} "))
                || helps.contains(&format!("{flag}\n"))
                || helps.contains(&format!("{flag}="))
                || helps.contains(&format!("{flag} <")),
            "{flag} is named in the docs but no binary takes it"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_section_and_every_metric_is_real_and_documented() {
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&page("manifests/monitoring/sluice.rules.yaml")).expect("rules");
    let alerts: BTreeSet<String> = rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    assert!(alerts.len() >= 9, "{alerts:?}");
    let runbook = page("docs/runbook.md");
    let monitoring = page("docs/monitoring.md");
    for alert in &alerts {
        assert!(
            runbook.contains(&format!("### {alert} (")),
            "docs/runbook.md has no section for {alert}"
        );
        assert!(
            monitoring.contains(&format!("`{alert}`")),
            "monitoring.md: {alert}"
        );
    }
    for named in tokens(&all_text(), "Sluice", |c| c.is_ascii_alphanumeric()) {
        assert!(
            alerts.contains(&named),
            "the docs name an alert that does not exist: {named}"
        );
    }
    // The metrics the agent registers (rendered with every label set they start with).
    let exposition = sluice::metrics::Metrics::new().render();
    let real: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next().map(str::to_owned))
        .collect();
    assert!(real.len() > 10, "{exposition}");
    let metric = |name: &str| {
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        real.contains(base)
    };
    for named in tokens(&all_text(), "sluice_", |c| {
        c.is_ascii_lowercase() || c == '_'
    }) {
        let named = named.trim_end_matches('_');
        // `sluice_proto`, `sluice_tests`: crate names, not metrics.
        if matches!(named, "sluice_proto" | "sluice_tests") {
            continue;
        }
        assert!(
            metric(named),
            "the docs name a metric the agent does not have: {named}"
        );
    }
    for have in &real {
        assert!(
            monitoring.contains(&format!("`{have}")),
            "docs/monitoring.md does not document {have}"
        );
    }
}

#[test]
fn every_annotation_is_documented_and_the_stated_defaults_are_the_codes() {
    let annotations = page("docs/annotations.md");
    let missing: Vec<&str> = sluice::model::plan::all_annotation_keys()
        .into_iter()
        .filter(|k| !annotations.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/annotations.md does not document: {missing:?}"
    );
    let install = page("docs/install.md");
    let timeout = sluice_proto::deadlines::PLUGIN_TIMEOUT.as_millis();
    for want in [
        format!("| `timeoutMs` | `{timeout}` |"),
        format!("| `agentSocket` | `{}` |", sluice::config::DEFAULT_SOCKET),
        format!("\"timeoutMs\": {timeout}"),
        format!(
            "`metrics-addr` (default `{}`)",
            sluice::metrics::DEFAULT_ADDR
        ),
    ] {
        assert!(
            install.contains(&want),
            "docs/install.md does not say {want}"
        );
    }
    let architecture = page("docs/architecture.md");
    let secs = sluice::node::reconcile::DEFAULT_INTERVAL.as_secs();
    assert!(
        architecture.contains(&format!("`--reconcile-interval` (default {secs} s)")),
        "architecture.md's reconcile interval"
    );
    assert!(
        architecture.contains(&format!(
            "bounded by {} s",
            sluice_proto::deadlines::KERNEL_STEP.as_secs()
        )),
        "architecture.md's kernel step bound"
    );
}
