//! Per-device 128-bit keys. A key never reaches a log: `Debug` redacts it, there is no
//! `Display`, and the bytes are wiped when the key is dropped.

use core::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Key length in bytes (AES-128).
pub const KEY_LEN: usize = 16;

/// A device's AES-128 key, used for the frame tag in both directions.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DeviceKey([u8; KEY_LEN]);

impl DeviceKey {
    /// A key from its 16 bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        DeviceKey(bytes)
    }

    /// A key from exactly 32 hex digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, KeyParseError> {
        let mut bytes = [0u8; KEY_LEN];
        crate::hex::decode_into(hex, &mut bytes).map_err(|_| KeyParseError)?;
        Ok(DeviceKey(bytes))
    }

    /// The raw key bytes, for storing in the registry. Handle with care.
    pub const fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// A key string that is not 32 hex digits. Carries no part of the input, so it is safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyParseError;

impl fmt::Display for KeyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a device key must be exactly 32 hex digits")
    }
}

impl core::error::Error for KeyParseError {}
