//! Model manifests: the name, size and sha256 of every file of a model, checked before load.
//!
//! A manifest is JSON (`shoal-model-manifest/1`). Entries describe files as they are stored:
//! for an encrypted model, the encrypted file's bytes. The manifest for `dir/x` sits beside it
//! as `dir/x.manifest.json` (the full file name plus a suffix, so `m.gguf` and `m.gguf.enc`
//! never share one).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ring::digest;
use serde::{Deserialize, Serialize};

/// The `format` field of every manifest this crate writes and reads.
pub const MANIFEST_FORMAT: &str = "shoal-model-manifest/1";
/// Appended to a file's name to find its manifest.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Largest manifest read (a manifest lists a few files; anything bigger is not one).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Read size when hashing files.
const HASH_BUF: usize = 1 << 20;

/// The files of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The model's id, if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The model's version, if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Every file, by name.
    pub files: Vec<FileEntry>,
}

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// The file's name (no directory part).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lower-case hex.
    pub sha256: String,
}

/// What is wrong with a manifest or with the files it describes.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A manifest or model file could not be read or written.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("manifest {} is not valid", path.display())]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// The parser's reason.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest declares a format this build does not read.
    #[error("manifest {} has format `{found}`, expected `{MANIFEST_FORMAT}`", path.display())]
    Format {
        /// The manifest.
        path: PathBuf,
        /// Its `format` field.
        found: String,
    },
    /// The manifest is well-formed JSON but its content is not usable.
    #[error("manifest {}: {reason}", path.display())]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file being loaded is not listed.
    #[error("manifest {} does not list `{name}`", manifest.display())]
    NotListed {
        /// The file's name.
        name: String,
        /// The manifest.
        manifest: PathBuf,
    },
    /// The file's size differs from the manifest's (a truncated or extended file).
    #[error(
        "{} is {actual} bytes but its manifest says {expected}: the file is truncated or altered",
        file.display()
    )]
    SizeMismatch {
        /// The file.
        file: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// The file's sha256 differs from the manifest's (an altered file).
    #[error(
        "{} has sha256 {actual} but its manifest says {expected}: the file is altered",
        file.display()
    )]
    HashMismatch {
        /// The file.
        file: PathBuf,
        /// Hash in the manifest.
        expected: String,
        /// Hash found.
        actual: String,
    },
}

impl Manifest {
    /// Describes `files` by hashing each (streaming, one buffer). Names are the files' names
    /// without their directories, and must be distinct.
    pub fn describe<P: AsRef<Path>>(
        files: &[P],
        model: Option<String>,
        version: Option<String>,
    ) -> Result<Self, ManifestError> {
        let mut entries = Vec::with_capacity(files.len());
        for path in files {
            let path = path.as_ref();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| ManifestError::Invalid {
                    path: path.to_path_buf(),
                    reason: "the file has no UTF-8 name".into(),
                })?
                .to_owned();
            let (sha256, size) = sha256_file(path)?;
            entries.push(FileEntry { name, size, sha256 });
        }
        let m = Self {
            format: MANIFEST_FORMAT.to_owned(),
            model,
            version,
            files: entries,
        };
        m.validate(Path::new("<new manifest>"))?;
        Ok(m)
    }

    /// Where the manifest of `file` sits: `<file>.manifest.json`.
    pub fn sidecar_path(file: &Path) -> PathBuf {
        let mut s = file.as_os_str().to_owned();
        s.push(MANIFEST_SUFFIX);
        PathBuf::from(s)
    }

    /// Reads and validates the manifest at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ManifestError> {
        let path = path.as_ref();
        let io = |source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut text = Vec::new();
        File::open(path)
            .map_err(io)?
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Invalid {
                path: path.to_path_buf(),
                reason: format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        Self::from_json(&text, path)
    }

    /// Parses and validates a manifest; `path` names it in errors.
    pub fn from_json(text: &[u8], path: &Path) -> Result<Self, ManifestError> {
        let m: Self = serde_json::from_slice(text).map_err(|source| ManifestError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<(), ManifestError> {
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                path: path.to_path_buf(),
                found: self.format.clone(),
            });
        }
        if self.files.is_empty() {
            return Err(invalid("it lists no files".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for e in &self.files {
            let plain = !e.name.is_empty()
                && e.name != "."
                && e.name != ".."
                && !e.name.contains(['/', '\\', '\0']);
            if !plain {
                return Err(invalid(format!(
                    "`{}` is not a plain file name",
                    e.name.escape_debug()
                )));
            }
            if !seen.insert(e.name.as_str()) {
                return Err(invalid(format!("`{}` is listed twice", e.name)));
            }
            let hex_ok = e.sha256.len() == 64
                && e.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(invalid(format!(
                    "the sha256 of `{}` is not 64 lower-case hex digits",
                    e.name
                )));
            }
        }
        Ok(())
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string_pretty(self).map_or_else(|_| String::new(), |s| s + "\n")
    }

    /// Writes the manifest to `path` (through a temporary file renamed into place).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), ManifestError> {
        let path = path.as_ref();
        let io = |source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        };
        crate::atomic_write(path, io, |f| {
            f.write_all(self.to_json().as_bytes()).map_err(io)
        })
    }

    /// The entry named `name`.
    pub fn entry(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|e| e.name == name)
    }

    /// The entry for `file` (matched by its name) in the manifest at `manifest_path`.
    pub fn entry_for(
        &self,
        file: &Path,
        manifest_path: &Path,
    ) -> Result<&FileEntry, ManifestError> {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.entry(&name).ok_or_else(|| ManifestError::NotListed {
            name,
            manifest: manifest_path.to_path_buf(),
        })
    }

    /// Checks every listed file in `dir` (streaming each from disk).
    pub fn verify_dir(&self, dir: &Path) -> Result<(), ManifestError> {
        for e in &self.files {
            let path = dir.join(&e.name);
            let size = std::fs::metadata(&path)
                .map_err(|source| ManifestError::Io {
                    path: path.clone(),
                    source,
                })?
                .len();
            e.check_size(&path, size)?;
            let (sha256, _) = sha256_file(&path)?;
            e.check_sha256(&path, &sha256)?;
        }
        Ok(())
    }
}

