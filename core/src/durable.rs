//! Files that must survive `kill -9`, for the server's state and a device's: written to a
//! temporary name, fsynced, renamed over the final name, and the directory fsynced — so a reader
//! sees the old file or the whole new one, never a torn write — and the content hash that catches
//! a damaged one. [`write_framed`] and [`read_framed`] keep a whole state in one such file,
//! `magic | format (u32 LE) | body | xxh3 of the body (u64 LE)`, so a torn, damaged or foreign
//! file is refused by name instead of being taken for something else.

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

/// Why a framed file cannot be read.
#[derive(Debug, Error)]
pub enum FramedError {
    /// The file system failed.
    #[error(transparent)]
    Io(#[from] DurableError),
    /// The file is damaged, foreign, or of another format.
    #[error("{path}: {reason}")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Writes `body` to `path` atomically and durably, framed by `magic`, `format` and its hash.
pub fn write_framed(path: &Path, magic: &[u8; 4], format: u32, body: &[u8]) -> Result<(), DurableError> {
    let hash = content_hash(&[body]).to_le_bytes();
    write_atomic(path, &[magic, &format.to_le_bytes(), body, &hash])
}

/// The body of the framed file at `path`, or `None` when there is no file; `what` names what the
/// file should hold, in errors.
pub fn read_framed(
    path: &Path,
    magic: &[u8; 4],
    format: u32,
    what: &str,
) -> Result<Option<Vec<u8>>, FramedError> {
    let damaged = |reason: String| FramedError::Damaged {
        path: path.display().to_string(),
        reason,
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io(path)(source).into()),
    };
    let header = magic.len() + 4;
    if bytes.len() < header + 8 || &bytes[..magic.len()] != magic {
        return Err(damaged(format!("not {what}")));
    }
    let mut found = [0u8; 4];
    found.copy_from_slice(&bytes[magic.len()..header]);
    let found = u32::from_le_bytes(found);
    if found != format {
        return Err(damaged(format!(
            "{what} in format {found}, not this build's ({format})"
        )));
    }
    let (body, tail) = bytes[header..].split_at(bytes.len() - header - 8);
    let mut hash = [0u8; 8];
    hash.copy_from_slice(tail);
    if content_hash(&[body]) != u64::from_le_bytes(hash) {
        return Err(damaged(
            "the checksum does not match (a torn or damaged file)".into(),
        ));
    }
    Ok(Some(body.to_vec()))
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

    #[test]
    fn a_framed_file_round_trips_and_a_damaged_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("shoal-framed-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("state.bin");
        assert!(
            read_framed(&path, b"TEST", 1, "a test file")
                .expect("no file")
                .is_none()
        );
        write_framed(&path, b"TEST", 1, b"body").expect("written");
        assert_eq!(
            read_framed(&path, b"TEST", 1, "a test file").expect("readable"),
            Some(b"body".to_vec())
        );
        let refused = |magic: &[u8; 4], format| {
            matches!(
                read_framed(&path, magic, format, "x"),
                Err(FramedError::Damaged { .. })
            )
        };
        assert!(refused(b"ELSE", 1));
        assert!(refused(b"TEST", 2));
        let mut bytes = fs::read(&path).expect("readable");
        bytes[9] ^= 1;
        fs::write(&path, &bytes).expect("damaged");
        assert!(refused(b"TEST", 1));
        fs::write(&path, &bytes[..6]).expect("truncated");
        assert!(refused(b"TEST", 1));
        fs::remove_dir_all(&dir).expect("removed");
    }
}
