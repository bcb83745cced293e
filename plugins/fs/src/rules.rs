//! Which paths of a folder are keys: ignore rules (`.convergeignore`, excludes, temp files,
//! conflict copies) and the mapping from a path to a validated [`Key`].

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use converge_api::Key;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::{CONFLICT_MARKER, IGNORE_FILE, MARKER_FILE, TEMP_PREFIX};

/// The ignore rules of one folder, loaded from its root.
#[derive(Clone, Debug)]
pub(crate) struct Rules {
    root: PathBuf,
    exclude: Vec<PathBuf>,
    gitignore: Option<Gitignore>,
    /// The hash of the ignore file's bytes the patterns were read from.
    read_from: Option<blake3::Hash>,
    /// Those bytes (see [`Rules::text`]).
    text: Option<Arc<[u8]>>,
}

impl Rules {
    /// Loads `.convergeignore` from `root` (a missing file means no patterns; a broken
    /// line is reported and skipped). `root` should be canonical.
    pub(crate) fn load(root: &Path, exclude: &[PathBuf]) -> Rules {
        let file = root.join(IGNORE_FILE);
        let bytes = read_ignore_file(root).unwrap_or_else(|e| {
            tracing::warn!("{}: {e}; no ignore rules from it", file.display());
            None
        });
        Rules::parse(root, exclude, bytes.as_deref())
    }

