//! `resources/openapi.yaml` and the router agree: the same (method, path) operations as
//! [`ROUTES`], every `$ref` resolves, every documented request example is accepted by
//! [`route`], and every Firecracker endpoint listed as unsupported answers 400.
//!
//! The document is read with a small indentation-based reader (no YAML crate): under the
//! top-level `paths:`, paths are the 2-space-indented keys and operations the 4-space-
//! indented method keys; request examples are one-line JSON `example:` values inside an
//! operation's `requestBody:`.

use std::collections::{BTreeMap, BTreeSet};

use api_server::router::{route, ROUTES};

/// The HTTP methods an OpenAPI path item can hold.
const METHODS: &[&str] = &[
    "get", "put", "patch", "post", "delete", "head", "options", "trace",
];

/// Firecracker's schema names that the document keeps.
const FIRECRACKER_SCHEMAS: &[&str] = &[
    "MachineConfiguration",
    "BootSource",
    "Drive",
    "PartialDrive",
    "NetworkInterface",
    "PartialNetworkInterface",
    "InstanceActionInfo",
    "Vm",
    "Logger",
    "Metrics",
    "InstanceInfo",
    "FirecrackerVersion",
    "FullVmConfiguration",
    "Error",
    "SnapshotCreateParams",
    "SnapshotLoadParams",
    "MemoryBackend",
    "NetworkOverride",
];

fn document() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/openapi.yaml");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The non-blank, non-comment lines of `doc` as (indentation, trimmed text, line number).
fn lines(doc: &str) -> Vec<(usize, &str, usize)> {
    doc.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let text = l.trim();
            if text.is_empty() || text.starts_with('#') {
                return None;
            }
            Some((l.len() - l.trim_start().len(), text, i + 1))
        })
        .collect()
}

/// The lines of the top-level section `name:`, without its header.
fn section<'a>(doc: &'a str, name: &str) -> Vec<(usize, &'a str, usize)> {
    let header = format!("{name}:");
    lines(doc)
        .into_iter()
        .skip_while(|&(indent, text, _)| !(indent == 0 && text == header))
        .skip(1)
        .take_while(|&(indent, _, _)| indent > 0)
        .collect()
}

/// The key of a `key:` or `key: value` line, unquoted; `None` for list items and lines
/// that are not mappings.
fn key(text: &str) -> Option<&str> {
    if text.starts_with("- ") {
        return None;
    }
    let k = match text.strip_suffix(':') {
        Some(k) => k,
        None => text.split_once(": ")?.0,
    };
    Some(k.trim().trim_matches(|c| c == '\'' || c == '"'))
}

/// The value of a `key: value` line, unquoted.
fn value(text: &str) -> Option<&str> {
    let v = text.split_once(": ")?.1.trim();
    Some(v.trim_matches(|c| c == '\'' || c == '"'))
}

/// One documented operation.
#[derive(Debug, Default)]
struct Operation {
    /// Whether it has a `requestBody`.
    has_body: bool,
    /// The one-line JSON `example:` of its request body.
    example: Option<String>,
}

/// The operations under `paths:`, by (METHOD, path).
fn operations(doc: &str) -> BTreeMap<(String, String), Operation> {
    let mut ops: BTreeMap<(String, String), Operation> = BTreeMap::new();
    let mut path: Option<String> = None;
    let mut current: Option<(String, String)> = None;
    let mut in_body = false;
    for (indent, text, line) in section(doc, "paths") {
        match indent {
            2 => {
                let k = key(text).unwrap_or_else(|| panic!("line {line}: expected a path key"));
                assert!(
                    k.starts_with('/'),
                    "line {line}: key '{k}' under paths does not start with '/'"
                );
                path = Some(k.to_owned());
                current = None;
                in_body = false;
            }
            4 => {
                in_body = false;
                current = None;
                let Some(k) = key(text).filter(|k| METHODS.contains(k)) else {
                    continue;
                };
                let p = path
                    .clone()
                    .unwrap_or_else(|| panic!("line {line}: method outside a path"));
                let op = (k.to_ascii_uppercase(), p);
                assert!(
                    !ops.contains_key(&op),
                    "line {line}: {} {} documented twice",
                    op.0,
                    op.1
                );
                ops.insert(op.clone(), Operation::default());
                current = Some(op);
            }
            6 => {
                in_body = key(text) == Some("requestBody");
                if let (true, Some(op)) = (in_body, &current) {
                    if let Some(o) = ops.get_mut(op) {
                        o.has_body = true;
                    }
                }
            }
            _ if in_body && key(text) == Some("example") => {
                if let Some(o) = current.as_ref().and_then(|op| ops.get_mut(op)) {
                    let v = text.split_once(": ").map(|(_, v)| v.trim().to_owned());
                    o.example = v;
                }
            }
            _ => {}
        }
    }
    ops
}

/// `kind/name` for every entry under `components:` (`schemas/Drive`, ...).
fn components(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut kind = None;
    for (indent, text, _) in section(doc, "components") {
        match (indent, key(text)) {
            (2, k) => kind = k,
            (4, Some(name)) => {
                if let Some(kind) = kind {
                    out.insert(format!("{kind}/{name}"));
                }
            }
            _ => {}
        }
    }
    out
}

