//! The shape of the source tree: no import cycle between the top-level
//! modules, none between the files of a folder either, and no source file
//! far past 600 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → the top-level modules its non-test code names.
fn dependencies(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("name");
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if top == "main" || top == "lib" || name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let used: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !used.is_empty() && used != top {
                deps.entry(top.clone()).or_default().insert(used);
            }
        }
    }
    deps
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let deps = dependencies(&src);
    assert!(
        deps.contains_key("cni"),
        "the scan found the modules: {deps:?}"
    );
    assert_acyclic(&deps, String::clone);
}

/// Fails, naming the path, when some node of `deps` reaches itself.
fn assert_acyclic<T: Ord + Clone>(deps: &BTreeMap<T, BTreeSet<T>>, name: impl Fn(&T) -> String) {
    for start in deps.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<(T, Vec<String>)> = deps[start]
            .iter()
            .map(|d| (d.clone(), vec![name(start), name(d)]))
            .collect();
        while let Some((m, path)) = todo.pop() {
            assert!(&m != start, "import cycle: {}", path.join(" -> "));
            if !seen.insert(m.clone()) {
                continue;
            }
            for d in deps.get(&m).into_iter().flatten() {
                let mut p = path.clone();
                p.push(name(d));
                todo.push((d.clone(), p));
            }
        }
    }
}

/// A module path, `["converge", "record"]` for `src/converge/record.rs`.
type Module = Vec<String>;

/// Every module file of non-test code under `src`, by module path.
fn module_files(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src").with_extension("");
        let mut m: Module = rel
            .components()
            .filter_map(|c| c.as_os_str().to_str().map(String::from))
            .collect();
        if m.last().is_some_and(|l| l == "mod") {
            m.pop();
        }
        let last = m.last().cloned().unwrap_or_default();
        if m == ["lib"] || m == ["main"] || last == "tests" || last.ends_with("_tests") {
            continue;
        }
        out.insert(m, f);
    }
    out
}

/// The non-test code of a file, without line comments.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths of a `use` tree, `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn use_paths(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let head = tree.split(" as ").next().unwrap_or_default().trim();
        out.push(format!("{prefix}{head}"));
        return;
    };
    let Some(close) = tree.rfind('}') else {
        return;
    };
    let head = format!("{prefix}{}", &tree[..open]);
    let (mut depth, mut start) = (0, open + 1);
    for (i, ch) in tree.char_indices().take(close).skip(open + 1) {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                use_paths(&head, &tree[start..i], out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !tree[start..close].trim().is_empty() {
        use_paths(&head, &tree[start..close], out);
    }
}

/// Every path a file names: its `use` trees and the `a::b` paths in its code.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    let mut body = String::new();
    while let Some(at) = rest.find("use ") {
        let word_start = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
        body.push_str(&rest[..at]);
        let after = &rest[at + 4..];
        match (word_start, after.find(';')) {
            (true, Some(end)) if !after[..end].contains('"') => {
                use_paths("", &after[..end].replace('\n', " "), &mut paths);
                rest = &after[end + 1..];
            }
            _ => {
                body.push_str("use ");
                rest = after;
            }
        }
    }
    body.push_str(rest);
    let mut out: Vec<Vec<String>> = paths
        .iter()
        .map(|p| p.split("::").map(|s| s.trim().to_string()).collect())
        .collect();
    let chars: Vec<char> = body.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        if !ident(chars[i]) || (i > 0 && (ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < chars.len() && ident(chars[j]) {
                j += 1;
            }
            segs.push(chars[s..j].iter().collect::<String>());
            if j + 2 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' && ident(chars[j + 2])
            {
                j += 2;
            } else {
                break;
            }
        }
        if segs.len() > 1 {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
    out
}

/// File → the files its non-test code names. A file's own folder modules
/// (its `mod.rs` and those above) are not counted: the folder holds the
/// file, as the `mod` line itself does.
fn file_dependencies(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = module_files(src);
    let mut deps = BTreeMap::new();
    for (m, path) in &files {
        let children: BTreeSet<&str> = files
            .keys()
            .filter(|k| k.len() == m.len() + 1 && k.starts_with(m))
            .filter_map(|k| k.last().map(String::as_str))
            .collect();
        let mut found = BTreeSet::new();
        for p in named_paths(&code_of(path)) {
            let (mut base, mut rest): (Module, &[String]) = match p[0].as_str() {
                "crate" => (Vec::new(), &p[1..]),
                "self" => (m.clone(), &p[1..]),
                "super" => (m[..m.len().saturating_sub(1)].to_vec(), &p[1..]),
                c if children.contains(c) => (m.clone(), &p[..]),
                _ => continue,
            };
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            let mut best = files.contains_key(&base).then(|| base.clone());
            for seg in rest {
                base.push(seg.clone());
                if !files.contains_key(&base) {
                    break;
                }
                best = Some(base.clone());
            }
            if let Some(b) = best.filter(|b| b != m && !m.starts_with(b)) {
                found.insert(b);
            }
        }
        deps.insert(m.clone(), found);
    }
    deps
}

#[test]
fn no_import_cycle_between_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let deps = file_dependencies(&src);
    let name = |m: &Module| m.join("::");
    let edge = |a: &str, b: &str| {
        deps.iter()
            .any(|(k, v)| name(k) == a && v.iter().any(|d| name(d) == b))
    };
    // The scan sees what it must: a file naming a sibling, a child, and
    // another folder's file (if these fail, the scanner broke, not the tree).
    assert!(edge("converge", "converge::record"), "{deps:?}");
    assert!(edge("converge::finish", "converge::report"), "{deps:?}");
    assert!(edge("converge::facts", "state"), "{deps:?}");
    assert!(edge("converge::record", "datastore::snapshot"), "{deps:?}");
    assert_acyclic(&deps, |m| name(m));
}

#[test]
fn source_files_stay_near_600_lines() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).expect("read").lines().count();
            (n > 650).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}
