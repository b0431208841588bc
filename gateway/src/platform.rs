//! What the platform protocols fix, shared by the clients that send to a platform
//! ([`crate::delivery`]) and the servers that take its callbacks ([`crate::http`]): the webhook
//! signature and Open311's search span.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The longest search window GeoReport v2 allows, ms (90 days): a client's searches stay
/// within it, and the board serves no longer one (and it is the board's default span).
pub const GEOREPORT_SPAN_MS: i64 = 90 * 86_400_000;

/// HMAC-SHA256 of `body` under `secret`, as lowercase hex: the `X-Gridsense-Signature`
/// header is `t=TIMESTAMP,v1=HEX` over `TIMESTAMP.BODY`.
pub fn sign(secret: &str, timestamp_s: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
    let tag = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).map(|mut mac| {
        mac.update(timestamp_s.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    });
    format!("t={timestamp_s},v1={}", tag.unwrap_or_default())
}

/// Checks a signature header against `body`, rejecting timestamps more than `tolerance_s` from
/// `now_s` (replays).
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), &'static str> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return Err("malformed signature header") };
    if (now_s - t).abs() > tolerance_s {
        return Err("stale timestamp");
    }
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).map_err(|_| "bad key")?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).map_err(|_| "signature does not verify")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_reject_tampering_and_stale_timestamps() {
        let h = sign("k", 1_000, b"{\"a\":1}");
        assert!(verify_signature("k", &h, b"{\"a\":1}", 1_010, 300).is_ok());
        assert_eq!(
            verify_signature("k", &h, b"{\"a\":2}", 1_010, 300),
            Err("signature does not verify")
        );
        assert_eq!(
            verify_signature("other", &h, b"{\"a\":1}", 1_010, 300),
            Err("signature does not verify")
        );
        assert_eq!(verify_signature("k", &h, b"{\"a\":1}", 2_000, 300), Err("stale timestamp"));
        assert_eq!(
            verify_signature("k", "garbage", b"", 0, 300),
            Err("malformed signature header")
        );
    }
}
