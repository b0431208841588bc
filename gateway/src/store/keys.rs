//! Device secrets at rest: every device's frame key and MQTT password are sealed (AES-256-GCM)
//! with a key from `store.key_file` before they reach the database, so a dump of the database
//! (or a copy of the SQLite file) does not hand out the keys of the whole fleet. Each sealed
//! value is bound to its device and column (the associated data), so a value copied onto
//! another row does not open. The key file is created on first start (32 random bytes, hex,
//! mode 0600); a store whose secrets were sealed with another key is refused at open.

use std::path::{Path, PathBuf};

use gridsense_protocol::Eui;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use super::StoreError;

/// The first byte of a sealed value: the scheme's version.
const SEALED_V1: u8 = 1;
/// How a sealed MQTT password starts (the column is text; the rest is hex).
const PASSWORD_PREFIX: &str = "sealed1:";
/// What the check value seals: it tells a wrong key file from a damaged row.
const CHECK_PLAIN: &[u8] = b"gridsense store key check";

/// The key that seals device secrets.
pub struct KeyRing {
    key: LessSafeKey,
    path: PathBuf,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("path", &self.path).finish_non_exhaustive()
    }
}

pub use crate::config::default_key_file;

fn bad_key_file(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::KeyFile { path: path.display().to_string(), what: what.into() }
}

impl KeyRing {
    /// Reads the key file, creating it (0600) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io { path: path.display().to_string(), source };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut raw = [0u8; 32];
                getrandom::fill(&mut raw)
                    .map_err(|e| bad_key_file(path, format!("no randomness: {e}")))?;
                let text = hex::encode(raw);
                match write_private(path, &text) {
                    Ok(()) => text,
                    // Another connection made it first: use that one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::fs::read_to_string(path).map_err(io)?
                    }
                    Err(e) => return Err(io(e)),
                }
            }
            Err(e) => return Err(io(e)),
        };
        let raw = hex::decode(text.trim())
            .ok()
            .filter(|r| r.len() == 32)
            .ok_or_else(|| bad_key_file(path, "not 64 hex digits (a 256-bit key)"))?;
        let key = UnboundKey::new(&AES_256_GCM, &raw)
            .map_err(|_| bad_key_file(path, "not an AES-256 key"))?;
        Ok(KeyRing { key: LessSafeKey::new(key), path: path.to_owned() })
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad(eui: Eui, column: &str) -> Vec<u8> {
        let mut aad = eui.0.to_be_bytes().to_vec();
        aad.extend_from_slice(column.as_bytes());
        aad
    }

    /// Seals `plain` for `column` of device `eui`: version, nonce, ciphertext and tag.
    pub fn seal(&self, eui: Eui, column: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| bad_key_file(&self.path, format!("no randomness: {e}")))?;
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(eui, column)),
                &mut body,
            )
            .map_err(|_| bad_key_file(&self.path, "sealing failed"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value sealed for `column` of device `eui`.
    pub fn open(&self, eui: Eui, column: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let bad = |what: &str| StoreError::BadRow {
            table: "devices",
            what: format!("{column} of {eui}: {what}"),
        };
        let (version, rest) = sealed.split_first().ok_or_else(|| bad("empty"))?;
        if *version != SEALED_V1 || rest.len() < NONCE_LEN {
            return Err(bad("not a sealed value"));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad("bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(eui, column)), &mut body)
            .map_err(|_| bad("does not open with store.key_file"))?;
        Ok(plain.to_vec())
    }

    /// Seals a device's frame key.
    pub fn seal_key(&self, eui: Eui, key: &[u8; 16]) -> Result<Vec<u8>, StoreError> {
        self.seal(eui, "key", key)
    }

    /// Opens a device's frame key.
    pub fn open_key(&self, eui: Eui, sealed: &[u8]) -> Result<[u8; 16], StoreError> {
        self.open(eui, "key", sealed)?.try_into().map_err(|_| StoreError::BadRow {
            table: "devices",
            what: format!("key of {eui}: not 16 bytes"),
        })
    }

    /// Seals a device's MQTT password (text: a prefix and hex).
    pub fn seal_password(&self, eui: Eui, password: &str) -> Result<String, StoreError> {
        Ok(format!(
            "{PASSWORD_PREFIX}{}",
            hex::encode(self.seal(eui, "mqtt_password", password.as_bytes())?)
        ))
    }

    /// Opens a device's MQTT password.
    pub fn open_password(&self, eui: Eui, sealed: &str) -> Result<String, StoreError> {
        let bad = |what: &str| StoreError::BadRow {
            table: "devices",
            what: format!("mqtt_password of {eui}: {what}"),
        };
        let hex_part = sealed.strip_prefix(PASSWORD_PREFIX).ok_or_else(|| bad("not sealed"))?;
        let raw = hex::decode(hex_part).map_err(|_| bad("not hex"))?;
        String::from_utf8(self.open(eui, "mqtt_password", &raw)?).map_err(|_| bad("not UTF-8"))
    }

    /// Whether a stored password is sealed (older stores kept them in the clear).
    pub fn is_sealed_password(stored: &str) -> bool {
        stored.starts_with(PASSWORD_PREFIX)
    }

    /// The check value a store keeps to recognise its key.
    pub fn check_value(&self) -> Result<Vec<u8>, StoreError> {
        self.seal(Eui(0), "check", CHECK_PLAIN)
    }

    /// Whether `check` was sealed with this key.
    pub fn opens_check(&self, check: &[u8]) -> bool {
        self.open(Eui(0), "check", check).is_ok_and(|p| p == CHECK_PLAIN)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_for_its_device_and_column_and_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load_or_create(&dir.path().join("k")).unwrap();
        let key = [7u8; 16];
        let sealed = ring.seal_key(Eui(1), &key).unwrap();
        assert!(!sealed.windows(16).any(|w| w == key), "the key is not in the sealed value");
        assert_eq!(ring.open_key(Eui(1), &sealed).unwrap(), key);
        assert!(ring.open_key(Eui(2), &sealed).is_err(), "bound to its device");
        assert!(ring.open(Eui(1), "mqtt_password", &sealed).is_err(), "bound to its column");
        let other = KeyRing::load_or_create(&dir.path().join("other")).unwrap();
        assert!(other.open_key(Eui(1), &sealed).is_err());
        assert!(!other.opens_check(&ring.check_value().unwrap()));
        assert!(ring.opens_check(&ring.check_value().unwrap()));
        let pw = ring.seal_password(Eui(1), "s3cret").unwrap();
        assert!(KeyRing::is_sealed_password(&pw) && !pw.contains("s3cret"));
        assert_eq!(ring.open_password(Eui(1), &pw).unwrap(), "s3cret");
    }

    #[test]
    fn the_key_file_is_created_private_and_read_back_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.key");
        let a = KeyRing::load_or_create(&path).unwrap();
        let b = KeyRing::load_or_create(&path).unwrap();
        assert!(b.opens_check(&a.check_value().unwrap()), "the same key on the second start");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not a key").unwrap();
        let e = KeyRing::load_or_create(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.key") && e.contains("64 hex digits"), "{e}");
    }
}
