//! Every message of every kind survives seal → parse → verify → decode unchanged, and no
//! frame is ever longer than the compile-time bound the firmware sizes its buffers by.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use gridsense_protocol::{
    Direction, Downlink, Eui, HEADER_LEN, Header, MAX_DOWNLINK_FRAME_LEN, MAX_UPLINK_FRAME_LEN,
    Message, RawFrame, TAG_LEN, Uplink, frame::max_frame_len, open, seal, seal_into, strategy,
};
use postcard::experimental::max_size::MaxSize;
use proptest::prelude::*;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(
    eui: Eui,
    counter: u32,
    msg: &M,
    key: &gridsense_protocol::DeviceKey,
) -> Result<(), TestCaseError> {
    let frame = seal(eui, counter, msg, key);
    prop_assert!(frame.len() <= max_frame_len::<M>(), "{} > {}", frame.len(), max_frame_len::<M>());
    prop_assert!(frame.len() - HEADER_LEN - TAG_LEN <= M::POSTCARD_MAX_SIZE);
    let (header, back) = open::<M>(&frame, key).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(header, Header { direction: M::DIRECTION, eui, counter });
    prop_assert_eq!(&back, msg);
    // seal_into into an exactly sized buffer gives the same bytes.
    let mut exact = vec![0u8; frame.len()];
    let again = seal_into(eui, counter, msg, key, &mut exact)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(again, &frame[..]);
    // A resend of the same sealed message is byte-identical.
    prop_assert_eq!(seal(eui, counter, msg, key), frame);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn uplinks_round_trip(
        eui in strategy::eui(), counter in any::<u32>(), key in strategy::key(), msg in strategy::uplink()
    ) {
        round_trip(eui, counter, &msg, &key)?;
    }

    #[test]
    fn downlinks_round_trip(
        eui in strategy::eui(), counter in any::<u32>(), key in strategy::key(), msg in strategy::downlink()
    ) {
        round_trip(eui, counter, &msg, &key)?;
    }

    #[test]
    fn header_reads_back_without_the_key(
        eui in strategy::eui(), counter in any::<u32>(), key in strategy::key(), msg in strategy::uplink()
    ) {
        let frame = seal(eui, counter, &msg, &key);
        let raw = RawFrame::parse(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(raw.header(), Header { direction: Direction::Uplink, eui, counter });
    }
}

#[test]
fn compile_time_bounds_are_what_spec_md_says() {
    // SPEC.md quotes these numbers; a change here is a wire-format change.
    assert_eq!(Uplink::POSTCARD_MAX_SIZE, 463);
    assert_eq!(Downlink::POSTCARD_MAX_SIZE, 98);
    assert_eq!(MAX_UPLINK_FRAME_LEN, 484);
    assert_eq!(MAX_DOWNLINK_FRAME_LEN, 119);
}

#[test]
fn worst_case_messages_hit_the_bounds_exactly() {
    use gridsense_protocol::{
        Backlog, DeviceKey, DeviceTime, MAX_BACKLOG_SAMPLES, MAX_SETTINGS, PositionFix, Sample,
        Setting, TimedSample,
    };
    let key = DeviceKey::from_bytes([1; 16]);
    let fix = PositionFix { lat_udeg: i32::MIN, lon_udeg: i32::MIN, accuracy_m: u16::MAX };
    let sample = TimedSample { delta_s: u32::MAX, sample: Sample::Fix(fix) };
    let samples = heapless::Vec::from_slice(&[sample; MAX_BACKLOG_SAMPLES]).unwrap();
    let backlog = Uplink::Backlog(Backlog { base: DeviceTime(u32::MAX), samples });
    assert_eq!(seal(Eui(1), u32::MAX, &backlog, &key).len(), MAX_UPLINK_FRAME_LEN);
    let settings =
        heapless::Vec::from_slice(&[Setting::FixIntervalS(u32::MAX); MAX_SETTINGS]).unwrap();
    let config = Downlink::Config { settings };
    assert_eq!(seal(Eui(1), u32::MAX, &config, &key).len(), MAX_DOWNLINK_FRAME_LEN);
}
