//! The frame envelope: header, postcard body, AES-128-CMAC tag.
//!
//! ```text
//! offset  size  field
//! 0       1     MHDR: format version (high nibble, 1) | direction (low nibble: 0 up, 1 down)
//! 1       8     device EUI, most significant byte first
//! 9       4     frame counter, big-endian
//! 13      n     body: one postcard-encoded `Uplink` or `Downlink`
//! 13+n    8     tag: the first 8 bytes of AES-128-CMAC(device key, bytes 0 .. 13+n)
//! ```
//!
//! A frame is *sealed* (counter assigned, tag computed) when it is sent, not when its readings
//! were taken; see [`seal`]. Receiving is three steps, each its own type so the order cannot be
//! skipped: [`RawFrame::parse`] checks the envelope and exposes the header (the gateway needs the
//! EUI to find the key), [`RawFrame::verify`] checks the tag, [`VerifiedFrame::decode`] decodes the
//! body. Every step is total: any byte string gives a value or a typed [`FrameError`], without a
//! panic and without allocating.

use core::fmt;

use aes::Aes128;
use cmac::{Cmac, KeyInit, Mac};
use subtle::ConstantTimeEq;

use crate::{Direction, Downlink, Eui, Uplink, key::DeviceKey, message::Message};

/// The format version this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Header length: MHDR + EUI + counter.
pub const HEADER_LEN: usize = 1 + 8 + 4;
/// Tag length: AES-128-CMAC truncated to 64 bits.
pub const TAG_LEN: usize = 8;
/// The shortest possible frame: header, a one-byte body, tag.
pub const MIN_FRAME_LEN: usize = HEADER_LEN + 1 + TAG_LEN;
/// The longest frame carrying a `M` body.
pub const fn max_frame_len<M: Message>() -> usize {
    HEADER_LEN + M::POSTCARD_MAX_SIZE + TAG_LEN
}
/// The longest uplink frame; device send buffers are this size.
pub const MAX_UPLINK_FRAME_LEN: usize = max_frame_len::<Uplink>();
/// The longest downlink frame; device receive buffers are this size.
pub const MAX_DOWNLINK_FRAME_LEN: usize = max_frame_len::<Downlink>();
/// The longest frame in either direction; anything longer is rejected before it is read.
pub const MAX_FRAME_LEN: usize = if MAX_UPLINK_FRAME_LEN > MAX_DOWNLINK_FRAME_LEN {
    MAX_UPLINK_FRAME_LEN
} else {
    MAX_DOWNLINK_FRAME_LEN
};

/// A sealed frame in a fixed-size buffer.
pub type FrameBuf = heapless::Vec<u8, MAX_FRAME_LEN>;

/// The plaintext header of a frame. Authenticated by the tag, not encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Which way the frame travels.
    pub direction: Direction,
    /// The device the frame is from (uplink) or for (downlink).
    pub eui: Eui,
    /// The sender's frame counter for this direction; never reused under one key.
    pub counter: u32,
}

impl Header {
    /// The MHDR byte: version in the high nibble, direction in the low one.
    pub const fn mhdr(&self) -> u8 {
        let dir = match self.direction {
            Direction::Uplink => 0,
            Direction::Downlink => 1,
        };
        (FORMAT_VERSION << 4) | dir
    }

    /// The header's 13 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let (mhdr, rest) = out.split_at_mut(1);
        let (eui, counter) = rest.split_at_mut(8);
        mhdr.copy_from_slice(&[self.mhdr()]);
        eui.copy_from_slice(&self.eui.to_bytes());
        counter.copy_from_slice(&self.counter.to_be_bytes());
        out
    }
}

/// Why a received byte string is not a valid frame. Every variant names one thing that was
/// wrong; [`FrameError::reason`] gives a stable code for metrics and audit logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameError {
    /// Shorter than the smallest possible frame.
    Truncated {
        /// The length received.
        len: usize,
    },
    /// Longer than the largest frame of its direction.
    Oversize {
        /// The length received.
        len: usize,
        /// The largest allowed.
        max: usize,
    },
    /// The MHDR names a format version this code does not speak.
    UnsupportedVersion {
        /// The version nibble.
        version: u8,
    },
    /// The MHDR's direction nibble is neither 0 (up) nor 1 (down).
    ReservedDirection {
        /// The direction nibble.
        code: u8,
    },
    /// The tag does not match: wrong key, or the frame was altered.
    BadTag,
    /// An uplink where a downlink was expected, or the other way round.
    WrongDirection {
        /// What the caller expected.
        expected: Direction,
        /// What the header says.
        found: Direction,
    },
    /// The body's message index is not one this code knows (a newer sender).
    UnknownMessage {
        /// The top-level variant index.
        index: u32,
    },
    /// The body ends in the middle of a message.
    BodyTruncated,
    /// Bytes are left over after the message.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A field does not decode: a bad varint (or one longer than its shortest form), bool,
    /// option tag, UTF-8, an unknown nested variant, or a list or text over its bound.
    InvalidBody,
    /// The body decodes, but a field is outside the range SPEC.md §6 gives it.
    OutOfRange {
        /// The field.
        field: &'static str,
    },
}

