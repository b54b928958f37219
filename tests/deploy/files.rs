//! Reading the repository's deploy files: paths relative to the repository for messages, YAML
//! and JSON documents, and values at JSON pointers.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Kubernetes manifests.
pub(crate) fn k8s() -> PathBuf {
    repo().join("deploy/k8s")
}

/// `path` relative to the repository, for messages.
pub(crate) fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

pub(crate) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", rel(path)))
}

pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", rel(&d))) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every document of a YAML file (`---`-separated), as JSON values; empty documents dropped.
pub(crate) fn yaml_docs(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).map_err(|e| format!("{}: {e}", rel(path)))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

pub(crate) fn json_doc(path: &Path) -> Result<Value, String> {
    serde_json::from_str(&read(path)).map_err(|e| format!("{}: {e}", rel(path)))
}

pub(crate) fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

pub(crate) fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

pub(crate) fn str_list(value: &Value, pointer: &str) -> Vec<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut problems = Vec::new();
    let (mut yaml, mut json) = (0, 0);
    for path in files_under(&repo().join("deploy")) {
        if is_yaml(&path) {
            yaml += 1;
            match yaml_docs(&path) {
                Ok(docs) if docs.is_empty() => problems.push(format!("{}: empty", rel(&path))),
                Ok(docs) => {
                    // Kubernetes objects (and kustomizations) say what they are.
                    if path.starts_with(k8s()) {
                        for doc in docs {
                            if str_at(&doc, "/apiVersion").is_none()
                                || str_at(&doc, "/kind").is_none()
                            {
                                problems.push(format!(
                                    "{}: a document without apiVersion/kind",
                                    rel(&path)
                                ));
                            }
                        }
                    }
                }
                Err(e) => problems.push(e),
            }
        } else if path.extension().and_then(|e| e.to_str()) == Some("json") {
            json += 1;
            if let Err(e) = json_doc(&path) {
                problems.push(e);
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        yaml >= 10 && json >= 2,
        "deploy/: found only {yaml} YAML and {json} JSON files"
    );
}