    /// The rules of the folder at `root` with the ignore file `bytes` (`None`: none) and
    /// the paths `exclude` (relative ones to `root`): those the folder was once in sync
    /// with (see [`crate::synced`]), or those read now ([`Rules::load`]).
    pub(crate) fn parse(root: &Path, exclude: &[PathBuf], bytes: Option<&[u8]>) -> Rules {
        let exclude = exclude
            .iter()
            .map(|p| {
                let p = if p.is_absolute() {
                    p.clone()
                } else {
                    root.join(p)
                };
                p.canonicalize().unwrap_or(p)
            })
            .collect();
        let file = root.join(IGNORE_FILE);
        let gitignore = bytes.and_then(|bytes| {
            let mut builder = GitignoreBuilder::new(root);
            // Line by line, as `GitignoreBuilder::add` reads a file: a broken line is
            // said and skipped.
            let mut text = bytes;
            while let Some(rest) = text.strip_prefix(b"\xEF\xBB\xBF") {
                text = rest;
            }
            for (n, line) in text.split(|b| *b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let added = match std::str::from_utf8(line) {
                    Ok(line) => builder
                        .add_line(Some(file.clone()), line)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = added {
                    tracing::warn!("{}, line {}: {e}", file.display(), n + 1);
                }
            }
            match builder.build() {
                Ok(g) => Some(g),
                Err(err) => {
                    tracing::warn!("ignoring {}: {err}", file.display());
                    None
                }
            }
        });
        Rules {
            root: root.to_owned(),
            exclude,
            gitignore,
            read_from: bytes.map(blake3::hash),
            text: bytes.map(Arc::from),
        }
    }

    /// The ignore file's bytes the rules were read from (`None`: there was none).
    pub(crate) fn text(&self) -> Option<&[u8]> {
        self.text.as_deref()
    }

    /// The hash of the ignore file's bytes the rules were read from (`None`: there was
    /// none), to tell whether it changed since (see [`ignore_file_hash`]).
    pub(crate) fn read_from(&self) -> Option<blake3::Hash> {
        self.read_from
    }

    /// The folder root the rules belong to.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `path` (under the root) is excluded from syncing. `parents` also applies
    /// patterns matching an ancestor directory (a walk prunes those already).
    pub(crate) fn ignores(&self, path: &Path, is_dir: bool, parents: bool) -> bool {
        if self.exclude.iter().any(|ex| path.starts_with(ex)) {
            return true;
        }
        let Some(rel) = relative(&self.root, path) else {
            return true;
        };
        let bytes = rel.as_os_str().as_bytes();
        if bytes.is_empty() {
            return false;
        }
        if is_only(rel, IGNORE_FILE) || is_only(rel, MARKER_FILE) {
            return true;
        }
        let mut names = names(bytes)
            .filter_map(|n| std::str::from_utf8(n).ok())
            .peekable();
        while let Some(name) = names.next() {
            if !parents && names.peek().is_some() {
                continue;
            }
            if name.starts_with(TEMP_PREFIX) || name.contains(CONFLICT_MARKER) {
                return true;
            }
        }
        match &self.gitignore {
            None => false,
            Some(g) if parents => g.matched_path_or_any_parents(rel, is_dir).is_ignore(),
            Some(g) => g.matched(rel, is_dir).is_ignore(),
        }
    }

    /// The key of `path` (under the root), or why it cannot be one (warned by callers).
    pub(crate) fn key_of(&self, path: &Path) -> Result<Key, String> {
        let rel = relative(&self.root, path)
            .ok_or_else(|| format!("{} is outside the folder", path.display()))?;
        let Some(s) = rel.to_str() else {
            return Err(format!(
                "skipping {}: the name is not UTF-8",
                path.display()
            ));
        };
        Key::new(s).map_err(|e| format!("skipping {}: {e}", path.display()))
    }

    /// The path of `key` under the root.
    pub(crate) fn path_of(&self, key: &Key) -> PathBuf {
        self.root.join(key.as_str())
    }
}

/// The bytes of the ignore file of the folder at `root`: a regular file only (through a
/// symlink too), opened without blocking, so that a FIFO or a device put there holds
/// nothing up; `None` when there is none to read.
fn read_ignore_file(root: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(root.join(IGNORE_FILE));
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// The hash of the ignore file's bytes now, as [`Rules::read_from`] has it for the bytes
/// the rules were read from (blocking). Quiet: [`Rules::load`] says why a file cannot
/// be read.
pub(crate) fn ignore_file_hash(root: &Path) -> Option<blake3::Hash> {
    read_ignore_file(root)
        .ok()
        .flatten()
        .as_deref()
        .map(blake3::hash)
}

/// Whether a directory between the folder's root and `path` is a symlink: then `path` is
/// not the folder's, whatever is found there (the scan and the watcher follow no
/// symlinks; a path below one comes from a watch on a directory since replaced by a link,
/// or is looked up through a link that replaced a directory). `real` holds directories
/// already found not to be symlinks, for a caller checking many paths. One that cannot be
/// looked at (removed meanwhile) counts as real.
pub(crate) fn below_symlink(root: &Path, path: &Path, real: &mut HashSet<PathBuf>) -> bool {
    let mut unchecked = Vec::new();
    let mut dir = path.parent();
    while let Some(d) = dir {
        let below = relative(root, d).is_some_and(|rel| !rel.as_os_str().is_empty());
        if !below || real.contains(d) {
            break;
        }
        unchecked.push(d);
        dir = d.parent();
    }
    // From the top down: a lookup below a symlink would go through it.
    for d in unchecked.into_iter().rev() {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() => return true,
            _ => {
                real.insert(d.to_owned());
            }
        }
    }
    false
}

/// `path` relative to `root`, as [`Path::strip_prefix`] gives it; `None` if it is not
/// under `root`. A path in normal form (what joining names to the root makes, as every
/// caller does) is cut as bytes: std's comparison by components was, with the rest of its
/// path handling, the largest part of the folder's own CPU time outside the kernel in a
/// profile of a 10,000-file sync.
fn relative<'p>(root: &Path, path: &'p Path) -> Option<&'p Path> {
    fast_relative(root, path).or_else(|| path.strip_prefix(root).ok())
}

/// `path` relative to `root` when both are in normal form (see [`is_normal`]; `root` not
/// `/`): then the bytes after `root` and a separator are exactly what
/// [`Path::strip_prefix`] returns. `None` when they are not, or when `path` does not start
/// with `root`'s bytes: [`relative`] asks std then.
fn fast_relative<'p>(root: &Path, path: &'p Path) -> Option<&'p Path> {
    let rest = path
        .as_os_str()
        .as_bytes()
        .strip_prefix(root.as_os_str().as_bytes())?;
    match rest.split_first() {
        None => Some(Path::new("")),
        Some((b'/', rel)) if is_normal(rel) => Some(Path::new(OsStr::from_bytes(rel))),
        _ => None,
    }
}