impl FrameError {
    /// A stable snake_case code naming the reason, for metric labels and audit records.
    pub const fn reason(&self) -> &'static str {
        match self {
            FrameError::Truncated { .. } => "truncated",
            FrameError::Oversize { .. } => "oversize",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::ReservedDirection { .. } => "reserved_direction",
            FrameError::BadTag => "bad_tag",
            FrameError::WrongDirection { .. } => "wrong_direction",
            FrameError::UnknownMessage { .. } => "unknown_message",
            FrameError::BodyTruncated => "body_truncated",
            FrameError::TrailingBytes { .. } => "trailing_bytes",
            FrameError::InvalidBody => "invalid_body",
            FrameError::OutOfRange { .. } => "out_of_range",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Truncated { len } => {
                write!(f, "frame of {len} bytes is shorter than the minimum {MIN_FRAME_LEN}")
            }
            FrameError::Oversize { len, max } => {
                write!(f, "frame of {len} bytes is longer than the maximum {max}")
            }
            FrameError::UnsupportedVersion { version } => {
                write!(
                    f,
                    "frame format version {version} is not supported (expected {FORMAT_VERSION})"
                )
            }
            FrameError::ReservedDirection { code } => {
                write!(f, "frame direction code {code} is reserved (0 = up, 1 = down)")
            }
            FrameError::BadTag => {
                f.write_str("frame tag does not verify (wrong key or altered frame)")
            }
            FrameError::WrongDirection { expected, found } => {
                write!(f, "expected a {} frame, got a {} frame", expected.as_str(), found.as_str())
            }
            FrameError::UnknownMessage { index } => write!(f, "unknown message index {index}"),
            FrameError::BodyTruncated => f.write_str("frame body ends inside a message"),
            FrameError::TrailingBytes { count } => {
                write!(f, "{count} bytes left over after the message")
            }
            FrameError::InvalidBody => f.write_str(
                "frame body has a field that does not decode (or is not in its shortest form)",
            ),
            FrameError::OutOfRange { field } => write!(f, "field {field} is out of its range"),
        }
    }
}

impl core::error::Error for FrameError {}

/// Why a message could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SealError {
    /// The output buffer cannot hold the frame; [`max_frame_len`] is always enough.
    BufferTooSmall {
        /// The buffer's length.
        available: usize,
    },
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::BufferTooSmall { available } => {
                write!(f, "a {available}-byte buffer cannot hold the frame")
            }
        }
    }
}

impl core::error::Error for SealError {}

/// The tag over `signed` (header and body): AES-128-CMAC truncated to its first 8 bytes.
pub fn compute_tag(key: &DeviceKey, signed: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = <Cmac<Aes128> as KeyInit>::new(key.expose_bytes().into());
    mac.update(signed);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; TAG_LEN];
    for (t, b) in tag.iter_mut().zip(full.iter()) {
        *t = *b;
    }
    tag
}

/// Seals `msg` into `out`: header with `counter`, postcard body, tag. Returns the frame, a
/// prefix of `out`. The direction comes from the message type.
pub fn seal_into<'b, M: Message>(
    eui: Eui,
    counter: u32,
    msg: &M,
    key: &DeviceKey,
    out: &'b mut [u8],
) -> Result<&'b [u8], SealError> {
    let available = out.len();
    let too_small = SealError::BufferTooSmall { available };
    let header = Header { direction: M::DIRECTION, eui, counter };
    let (head, rest) = out.split_at_mut_checked(HEADER_LEN).ok_or(too_small)?;
    head.copy_from_slice(&header.to_bytes());
    let body_len = postcard::to_slice(msg, rest).map_err(|_| too_small)?.len();
    let signed_len = HEADER_LEN + body_len;
    let (signed, tail) = out.split_at_mut_checked(signed_len).ok_or(too_small)?;
    let tag = compute_tag(key, signed);
    tail.get_mut(..TAG_LEN).ok_or(too_small)?.copy_from_slice(&tag);
    out.get(..signed_len + TAG_LEN).ok_or(too_small)
}