impl FileEntry {
    /// Refuses a size other than the recorded one.
    pub fn check_size(&self, file: &Path, actual: u64) -> Result<(), ManifestError> {
        if actual != self.size {
            return Err(ManifestError::SizeMismatch {
                file: file.to_path_buf(),
                expected: self.size,
                actual,
            });
        }
        Ok(())
    }

    /// Refuses a hash other than the recorded one (`actual` in lower-case hex).
    pub fn check_sha256(&self, file: &Path, actual: &str) -> Result<(), ManifestError> {
        // Both are public digests: a plain comparison leaks nothing.
        if actual != self.sha256 {
            return Err(ManifestError::HashMismatch {
                file: file.to_path_buf(),
                expected: self.sha256.clone(),
                actual: actual.to_owned(),
            });
        }
        Ok(())
    }

    /// Checks the size, then the hash, of `bytes` (the whole of `file`, e.g. its memory map).
    pub fn verify_bytes(&self, file: &Path, bytes: &[u8]) -> Result<(), ManifestError> {
        self.check_size(file, bytes.len() as u64)?;
        self.check_sha256(file, &hex::encode(digest::digest(&digest::SHA256, bytes)))
    }
}

/// A reader that hashes what passes through it, so a file is checked in the same pass that
/// consumes it.
pub struct HashingReader<R> {
    inner: R,
    ctx: digest::Context,
    len: u64,
}

impl<R> std::fmt::Debug for HashingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashingReader")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<R: Read> HashingReader<R> {
    /// Hashes what is read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            ctx: digest::Context::new(&digest::SHA256),
            len: 0,
        }
    }

    /// The sha256 (lower-case hex) and count of the bytes read so far.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.ctx.finish()), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.ctx.update(read);
        self.len += n as u64;
        Ok(n)
    }
}

/// The sha256 (lower-case hex) and size of the file at `path`, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<(String, u64), ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut r = HashingReader::new(File::open(path).map_err(io)?);
    let mut buf = vec![0u8; HASH_BUF];
    while r.read(&mut buf).map_err(io)? != 0 {}
    Ok(r.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn describe_then_verify_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", b"hello");
        let b = write(dir.path(), "b.gguf", &[7u8; 3 << 20]);
        let m = Manifest::describe(&[&a, &b], Some("m".into()), Some("1".into())).unwrap();
        assert_eq!(m.files[0].size, 5);
        assert_eq!(
            m.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let path = Manifest::sidecar_path(&a);
        assert!(path.ends_with("a.gguf.manifest.json"));
        m.write(&path).unwrap();
        let back = Manifest::load(&path).unwrap();
        assert_eq!(back, m);
        back.verify_dir(dir.path()).unwrap();
        back.entry_for(&b, &path).unwrap();
        let err = back.entry_for(Path::new("/x/c.gguf"), &path).unwrap_err();
        assert!(matches!(err, ManifestError::NotListed { ref name, .. } if name == "c.gguf"));
    }

    #[test]
    fn altered_and_truncated_files_are_named_with_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", b"hello world");
        let m = Manifest::describe(&[&a], None, None).unwrap();
        let e = &m.files[0];
        let err = e.verify_bytes(&a, b"hello worle").unwrap_err();
        let ManifestError::HashMismatch {
            file,
            expected,
            actual,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(file, &a);
        assert_eq!(expected, &e.sha256);
        assert_ne!(actual, &e.sha256);
        assert!(err.to_string().contains("a.gguf"));
        let err = e.verify_bytes(&a, b"hello").unwrap_err();
        assert!(matches!(
            err,
            ManifestError::SizeMismatch {
                expected: 11,
                actual: 5,
                ..
            }
        ));
        write(dir.path(), "a.gguf", b"hello");
        assert!(matches!(
            m.verify_dir(dir.path()),
            Err(ManifestError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn malformed_manifests_are_refused() {
        let p = Path::new("m.json");
        let ok = r#"{"format":"shoal-model-manifest/1","files":[{"name":"a","size":1,"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]}"#;
        Manifest::from_json(ok.as_bytes(), p).unwrap();
        let cases = [
            ("{", "Parse"),
            (r#"{"format":"x","files":[]}"#, "Format"),
            (
                r#"{"format":"shoal-model-manifest/1","files":[]}"#,
                "Invalid",
            ),
            (&ok.replace("\"a\"", "\"../a\""), "Invalid"),
            (&ok.replace("2cf2", "2CF2"), "Invalid"),
            (&ok.replace("\"size\":1", "\"size\":1,\"extra\":1"), "Parse"),
        ];
        for (text, want) in cases {
            let err = Manifest::from_json(text.as_bytes(), p).unwrap_err();
            let got = match err {
                ManifestError::Parse { .. } => "Parse",
                ManifestError::Format { .. } => "Format",
                ManifestError::Invalid { .. } => "Invalid",
                _ => "other",
            };
            assert_eq!(got, want, "{text}: {err}");
        }
        let twice = ok.replace(
            "}]}",
            r#"},{"name":"a","size":1,"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]}"#,
        );
        assert!(
            Manifest::from_json(twice.as_bytes(), p)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
