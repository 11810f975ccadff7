//! MNIST from the original IDX files (gzipped or not).
//!
//! Expects `ROOT/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`. Pixels are scaled to
//! `[0, 1]` and standardised with MNIST's mean 0.1307 and standard deviation 0.3081; images come out
//! NHWC, `[28, 28, 1]`.

use super::{Dataset, TrainTest};
use crate::error::DataError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Image height.
pub const ROWS: usize = 28;
/// Image width.
pub const COLS: usize = 28;
const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
/// Mean pixel intensity of the MNIST training set, after scaling to [0, 1].
pub const PIXEL_MEAN: f32 = 0.1307;
/// Standard deviation of MNIST pixel intensities, after scaling to [0, 1].
pub const PIXEL_STD: f32 = 0.3081;
/// Largest file accepted, decompressed (the training images are 47 MB).
const MAX_FILE_BYTES: u64 = 256 << 20;

/// Loads the training and test sets from `root/mnist/`.
pub fn load(root: &Path) -> Result<TrainTest, DataError> {
    let dir = root.join("mnist");
    let train = load_split(&dir, "train", "mnist-train")?;
    let test = load_split(&dir, "t10k", "mnist-test")?;
    Ok(TrainTest {
        train,
        test,
        natural_partition: None,
    })
}

fn load_split(dir: &Path, prefix: &str, name: &str) -> Result<Dataset, DataError> {
    let images_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    load_idx_pair(&images_path, &labels_path, name)
}

/// Loads MNIST-format images and labels from a pair of IDX files (gzipped or not), standardised
/// as the module says — e.g. a device's own digits.
pub fn load_idx_pair(images_path: &Path, labels_path: &Path, name: &str) -> Result<Dataset, DataError> {
    let (dims, pixels) = parse_idx(images_path, IMAGES_MAGIC, 3)?;
    let (label_dims, labels) = parse_idx(labels_path, LABELS_MAGIC, 1)?;
    if dims[0] != label_dims[0] {
        return Err(DataError::Malformed {
            path: labels_path.to_path_buf(),
            reason: format!("{} labels for {} images", label_dims[0], dims[0]),
        });
    }
    if let Some(&bad) = labels.iter().find(|&&l| l > 9) {
        return Err(DataError::Malformed {
            path: labels_path.to_path_buf(),
            reason: format!("label {bad} is not a digit 0-9"),
        });
    }
    let features = pixels
        .iter()
        .map(|&p| (f32::from(p) / 255.0 - PIXEL_MEAN) / PIXEL_STD)
        .collect();
    let labels = labels.into_iter().map(u32::from).collect();
    Dataset::new(name, vec![dims[1], dims[2], 1], 10, features, labels)
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    if gz.is_file() {
        Ok(gz)
    } else if raw.is_file() {
        Ok(raw)
    } else {
        Err(DataError::Missing {
            what: format!("MNIST file {stem}(.gz)"),
            path: dir.to_path_buf(),
            hint: "point --data-dir (or SHOAL_DATA) at a folder whose mnist/ holds the four original \
                   IDX files, e.g. ../shared/data"
                .into(),
        })
    }
}

/// Reads an IDX file (transparently gunzipping it) and checks its header: magic, rank and that the
/// payload is exactly the product of the dimensions.
pub fn parse_idx(path: &Path, magic: u32, rank: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let malformed = |reason: String| DataError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut raw = Vec::new();
    file.take(MAX_FILE_BYTES).read_to_end(&mut raw).map_err(io)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(raw.as_slice())
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| malformed(format!("gzip stream is corrupt: {e}")))?;
        if out.len() as u64 > MAX_FILE_BYTES {
            return Err(malformed(format!(
                "decompresses to more than {MAX_FILE_BYTES} bytes"
            )));
        }
        out
    } else {
        raw
    };
    let header_len = 4 + 4 * rank;
    if bytes.len() < header_len {
        return Err(malformed(format!(
            "{} bytes is shorter than the {header_len}-byte IDX header",
            bytes.len()
        )));
    }
    let word =
        |i: usize| u32::from_be_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    if word(0) != magic {
        return Err(malformed(format!(
            "magic {:#010x}, expected {magic:#010x}",
            word(0)
        )));
    }
    let dims: Vec<usize> = (1..=rank).map(|i| word(i) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let payload = bytes.len() - header_len;
    if expected != Some(payload) || dims.contains(&0) {
        return Err(malformed(format!(
            "header dimensions {dims:?} do not match the {payload}-byte payload"
        )));
    }
    Ok((dims, bytes[header_len..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn write_split(dir: &Path, prefix: &str, n: u32, gzip: bool) {
        let pixels: Vec<u8> = (0..n * 4).map(|i| (i * 37 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (stem, bytes) in [
            (
                format!("{prefix}-images-idx3-ubyte"),
                idx(IMAGES_MAGIC, &[n, 2, 2], &pixels),
            ),
            (
                format!("{prefix}-labels-idx1-ubyte"),
                idx(LABELS_MAGIC, &[n], &labels),
            ),
        ] {
            if gzip {
                let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
                enc.write_all(&bytes).unwrap();
                std::fs::write(dir.join(format!("{stem}.gz")), enc.finish().unwrap()).unwrap();
            } else {
                std::fs::write(dir.join(stem), bytes).unwrap();
            }
        }
    }

    #[test]
    fn reads_gzipped_and_plain_idx() {
        for gzip in [true, false] {
            let root = tempfile::tempdir().unwrap();
            std::fs::create_dir(root.path().join("mnist")).unwrap();
            write_split(&root.path().join("mnist"), "train", 5, gzip);
            write_split(&root.path().join("mnist"), "t10k", 3, gzip);
            let data = load(root.path()).unwrap();
            assert_eq!(data.train.len(), 5);
            assert_eq!(data.test.len(), 3);
            assert_eq!(data.train.sample_shape(), &[2, 2, 1]);
            assert_eq!(data.train.labels(), &[0, 1, 2, 3, 4]);
            let first = (0.0 / 255.0 - PIXEL_MEAN) / PIXEL_STD;
            assert!((data.train.sample(0)[0] - first).abs() < 1e-6);
        }
    }

    #[test]
    fn missing_and_malformed_files_name_the_file() {
        let root = tempfile::tempdir().unwrap();
        let err = load(root.path()).unwrap_err().to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");

        let dir = root.path().join("mnist");
        std::fs::create_dir(&dir).unwrap();
        write_split(&dir, "train", 4, false);
        write_split(&dir, "t10k", 2, false);
        // Truncate the test images: header promises 2·2·2 pixels.
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte"),
            idx(IMAGES_MAGIC, &[2, 2, 2], &[1, 2, 3]),
        )
        .unwrap();
        let err = load(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte") && err.contains("do not match"),
            "{err}"
        );
        // Wrong magic.
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte"),
            idx(LABELS_MAGIC, &[2, 2, 2], &[0; 8]),
        )
        .unwrap();
        assert!(load(root.path()).unwrap_err().to_string().contains("magic"));
        // Corrupt gzip.
        std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
        assert!(load(root.path()).unwrap_err().to_string().contains("gzip"));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for len in 0..64u32 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
                .collect();
            std::fs::write(&path, &bytes).unwrap();
            let _ = parse_idx(&path, IMAGES_MAGIC, 3);
        }
        std::fs::write(&path, idx(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &[])).unwrap();
        assert!(parse_idx(&path, IMAGES_MAGIC, 3).is_err());
    }
}