/// Seals `msg` into a fixed-size [`FrameBuf`]. Cannot run out of room: the buffer is sized by
/// the messages' compile-time maximum.
pub fn seal<M: Message>(eui: Eui, counter: u32, msg: &M, key: &DeviceKey) -> FrameBuf {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let mut out = FrameBuf::new();
    if let Ok(frame) = seal_into(eui, counter, msg, key, &mut buf) {
        // Both have MAX_FRAME_LEN capacity, so this cannot fail.
        let _ = out.extend_from_slice(frame);
    }
    out
}

/// A frame whose envelope is well formed; its tag is not checked yet.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    header: Header,
    signed: &'a [u8],
    tag: &'a [u8],
}

impl<'a> RawFrame<'a> {
    /// Checks length, version and direction, and splits the frame. Needs no key.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FrameError> {
        let len = bytes.len();
        if len > MAX_FRAME_LEN {
            return Err(FrameError::Oversize { len, max: MAX_FRAME_LEN });
        }
        let Some((head, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Truncated { len });
        };
        if rest.len() < 1 + TAG_LEN {
            return Err(FrameError::Truncated { len });
        }
        let [mhdr, eui @ .., c0, c1, c2, c3] = *head;
        let version = mhdr >> 4;
        if version != FORMAT_VERSION {
            return Err(FrameError::UnsupportedVersion { version });
        }
        let (direction, max) = match mhdr & 0x0f {
            0 => (Direction::Uplink, MAX_UPLINK_FRAME_LEN),
            1 => (Direction::Downlink, MAX_DOWNLINK_FRAME_LEN),
            code => return Err(FrameError::ReservedDirection { code }),
        };
        if len > max {
            return Err(FrameError::Oversize { len, max });
        }
        let eui = Eui::from_bytes(eui);
        let counter = u32::from_be_bytes([c0, c1, c2, c3]);
        let (signed, tag) = bytes.split_at(len - TAG_LEN);
        Ok(RawFrame { header: Header { direction, eui, counter }, signed, tag })
    }

    /// The header, unauthenticated until [`Self::verify`] succeeds.
    pub const fn header(&self) -> Header {
        self.header
    }

    /// The body bytes, unauthenticated.
    pub fn body(&self) -> &'a [u8] {
        self.signed.get(HEADER_LEN..).unwrap_or_default()
    }

    /// Checks the tag in constant time.
    pub fn verify(self, key: &DeviceKey) -> Result<VerifiedFrame<'a>, FrameError> {
        let expected = compute_tag(key, self.signed);
        if bool::from(expected.ct_eq(self.tag)) {
            Ok(VerifiedFrame { header: self.header, body: self.body() })
        } else {
            Err(FrameError::BadTag)
        }
    }
}

/// A frame whose tag verified under the device's key.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedFrame<'a> {
    header: Header,
    body: &'a [u8],
}

impl<'a> VerifiedFrame<'a> {
    /// The authenticated header.
    pub const fn header(&self) -> Header {
        self.header
    }

    /// The authenticated body bytes.
    pub const fn body(&self) -> &'a [u8] {
        self.body
    }

    /// Decodes the body as `M`, which must match the frame's direction.
    pub fn decode<M: Message>(&self) -> Result<M, FrameError> {
        if self.header.direction != M::DIRECTION {
            return Err(FrameError::WrongDirection {
                expected: M::DIRECTION,
                found: self.header.direction,
            });
        }
        decode_body(self.body)
    }
}

/// Decodes one message body, requiring it to use every byte (SPEC.md §5, §8 steps 10–11):
/// the leading message index first (a complete, shortest-form `u32` naming a known message),
/// then the message, which must be in its canonical encoding — every varint in its shortest
/// form, as a sender must write it — then no bytes left over, then every field in its range.
pub fn decode_body<M: Message>(body: &[u8]) -> Result<M, FrameError> {
    let index = leading_varint(body)?;
    if index >= M::KNOWN_VARIANTS {
        return Err(FrameError::UnknownMessage { index });
    }
    let (msg, rest) = match postcard::take_from_bytes::<M>(body) {
        Ok(decoded) => decoded,
        Err(postcard::Error::DeserializeUnexpectedEnd) => return Err(FrameError::BodyTruncated),
        Err(_) => return Err(FrameError::InvalidBody),
    };
    // Canonical: encoding the message again gives exactly the bytes it was read from (the
    // encoding is deterministic and writes shortest varints), so a longer varint anywhere —
    // an integer, an enum index, a length — is refused, and two receivers never disagree.
    let consumed = body.get(..body.len() - rest.len()).unwrap_or(body);
    let mut again = [0u8; MAX_BODY_LEN];
    match postcard::to_slice(&msg, &mut again) {
        Ok(bytes) if *bytes == *consumed => {}
        _ => return Err(FrameError::InvalidBody),
    }
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { count: rest.len() });
    }
    msg.check_ranges().map_err(|field| FrameError::OutOfRange { field })?;
    Ok(msg)
}

