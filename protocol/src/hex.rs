//! Minimal hex decoding for keys and EUIs (no_std, no allocation).

/// Why a hex string did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HexError {
    Length,
    Digit,
}

fn nibble(c: u8) -> Result<u8, HexError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(HexError::Digit),
    }
}

/// Fills `out` from exactly `2 * out.len()` hex digits.
pub(crate) fn decode_into(hex: &str, out: &mut [u8]) -> Result<(), HexError> {
    let digits = hex.as_bytes();
    if digits.len() != out.len() * 2 {
        return Err(HexError::Length);
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        if let [hi, lo] = pair {
            *byte = (nibble(*hi)? << 4) | nibble(*lo)?;
        }
    }
    Ok(())
}
