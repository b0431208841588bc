//! Decoding is total and tampering never verifies: arbitrary bytes and mutated valid frames
//! always give a typed error (or, for an unaltered frame, the original message), never a panic.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use gridsense_protocol::{
    DeviceKey, Downlink, Eui, FrameError, HEADER_LEN, MAX_FRAME_LEN, RawFrame, TAG_LEN, Uplink,
    frame::decode_body, open, seal, strategy,
};
use proptest::prelude::*;

/// Every step of the receive path on `bytes`, with both message types; returns what `open`
/// says for uplinks.
fn receive(bytes: &[u8], key: &DeviceKey) -> Result<Uplink, FrameError> {
    let _ = open::<Downlink>(bytes, key);
    if let Ok(raw) = RawFrame::parse(bytes) {
        let _ = raw.header();
        let _ = decode_body::<Uplink>(raw.body());
        let _ = decode_body::<Downlink>(raw.body());
    }
    open::<Uplink>(bytes, key).map(|(_, msg)| msg)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn arbitrary_bytes_give_typed_errors(
        bytes in proptest::collection::vec(any::<u8>(), 0..600), key in strategy::key()
    ) {
        // A random 64-bit tag matching is a 2^-64 event: treat it as a failure.
        let result = receive(&bytes, &key);
        prop_assert!(result.is_err(), "random bytes verified: {result:?}");
    }

    #[test]
    fn arbitrary_bodies_decode_or_fail_typed(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_body::<Uplink>(&bytes);
        let _ = decode_body::<Downlink>(&bytes);
    }

    #[test]
    fn random_headers_on_random_bodies(
        mhdr in prop_oneof![Just(0x10u8), Just(0x11u8), any::<u8>()],
        rest in proptest::collection::vec(any::<u8>(), 0..500),
    ) {
        let mut bytes = vec![mhdr];
        bytes.extend_from_slice(&rest);
        let _ = receive(&bytes, &DeviceKey::from_bytes([0; 16]));
    }

    #[test]
    fn bit_flips_never_verify(
        eui in strategy::eui(), counter in any::<u32>(), key in strategy::key(),
        msg in strategy::uplink(), at in any::<prop::sample::Index>(), bit in 0u8..8,
    ) {
        let mut frame = seal(eui, counter, &msg, &key).to_vec();
        let i = at.index(frame.len());
        frame[i] ^= 1 << bit;
        let result = receive(&frame, &key);
        prop_assert!(result.is_err(), "flipped bit {bit} of byte {i} still verified");
    }

    #[test]
    fn multi_byte_mutations_never_verify(
        key in strategy::key(), msg in strategy::uplink(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let original = seal(Eui(7), 1, &msg, &key).to_vec();
        let mut frame = original.clone();
        for (at, x) in edits {
            let i = at.index(frame.len());
            frame[i] ^= x;
        }
        // Edits may cancel out; only a changed frame must fail.
        if frame != original {
            prop_assert!(receive(&frame, &key).is_err());
        }
    }

    #[test]
    fn truncation_and_extension_never_verify(
        key in strategy::key(), msg in strategy::uplink(),
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let frame = seal(Eui(7), 1, &msg, &key).to_vec();
        let shorter = &frame[..cut.index(frame.len())];
        prop_assert!(receive(shorter, &key).is_err());
        let mut longer = frame.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(receive(&longer, &key).is_err());
        // Moving the tag: extra bytes inserted before it.
        let mut inserted = frame[..frame.len() - TAG_LEN].to_vec();
        inserted.extend_from_slice(&extra);
        inserted.extend_from_slice(&frame[frame.len() - TAG_LEN..]);
        prop_assert!(receive(&inserted, &key).is_err());
    }

    #[test]
    fn counter_and_eui_swaps_never_verify(
        key in strategy::key(), other_key in strategy::key(), msg in strategy::uplink(),
        eui in strategy::eui(), other_eui in strategy::eui(),
        counter in any::<u32>(), other_counter in any::<u32>(),
    ) {
        let frame = seal(eui, counter, &msg, &key).to_vec();
        let mut swapped_counter = frame.clone();
        swapped_counter[9..HEADER_LEN].copy_from_slice(&other_counter.to_be_bytes());
        if other_counter != counter {
            prop_assert_eq!(receive(&swapped_counter, &key), Err(FrameError::BadTag));
        }
        let mut swapped_eui = frame.clone();
        swapped_eui[1..9].copy_from_slice(&other_eui.0.to_be_bytes());
        if other_eui != eui {
            prop_assert_eq!(receive(&swapped_eui, &key), Err(FrameError::BadTag));
            // Nor under the other device's key.
            if other_key != key {
                prop_assert_eq!(receive(&swapped_eui, &other_key), Err(FrameError::BadTag));
            }
        }
        // Nor does a body from one frame under another frame's header and tag.
        let other = seal(other_eui, other_counter, &msg, &other_key).to_vec();
        let mut spliced = other[..HEADER_LEN].to_vec();
        spliced.extend_from_slice(&frame[HEADER_LEN..]);
        if spliced != frame && spliced != other {
            prop_assert!(receive(&spliced, &key).is_err());
            prop_assert!(receive(&spliced, &other_key).is_err());
        }
    }

    #[test]
    fn direction_flip_never_verifies(key in strategy::key(), msg in strategy::downlink()) {
        let mut frame = seal(Eui(3), 5, &msg, &key).to_vec();
        frame[0] = 0x10;
        prop_assert_eq!(receive(&frame, &key), Err(FrameError::BadTag));
    }
}

#[test]
fn oversize_input_is_rejected_before_it_is_read() {
    let big = vec![0x10u8; MAX_FRAME_LEN + 1];
    assert!(matches!(RawFrame::parse(&big), Err(FrameError::Oversize { .. })));
    let huge = vec![0u8; 1 << 20];
    assert!(matches!(RawFrame::parse(&huge), Err(FrameError::Oversize { .. })));
}

#[test]
fn body_errors_need_an_authentic_frame_to_be_seen() {
    // A sender with the key can still send a bad body: the decoder names it.
    let key = DeviceKey::from_bytes([4; 16]);
    let mut signed = vec![0x10];
    signed.extend_from_slice(&[0; 8]);
    signed.extend_from_slice(&1u32.to_be_bytes());
    for (body, expected) in [
        (&[42u8][..], FrameError::UnknownMessage { index: 42 }),
        (&[1, 0x80][..], FrameError::BodyTruncated),
        (&[9, 0, 0, 7][..], FrameError::TrailingBytes { count: 1 }),
        (&[9, 0, 2][..], FrameError::InvalidBody),
    ] {
        let mut frame = signed.clone();
        frame.extend_from_slice(body);
        let tag = gridsense_protocol::frame::compute_tag(&key, &frame);
        frame.extend_from_slice(&tag);
        assert_eq!(open::<Uplink>(&frame, &key).err(), Some(expected), "body {body:02x?}");
    }
}
