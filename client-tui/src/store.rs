//! Session tokens remembered per server in the user's config directory, so the next start
//! resumes without a password; and login cookies per server and username, so this device's
//! logins keep their own failed-login budget (docs/PROTOCOL.md §5.3.1).
//!
//! A token is a password-equivalent, a cookie is private too: files are created with mode 0600
//! inside a 0700 directory, and are written whole to a temporary file then renamed, so a crash
//! never leaves half of one. Nothing else is stored here.

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

/// Where tokens live: `<config dir>/sessions/<server>.token`; login cookies:
/// `<config dir>/cookies/<server>/<username>.cookie` (username case-folded). Logging out
/// removes the token but keeps the cookie: it marks the device, not the session.
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
        self.dir
            .join("sessions")
            .join(format!("{}.token", safe_name(server)))
    }

    /// The login cookie file of `username` on `server`.
    pub fn cookie_path_for(&self, server: &str, username: &str) -> PathBuf {
        self.dir
            .join("cookies")
            .join(safe_name(server))
            .join(format!(
                "{}.cookie",
                safe_name(&username.to_ascii_lowercase())
            ))
    }

    pub fn load(&self, server: &str) -> Result<Option<Vec<u8>>, StoreError> {
        read_hex(&self.path_for(server))
    }

    pub fn save(&self, server: &str, token: &[u8]) -> Result<(), StoreError> {
        write_hex(&self.path_for(server), &self.dir, token)
    }

    pub fn load_cookie(&self, server: &str, username: &str) -> Result<Option<Vec<u8>>, StoreError> {
        read_hex(&self.cookie_path_for(server, username))
    }

    pub fn save_cookie(
        &self,
        server: &str,
        username: &str,
        cookie: &[u8],
    ) -> Result<(), StoreError> {
        write_hex(&self.cookie_path_for(server, username), &self.dir, cookie)
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

/// Characters outside `[A-Za-z0-9.-]` become `_`; a name of dots only could climb out of the
/// directory, so it is prefixed.
fn safe_name(s: &str) -> String {
    let name: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.chars().all(|c| c == '.') {
        format!("_{name}")
    } else {
        name
    }
}

fn read_hex(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    decode_hex(text.trim())
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt(path.to_path_buf()))
}

/// Writes `bytes` as hex to `path` (0600, in 0700 directories), through a temporary file.
fn write_hex(path: &Path, root: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(root).to_path_buf();
    create_private_dir(&dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = private_file(&tmp).map_err(io_err(&tmp))?;
        f.write_all(encode_hex(bytes).as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
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
    fn login_cookies_are_kept_per_server_and_username_and_survive_logout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::open(Some(dir.path().to_path_buf())).expect("store");
        store.save("s:1", b"token").expect("save token");
        store.save_cookie("s:1", "Alice", &[7; 32]).expect("save");
        assert_eq!(
            store.load_cookie("s:1", "alice").expect("load"),
            Some(vec![7; 32]),
            "usernames are case-insensitive"
        );
        assert_eq!(store.load_cookie("s:1", "bob").expect("load"), None);
        assert_eq!(store.load_cookie("s:2", "alice").expect("load"), None);
        store.remove("s:1").expect("logout");
        assert_eq!(
            store.load_cookie("s:1", "alice").expect("load"),
            Some(vec![7; 32])
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.cookie_path_for("s:1", "alice"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            store.cookie_path_for("s:1", ".."),
            dir.path().join("cookies").join("s_1").join("_...cookie")
        );
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
