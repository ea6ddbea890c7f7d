//! Identity key files: one line of 64 hex characters (the secp256k1 secret), created with mode
//! 0600 and never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::keys::{KeyError, KeyPair};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} does not hold 64 hex characters")]
    Format { path: PathBuf },
    #[error("key file {path}: {source}")]
    Key { path: PathBuf, source: KeyError },
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
}

/// Reads a key file.
pub fn load(path: &Path) -> Result<KeyPair, KeyFileError> {
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
                path: path.to_owned(),
                source,
            })?,
        );
    let mut secret = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut *secret).map_err(|_| KeyFileError::Format {
        path: path.to_owned(),
    })?;
    KeyPair::from_secret_bytes(&secret).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new key file with mode 0600; fails if the file exists.
pub fn create(path: &Path, pair: &KeyPair) -> Result<(), KeyFileError> {
    let write_err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    let mut file = private_options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::Exists {
                    path: path.to_owned(),
                }
            } else {
                write_err(source)
            }
        })?;
    let line = Zeroizing::new(format!("{}\n", hex::encode(*pair.secret_bytes())));
    file.write_all(line.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(())
}

/// Options that create files readable by their owner only (mode 0600 on Unix).
fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

/// Appends secret text (e.g. prekey private halves) to `path`, creating it with mode 0600.
pub fn append_secret(path: &Path, text: &str) -> std::io::Result<()> {
    private_options()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Loads the key at `path`, creating it first if there is none. Returns whether it was created.
pub fn load_or_create(path: &Path) -> Result<(KeyPair, bool), KeyFileError> {
    match load(path) {
        Ok(pair) => Ok((pair, false)),
        Err(KeyFileError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let pair = KeyPair::generate();
            create(path, &pair)?;
            Ok((pair, true))
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_refuse_overwrite() {
        let dir = std::env::temp_dir().join(format!("botd-keyfile-{}", std::process::id()));
        let path = dir.join("sub").join("identity.key");
        let (pair, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(pair.public(), again.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            create(&path, &pair),
            Err(KeyFileError::Exists { .. })
        ));
        std::fs::write(&path, "not hex").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Format { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