/// Room for the largest body of either direction.
const MAX_BODY_LEN: usize = 512;

/// Parses, verifies and decodes in one call.
pub fn open<M: Message>(bytes: &[u8], key: &DeviceKey) -> Result<(Header, M), FrameError> {
    let verified = RawFrame::parse(bytes)?.verify(key)?;
    let msg = verified.decode()?;
    Ok((verified.header(), msg))
}

/// The postcard varint (`u32`) at the start of `bytes`: `body_truncated` when the body ends
/// inside it, `invalid_body` when it runs past five bytes, past `u32`, or is longer than its
/// shortest form.
fn leading_varint(bytes: &[u8]) -> Result<u32, FrameError> {
    let mut value: u32 = 0;
    for (i, b) in bytes.iter().enumerate() {
        let low = u32::from(b & 0x7f);
        // The fifth byte carries only the top four bits of a u32, and is the last.
        if i == 4 && (low > 0x0f || b & 0x80 != 0) {
            return Err(FrameError::InvalidBody);
        }
        value |= low << (7 * i);
        if b & 0x80 == 0 {
            // Shortest form: a final byte of zero adds nothing (but a lone zero is 0).
            return if i > 0 && *b == 0 { Err(FrameError::InvalidBody) } else { Ok(value) };
        }
    }
    Err(FrameError::BodyTruncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CoverSample, DeviceTime, SwitchState};

    fn key() -> DeviceKey {
        DeviceKey::from_bytes(*b"0123456789abcdef")
    }

    fn cover() -> Uplink {
        Uplink::CoverReading {
            at: DeviceTime(60_000_000),
            sample: CoverSample { tilt_ddeg: 15, switch: SwitchState::Closed, water_mm: None },
        }
    }

    #[test]
    fn cmac_matches_rfc_4493() {
        let k = DeviceKey::from_hex("2b7e151628aed2a6abf7158809cf4f3c").expect("key");
        assert_eq!(compute_tag(&k, &[]), [0xbb, 0x1d, 0x69, 0x29, 0xe9, 0x59, 0x37, 0x28]);
        let m: [u8; 16] = [
            0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93,
            0x17, 0x2a,
        ];
        assert_eq!(compute_tag(&k, &m), [0x07, 0x0a, 0x16, 0xb4, 0x6b, 0x4d, 0x41, 0x44]);
    }

    #[test]
    fn seal_then_open() {
        let eui = Eui(0x1122_3344_5566_7788);
        let frame = seal(eui, 7, &cover(), &key());
        assert_eq!(frame.first(), Some(&0x10));
        let (header, msg) = open::<Uplink>(&frame, &key()).expect("opens");
        assert_eq!(header, Header { direction: Direction::Uplink, eui, counter: 7 });
        assert_eq!(msg, cover());
    }

    #[test]
    fn seal_into_reports_a_small_buffer() {
        let mut small = [0u8; 20];
        assert_eq!(
            seal_into(Eui(1), 1, &cover(), &key(), &mut small),
            Err(SealError::BufferTooSmall { available: 20 })
        );
        let mut tiny = [0u8; 3];
        assert!(seal_into(Eui(1), 1, &cover(), &key(), &mut tiny).is_err());
    }

    #[test]
    fn wrong_key_and_wrong_direction_are_typed() {
        let frame = seal(Eui(1), 1, &cover(), &key());
        let other = DeviceKey::from_bytes([9; 16]);
        assert_eq!(open::<Uplink>(&frame, &other).err(), Some(FrameError::BadTag));
        assert_eq!(
            open::<Downlink>(&frame, &key()).err(),
            Some(FrameError::WrongDirection {
                expected: Direction::Downlink,
                found: Direction::Uplink
            })
        );
    }

    #[test]
    fn envelope_errors_are_typed() {
        let frame = seal(Eui(1), 1, &cover(), &key());
        assert_eq!(RawFrame::parse(&[]).err(), Some(FrameError::Truncated { len: 0 }));
        assert_eq!(
            RawFrame::parse(frame.get(..HEADER_LEN + TAG_LEN).unwrap_or_default()).err(),
            Some(FrameError::Truncated { len: HEADER_LEN + TAG_LEN })
        );
        let mut v2 = frame.clone();
        if let Some(b) = v2.first_mut() {
            *b = 0x20;
        }
        assert_eq!(RawFrame::parse(&v2).err(), Some(FrameError::UnsupportedVersion { version: 2 }));
        let mut dir = frame.clone();
        if let Some(b) = dir.first_mut() {
            *b = 0x1f;
        }
        assert_eq!(RawFrame::parse(&dir).err(), Some(FrameError::ReservedDirection { code: 15 }));
        let long = [0x11u8; MAX_DOWNLINK_FRAME_LEN + 1];
        assert_eq!(
            RawFrame::parse(&long).err(),
            Some(FrameError::Oversize { len: long.len(), max: MAX_DOWNLINK_FRAME_LEN })
        );
        let huge = [0x10u8; MAX_FRAME_LEN + 1];
        assert_eq!(
            RawFrame::parse(&huge).err(),
            Some(FrameError::Oversize { len: huge.len(), max: MAX_FRAME_LEN })
        );
    }

    #[test]
    fn body_errors_are_typed() {
        assert_eq!(decode_body::<Uplink>(&[11]), Err(FrameError::UnknownMessage { index: 11 }));
        assert_eq!(
            decode_body::<Uplink>(&[0x80, 0x01]),
            Err(FrameError::UnknownMessage { index: 128 })
        );
        assert_eq!(decode_body::<Downlink>(&[5]), Err(FrameError::UnknownMessage { index: 5 }));
        assert_eq!(decode_body::<Uplink>(&[0]), Err(FrameError::BodyTruncated));
        assert_eq!(decode_body::<Downlink>(&[3, 0]), Err(FrameError::TrailingBytes { count: 1 }));
        // SwitchState index 5 does not exist.
        assert_eq!(decode_body::<Uplink>(&[0, 1, 1, 5, 0]), Err(FrameError::InvalidBody));
        // Option tag 2 does not exist.
        assert_eq!(decode_body::<Uplink>(&[0, 1, 1, 0, 2]), Err(FrameError::InvalidBody));
        // A varint longer than five bytes.
        assert_eq!(
            decode_body::<Uplink>(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(FrameError::InvalidBody)
        );
    }

    #[test]
    fn leading_varint_reads_postcard_varints_in_their_shortest_form() {
        assert_eq!(leading_varint(&[0]), Ok(0));
        assert_eq!(leading_varint(&[0x7f]), Ok(127));
        assert_eq!(leading_varint(&[0x80, 0x01]), Ok(128));
        assert_eq!(leading_varint(&[0xff, 0xff, 0xff, 0xff, 0x0f]), Ok(u32::MAX));
        assert_eq!(leading_varint(&[0x80]), Err(FrameError::BodyTruncated));
        assert_eq!(leading_varint(&[]), Err(FrameError::BodyTruncated));
        assert_eq!(leading_varint(&[0xff, 0xff, 0xff, 0xff, 0x7f]), Err(FrameError::InvalidBody));
        assert_eq!(
            leading_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(FrameError::InvalidBody)
        );
        // 0 and 11 written longer than they need: not their shortest form.
        assert_eq!(leading_varint(&[0x80, 0x00]), Err(FrameError::InvalidBody));
        assert_eq!(leading_varint(&[0x8b, 0x80, 0x00]), Err(FrameError::InvalidBody));
    }

    #[test]
    fn a_body_not_in_its_shortest_form_and_a_field_out_of_range_are_refused() {
        // A cover reading with `at` = 12 written in two bytes (8c 00) instead of one (0c).
        assert_eq!(decode_body::<Uplink>(&[0, 0x0c, 0x0c, 1, 0]).map(|_| ()), Ok(()));
        assert_eq!(
            decode_body::<Uplink>(&[0, 0x8c, 0x00, 0x0c, 1, 0]),
            Err(FrameError::InvalidBody)
        );
        // tilt_ddeg 5000 (of 0..=1800).
        let tilt = [0, 0x0c, 0x88, 0x27, 1, 0];
        assert_eq!(
            decode_body::<Uplink>(&tilt),
            Err(FrameError::OutOfRange { field: "tilt_ddeg" })
        );
        // Not canonical wins over trailing bytes: it is found while reading.
        assert_eq!(
            decode_body::<Uplink>(&[0, 0x8c, 0x00, 0x0c, 1, 0, 9]),
            Err(FrameError::InvalidBody)
        );
    }
}
