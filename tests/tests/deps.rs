//! The arrows of DESIGN.md ("Crates and the direction of every arrow"), checked with `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Crate → the workspace crates and external crates it must never depend on.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "devices",
        &[
            "vmm",
            "api-server",
            "jailer",
            "kvm-ioctls",
            "kvm-bindings",
            "tests",
            "tools",
        ],
    ),
    (
        "api-server",
        &["vmm", "kvm-ioctls", "devices", "tests", "tools"],
    ),
    (
        "jailer",
        &["vmm", "devices", "api-server", "tests", "tools"],
    ),
    ("vmm", &["tests", "tools"]),
    (
        "tapdev",
        &[
            "vmm",
            "devices",
            "api-server",
            "jailer",
            "sandbox",
            "kvm-ioctls",
            "kvm-bindings",
            "tests",
            "tools",
        ],
    ),
    (
        "sandbox",
        &[
            "vmm",
            "devices",
            "api-server",
            "jailer",
            "kvm-ioctls",
            "kvm-bindings",
            "tests",
            "tools",
        ],
    ),
];

/// Production crates: only normal dependencies count, and they must not reach tests/ or tools/ at all.
const PRODUCTION: &[&str] = &[
    "vmm",
    "devices",
    "api-server",
    "jailer",
    "sandbox",
    "tapdev",
];

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// name → (package id, normal (non-dev, non-build) dependency names) for every package in the graph.
fn normal_graph(meta: &Value) -> (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>) {
    let mut names = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        names.insert(
            p["id"].as_str().unwrap_or_default().to_string(),
            p["name"].as_str().unwrap_or_default().to_string(),
        );
    }
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let id = node["id"].as_str().unwrap_or_default();
        let name = names.get(id).cloned().unwrap_or_default();
        let entry = deps.entry(name).or_default();
        for d in node["deps"].as_array().into_iter().flatten() {
            let normal = d["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal {
                if let Some(n) = names.get(d["pkg"].as_str().unwrap_or_default()) {
                    entry.insert(n.clone());
                }
            }
        }
    }
    let ids = names.into_iter().map(|(id, n)| (n, id)).collect();
    (ids, deps)
}

/// Every crate reachable from `root` through normal dependencies.
fn closure(deps: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(n) = todo.pop() {
        for d in deps.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

fn workspace_members(meta: &Value) -> BTreeSet<String> {
    let ids: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| ids.contains(p["id"].as_str().unwrap_or_default()))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn design_arrows_hold() {
    let meta = metadata();
    let members = workspace_members(&meta);
    for expected in ["vmm", "devices", "api-server", "sandbox", "tapdev", "tests"] {
        assert!(
            members.contains(expected),
            "workspace has no `{expected}` crate (members: {members:?})"
        );
    }
    let (_, deps) = normal_graph(&meta);
    let mut wrong = Vec::new();
    for (krate, never) in FORBIDDEN {
        if !members.contains(*krate) {
            continue; // jailer does not exist yet
        }
        let reach = closure(&deps, krate);
        for n in *never {
            if reach.contains(*n) {
                wrong.push(format!("{krate} → {n}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependency arrows that DESIGN.md forbids (normal deps, transitive): {wrong:?}"
    );
}

#[test]
fn production_crates_never_depend_on_tests_or_tools() {
    let meta = metadata();
    let members = workspace_members(&meta);
    let mut wrong = Vec::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().unwrap_or_default();
        if !PRODUCTION.contains(&name) || !members.contains(name) {
            continue;
        }
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dn = d["name"].as_str().unwrap_or_default();
            if dn == "tests" || dn == "tools" {
                wrong.push(format!(
                    "{name} → {dn} ({})",
                    d["kind"].as_str().unwrap_or("normal")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "production crates must not depend on tests/ or tools/ in any way: {wrong:?}"
    );
}
