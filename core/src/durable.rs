//! Files that must survive `kill -9`, for the server's state and a device's: written to a
//! temporary name, fsynced, renamed over the final name, and the directory fsynced — so a reader
//! sees the old file or the whole new one, never a torn write — and the content hash that catches
//! a damaged one.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use thiserror::Error;

/// The file system failed on `path`.
#[derive(Debug, Error)]
#[error("{path}: {source}")]
pub struct DurableError {
    /// The file or directory.
    pub path: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DurableError + '_ {
    move |source| DurableError {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `parts` back to back to `path` atomically and durably.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), DurableError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    {
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        for part in parts {
            file.write_all(part).map_err(io(&tmp))?;
        }
        file.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

/// Makes a directory's entries (a rename, a removal) durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A 64-bit content hash (xxh3), kept beside a file's bytes or in an index to catch damage.
pub fn content_hash(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in parts {
        h.update(part);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("shoal-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("state.bin");
        write_atomic(&path, &[b"first", b" version"]).expect("written");
        write_atomic(&path, &[b"second"]).expect("rewritten");
        assert_eq!(fs::read(&path).expect("readable"), b"second");
        assert!(!dir.join(".state.bin.tmp").exists());
        assert_eq!(content_hash(&[b"ab", b"c"]), content_hash(&[b"abc"]));
        assert_ne!(content_hash(&[b"abc"]), content_hash(&[b"abd"]));
        fs::remove_dir_all(&dir).expect("removed");
    }
}
