//! Checks of the test suite's reach, run with the host unit tests (the sources are here;
//! in the VM they are not): every crash point named anywhere in the workspace's sources
//! has a crash test in `tests/` (killed there in the VM, recovered, checked), and every
//! crash point of the engine is registered in `thinsnap_core::failpoint::POINTS`, which
//! the simulated-pool tests crash at one by one.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// The workspace's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no sources under {}", dir.display());
    out
}

/// The crash-point names in string literals of `files`: `"<op>.after-<step>"`.
fn points_in(files: &[PathBuf]) -> BTreeSet<String> {
    files
        .iter()
        .flat_map(|f| quoted_points(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

/// Quoted words of `[a-z0-9-]` with one `.after-` inside. Quotes are found by scanning for
/// `"` pairs on each line, so a point's name in any string literal counts.
fn quoted_points(text: &str) -> Vec<String> {
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    let mut out = Vec::new();
    for line in text.lines() {
        for part in line.split('"').skip(1).step_by(2) {
            if let Some((op, step)) = part.split_once(".after-") {
                if word(op) && word(step) {
                    out.push(part.to_string());
                }
            }
        }
    }
    out
}

fn sources() -> Vec<PathBuf> {
    let r = root();
    let mut files = rust_files(&r.join("src"));
    files.extend(rust_files(&r.join("core/src")));
    files.extend(rust_files(&r.join("thinpool/src")));
    files.retain(|f| !f.ends_with("src/coverage.rs"));
    files
}

#[test]
fn every_crash_point_has_a_crash_test_in_the_vm_suite() {
    let declared = points_in(&sources());
    assert!(declared.len() >= 40, "found only {declared:?}");
    let tested = points_in(&rust_files(&root().join("tests")));
    let missing: Vec<&String> = declared.difference(&tested).collect();
    assert!(
        missing.is_empty(),
        "crash points without a crash test in tests/: {missing:?}"
    );
}

#[test]
fn every_engine_crash_point_is_registered() {
    let mut files = rust_files(&root().join("core/src"));
    files.retain(|f| !f.ends_with("failpoint.rs"));
    let named = points_in(&files);
    let registered: BTreeSet<String> = thinsnap_core::failpoint::POINTS
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(named, registered, "core's sources vs failpoint::POINTS");
}
