//! The kustomizations under `deploy/`: the objects they produce, the files their generators read,
//! and that every manifest is listed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::files::{files_under, is_yaml, rel, repo, str_at, str_list, yaml_docs};

/// A Kubernetes object from a kustomization, with the file it came from.
#[derive(Debug)]
pub(crate) struct Object {
    pub(crate) file: PathBuf,
    pub(crate) value: Value,
}

impl Object {
    pub(crate) fn kind(&self) -> &str {
        str_at(&self.value, "/kind").unwrap_or("")
    }
    pub(crate) fn name(&self) -> &str {
        str_at(&self.value, "/metadata/name").unwrap_or("")
    }
    pub(crate) fn at(&self) -> String {
        format!("{} ({} {})", rel(&self.file), self.kind(), self.name())
    }
}

/// A kustomization's objects: its resource files, and those of the kustomizations it includes.
pub(crate) fn kustomize_objects(dir: &Path) -> Vec<Object> {
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml")).unwrap()[0];
    let mut objects = Vec::new();
    for resource in str_list(kustomization, "/resources") {
        let path = dir.join(&resource);
        if path.is_dir() {
            objects.extend(kustomize_objects(&path));
        } else {
            for value in yaml_docs(&path).unwrap() {
                objects.push(Object {
                    file: path.clone(),
                    value,
                });
            }
        }
    }
    objects
}

pub(crate) fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("deploy/k8s: no {kind} named `{name}`"))
}

/// The files a `configMapGenerator`/`secretGenerator` entry reads: `files` (`key=path` or
/// `path`) and `envs`.
pub(crate) fn generator_files(entry: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in str_list(entry, "/files") {
        let (key, path) = match file.split_once('=') {
            Some((k, p)) => (k.to_string(), p.to_string()),
            None => (
                Path::new(&file)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                file.clone(),
            ),
        };
        out.push((key, path));
    }
    for env in str_list(entry, "/envs") {
        out.push((String::new(), env));
    }
    out
}

#[test]
fn kustomizations_list_files_that_exist_and_every_manifest_is_listed() {
    let mut problems = Vec::new();
    let kustomizations: Vec<PathBuf> = files_under(&repo().join("deploy"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert!(!kustomizations.is_empty(), "deploy/: no kustomization.yaml");
    for path in &kustomizations {
        let dir = path.parent().unwrap();
        let k = &yaml_docs(path).unwrap()[0];
        let mut listed = BTreeSet::new();
        for resource in str_list(k, "/resources") {
            let target = dir.join(&resource);
            if target.is_dir() {
                if !target.join("kustomization.yaml").is_file() {
                    problems.push(format!(
                        "{}: resource `{resource}` is a folder without kustomization.yaml",
                        rel(path)
                    ));
                }
            } else if !target.is_file() {
                problems.push(format!(
                    "{}: resource `{resource}` does not exist",
                    rel(path)
                ));
            }
            listed.insert(target);
        }
        for section in ["/configMapGenerator", "/secretGenerator"] {
            for entry in k
                .pointer(section)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for (_, file) in generator_files(entry) {
                    let target = dir.join(&file);
                    // kustomize only reads generator files inside the kustomization's folder.
                    if file.starts_with("..") || file.starts_with('/') {
                        problems.push(format!(
                            "{}: generator file `{file}` is outside the kustomization",
                            rel(path)
                        ));
                    } else if !target.is_file() {
                        problems.push(format!(
                            "{}: generator file `{file}` does not exist",
                            rel(path)
                        ));
                    }
                    listed.insert(target);
                }
            }
        }
        for patch in k
            .pointer("/patches")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(file) = str_at(patch, "/path") {
                if !dir.join(file).is_file() {
                    problems.push(format!("{}: patch `{file}` does not exist", rel(path)));
                }
                listed.insert(dir.join(file));
            }
        }
        // A manifest next to the kustomization that it forgets would silently not be deployed.
        for file in std::fs::read_dir(dir).unwrap() {
            let file = file.unwrap().path();
            let is_manifest = is_yaml(&file) && file != *path;
            if is_manifest && !listed.contains(&file) {
                problems.push(format!("{}: `{}` is not listed", rel(path), rel(&file)));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