/// Whether relative path `rel` is in normal form: no empty or `.` names (so no doubled,
/// leading or trailing separator).
fn is_normal(rel: &[u8]) -> bool {
    rel.split(|b| *b == b'/')
        .all(|n| !n.is_empty() && n != b".")
}

/// Whether relative path `rel` is `name` alone (`rel == Path::new(name)`): compared as
/// bytes when `rel` is in normal form, by components otherwise.
fn is_only(rel: &Path, name: &str) -> bool {
    let bytes = rel.as_os_str().as_bytes();
    if is_normal(bytes) {
        bytes == name.as_bytes()
    } else {
        rel == Path::new(name)
    }
}

/// The names of relative path `rel`, as bytes: what [`Path::components`] gives as
/// [`std::path::Component::Normal`].
fn names(rel: &[u8]) -> impl Iterator<Item = &[u8]> {
    rel.split(|b| *b == b'/')
        .filter(|n| !matches!(*n, b"" | b"." | b".."))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Paths are cut below the root as `Path::strip_prefix` cuts them, as bytes when
    /// they are in normal form; odd forms are judged by their names.
    #[test]
    fn paths_are_cut_as_std_cuts_them() {
        let root = Path::new("/nonexistent/folder");
        let rules = Rules::load(root, &[]);
        let normal = ["", "/a", "/a/b.txt", "/a b/é/.x", "/a/..b", "/a/../b"];
        let odd = ["2/a", "//a", "/./a", "/a/", "/a/./b", "/a//b"];
        for (suffix, fast) in normal
            .iter()
            .map(|s| (s, true))
            .chain(odd.iter().map(|s| (s, false)))
        {
            let p = format!("/nonexistent/folder{suffix}");
            let path = Path::new(&p);
            let std = path.strip_prefix(root).ok().map(Path::as_os_str);
            assert_eq!(fast_relative(root, path).is_some(), fast, "{p}");
            assert_eq!(relative(root, path).map(Path::as_os_str), std, "{p}");
        }
        assert_eq!(relative(root, Path::new("/nonexistent")), None);
        assert_eq!(relative(root, Path::new("/other/folder/a")), None);
        assert!(rules.ignores(&root.join("a//.converge-tmp-1"), false, false));
        assert!(!rules.ignores(&root.join("a/../.convergeignore"), false, true));
        assert!(!rules.ignores(&root.join("a/./b"), false, false));
        assert!(rules.ignores(Path::new("/nonexistent/folder2/a"), false, true));
        assert!(!rules.ignores(root, true, true));
    }

    /// The ignore file is read line by line as `GitignoreBuilder::add` reads one: a BOM
    /// and CRLF endings are taken off, comments skipped, and a line that is not UTF-8
    /// skipped without losing the lines after it.
    #[test]
    fn the_ignore_file_is_read_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let mut file = b"\xEF\xBB\xBF*.log\r\n# a comment\r\nbuild/\n\xFF\xFE broken\n".to_vec();
        file.extend_from_slice(b"*.tmp\n!keep.tmp");
        std::fs::write(root.join(IGNORE_FILE), &file).unwrap();
        let rules = Rules::load(&root, &[]);
        let ignored = |p: &str, dir: bool| rules.ignores(&root.join(p), dir, true);
        assert!(ignored("a.log", false));
        assert!(ignored("build", true));
        assert!(ignored("build/x.rs", false));
        assert!(ignored("x.tmp", false));
        assert!(!ignored("keep.tmp", false));
        assert!(!ignored("# a comment", false));
        assert!(!ignored("src/main.rs", false));
        assert_eq!(rules.read_from(), Some(blake3::hash(&file)));
        assert_eq!(ignore_file_hash(&root), rules.read_from());
    }
}
