//! Session tokens remembered per server in the user's config directory, so the next start
//! resumes without a password.
//!
//! A token is a password-equivalent: files are created with mode 0600 inside a 0700
//! directory, and are written whole to a temporary file then renamed, so a crash never
//! leaves half a token. Nothing else is stored here.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot find a config directory (set --config-dir or MESSENGER_CONFIG_DIR)")]
    NoConfigDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a token file (remove it to sign in again)")]
    Corrupt(PathBuf),
}

/// Where tokens live: `<config dir>/sessions/<server>.token`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl TokenStore {
    /// `dir` if given, else the platform's config directory for "messenger".
    pub fn open(dir: Option<PathBuf>) -> Result<Self, StoreError> {
        let dir = match dir {
            Some(d) => d,
            None => directories::ProjectDirs::from("", "", "messenger")
                .ok_or(StoreError::NoConfigDir)?
                .config_dir()
                .to_path_buf(),
        };
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file for `server`; characters outside `[A-Za-z0-9.-]` become `_` so any address
    /// (IPv6 brackets, ports) makes one safe file name.
    pub fn path_for(&self, server: &str) -> PathBuf {
        let name: String = server
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join("sessions").join(format!("{name}.token"))
    }

    pub fn load(&self, server: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path_for(server);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        decode_hex(text.trim())
            .map(Some)
            .ok_or(StoreError::Corrupt(path))
    }

    pub fn save(&self, server: &str, token: &[u8]) -> Result<(), StoreError> {
        let path = self.path_for(server);
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        create_private_dir(&dir)?;
        let tmp = path.with_extension("token.tmp");
        {
            let mut f = private_file(&tmp).map_err(io_err(&tmp))?;
            f.write_all(encode_hex(token).as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    pub fn remove(&self, server: &str) -> Result<(), StoreError> {
        let path = self.path_for(server);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

#[cfg(unix)]
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // A leftover file from an older run keeps its mode on open; force it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_token_loads_back_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::open(Some(dir.path().to_path_buf())).expect("store");
        assert_eq!(store.load("127.0.0.1:7443").expect("load"), None);
        store
            .save("127.0.0.1:7443", &[0, 1, 0xfe, 0xff])
            .expect("save");
        assert_eq!(
            store.load("127.0.0.1:7443").expect("load"),
            Some(vec![0, 1, 0xfe, 0xff])
        );
        // Another server has its own token.
        assert_eq!(store.load("[::1]:7443").expect("load"), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path_for("127.0.0.1:7443"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        store.remove("127.0.0.1:7443").expect("remove");
        assert_eq!(store.load("127.0.0.1:7443").expect("load"), None);
    }

    #[test]
    fn server_addresses_become_safe_file_names() {
        let store = TokenStore::open(Some(PathBuf::from("/x"))).expect("store");
        assert_eq!(
            store.path_for("[::1]:7443/../../etc"),
            PathBuf::from("/x/sessions/___1__7443_.._.._etc.token")
        );
    }

    #[test]
    fn a_damaged_token_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::open(Some(dir.path().to_path_buf())).expect("store");
        store.save("s:1", b"ok").expect("save");
        std::fs::write(store.path_for("s:1"), "zz\u{e9}").expect("write");
        assert!(matches!(store.load("s:1"), Err(StoreError::Corrupt(_))));
    }
}