/// The list under the top-level `x-skiff-unsupported-endpoints:`.
fn unsupported_endpoints(doc: &str) -> Vec<String> {
    section(doc, "x-skiff-unsupported-endpoints")
        .into_iter()
        .filter_map(|(_, text, _)| text.strip_prefix("- "))
        .map(|p| p.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
        .collect()
}

/// `pattern` with each `{name}` segment replaced by `body[name]` (a string), or by a
/// valid id when the body has no such field.
fn fill(pattern: &str, body: Option<&serde_json::Value>) -> String {
    pattern
        .split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => body
                    .and_then(|b| b.get(name))
                    .and_then(|v| v.as_str())
                    .unwrap_or("id_1")
                    .to_owned(),
                None => seg.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn reader_finds_the_document() {
    let doc = document();
    assert!(
        doc.starts_with("openapi: 3.0.3"),
        "not an OpenAPI 3.0.3 doc"
    );
    assert!(
        !operations(&doc).is_empty(),
        "no operation found under paths"
    );
    assert!(components(&doc).contains("schemas/Error"));
}

#[test]
fn operations_match_routes() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc).into_keys().collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let show = |s: Vec<&(String, String)>| {
        s.iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let undocumented = show(routed.difference(&documented).collect());
    let unrouted = show(documented.difference(&routed).collect());
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "openapi.yaml and router::ROUTES differ\n  in ROUTES, missing from openapi.yaml: \
         [{undocumented}]\n  in openapi.yaml, missing from ROUTES: [{unrouted}]"
    );
}

#[test]
fn refs_resolve() {
    let doc = document();
    let known = components(&doc);
    let mut refs = 0;
    for (_, text, line) in lines(&doc) {
        if key(text) != Some("$ref") && key(text.trim_start_matches("- ")) != Some("$ref") {
            continue;
        }
        let target = value(text).unwrap_or_default();
        let Some(local) = target.strip_prefix("#/components/") else {
            panic!("line {line}: $ref '{target}' is not a local #/components/ reference");
        };
        assert!(
            known.contains(local),
            "line {line}: $ref '{target}' has no target under components"
        );
        refs += 1;
    }
    assert!(refs > 0, "no $ref found: the reader is broken");
    let missing: Vec<&str> = FIRECRACKER_SCHEMAS
        .iter()
        .copied()
        .filter(|s| !known.contains(&format!("schemas/{s}")))
        .collect();
    assert!(
        missing.is_empty(),
        "Firecracker schemas missing: {missing:?}"
    );
}

#[test]
fn every_route_is_routable_with_its_documented_example() {
    let doc = document();
    let ops = operations(&doc);
    for r in ROUTES {
        let op = ops.get(&(r.method.to_owned(), r.path.to_owned()));
        let example = op.and_then(|o| o.example.as_deref());
        let body: Option<serde_json::Value> = example.map(|e| {
            serde_json::from_str(e).unwrap_or_else(|err| {
                panic!(
                    "{} {}: example is not one-line JSON ({err}): {e}",
                    r.method, r.path
                )
            })
        });
        let path = fill(r.path, body.as_ref());

        // Whatever the body, the path and method are known.
        for probe in [&b""[..], b"{}"] {
            if let Err(f) = route(r.method, &path, probe) {
                assert!(
                    f.status == 400,
                    "{} {path} with body {:?}: {} {}",
                    r.method,
                    String::from_utf8_lossy(probe),
                    f.status,
                    f.message
                );
            }
        }

        if r.method == "GET" {
            assert!(
                op.is_none_or(|o| !o.has_body),
                "GET {} documents a request body",
                r.path
            );
            if let Err(f) = route(r.method, &path, b"") {
                panic!("GET {path}: {} {}", f.status, f.message);
            }
            continue;
        }
        assert!(
            op.is_some_and(|o| o.has_body),
            "{} {}: openapi.yaml documents no requestBody",
            r.method,
            r.path
        );
        let Some(e) = example else {
            panic!(
                "{} {}: openapi.yaml has no one-line JSON `example:` in the requestBody",
                r.method, r.path
            );
        };
        if let Err(f) = route(r.method, &path, e.as_bytes()) {
            panic!(
                "{} {path}: the documented example {e} is refused: {} {}",
                r.method, f.status, f.message
            );
        }
    }
}

#[test]
fn unsupported_endpoints_answer_400() {
    let doc = document();
    let listed = unsupported_endpoints(&doc);
    assert!(
        !listed.is_empty(),
        "x-skiff-unsupported-endpoints is missing or empty"
    );
    let documented: BTreeSet<String> = operations(&doc).into_keys().map(|(_, p)| p).collect();
    for path in &listed {
        assert!(
            !documented.contains(path),
            "{path} is listed as unsupported and documented under paths"
        );
        for method in ["GET", "PUT", "PATCH"] {
            match route(method, path, b"{}") {
                Ok(r) => panic!("{method} {path}: routed to {r:?}, documented as unsupported"),
                Err(f) => assert!(
                    f.status == 400 && f.message.contains("not supported"),
                    "{method} {path}: {} {}",
                    f.status,
                    f.message
                ),
            }
        }
    }
}
