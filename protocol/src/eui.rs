//! Device identity: the 64-bit EUI, written as 16 lowercase hex digits in topics and logs.

use core::{fmt, str::FromStr};

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// A device's 64-bit extended unique identifier. On the wire it is 8 bytes, most significant
/// first, so a hex dump of a frame shows the EUI as it is printed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, MaxSize)]
#[serde(transparent)]
pub struct Eui(pub u64);

impl Eui {
    /// The EUI as 8 bytes, most significant first.
    pub const fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// An EUI from 8 bytes, most significant first.
    pub const fn from_bytes(bytes: [u8; 8]) -> Self {
        Eui(u64::from_be_bytes(bytes))
    }
}

impl fmt::Display for Eui {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Eui {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Eui({:016x})", self.0)
    }
}

/// A string that is not exactly 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EuiParseError;

impl fmt::Display for EuiParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a device EUI must be exactly 16 hex digits")
    }
}

impl core::error::Error for EuiParseError {}

impl FromStr for Eui {
    type Err = EuiParseError;

    /// Parses 16 hex digits (either case; the canonical form is lowercase).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 8];
        crate::hex::decode_into(s, &mut bytes).map_err(|_| EuiParseError)?;
        Ok(Eui::from_bytes(bytes))
    }
}
