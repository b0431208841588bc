//! SPEC.md is executable: every ```` ```vector ```` block in it is parsed and checked against
//! the code (decoding, verifying, and re-encoding byte for byte), every message kind of both
//! directions has a vector, and the size bounds it quotes are the code's.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::collections::{BTreeMap, BTreeSet};

use gridsense_protocol::{
    DeviceKey, Direction, Downlink, Eui, Header, MAX_DOWNLINK_FRAME_LEN, MAX_UPLINK_FRAME_LEN,
    Message, RawFrame, Uplink, examples, open, seal,
};
use postcard::experimental::max_size::MaxSize;

const SPEC: &str = include_str!("../SPEC.md");

/// The `key: value` lines of each vector block, in order.
fn vector_blocks() -> Vec<BTreeMap<String, String>> {
    let mut blocks = Vec::new();
    let mut current: Option<BTreeMap<String, String>> = None;
    for line in SPEC.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```vector") => current = Some(BTreeMap::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(fields), text) => {
                let (k, v) = text.split_once(": ").unwrap_or_else(|| panic!("bad line {text:?}"));
                assert!(fields.insert(k.to_owned(), v.to_owned()).is_none(), "duplicate {k}");
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unterminated vector block");
    blocks
}

fn check<M: Message + PartialEq + std::fmt::Debug>(v: &BTreeMap<String, String>) {
    let name = &v["name"];
    let key = DeviceKey::from_hex(&v["key"]).expect("key");
    let eui: Eui = v["eui"].parse().expect("eui");
    let counter: u32 = v["counter"].parse().expect("counter");
    let frame = hex::decode(v["frame"].replace(' ', "")).expect("frame hex");
    match (v.get("message"), v.get("error")) {
        (Some(json), None) => {
            let expected: M = serde_json::from_str(json).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(expected.kind_name(), name, "vector name");
            let (header, msg) = open::<M>(&frame, &key).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(header, Header { direction: M::DIRECTION, eui, counter }, "{name}");
            assert_eq!(msg, expected, "{name}");
            assert_eq!(
                seal(eui, counter, &expected, &key).as_slice(),
                frame,
                "{name}: re-encoding"
            );
            // The grouping in the text is the field layout.
            let groups: Vec<&str> = v["frame"].split(' ').collect();
            assert_eq!(groups.len(), 5, "{name}: MHDR EUI FCnt body tag");
            assert_eq!(groups[1], v["eui"], "{name}: EUI group");
        }
        (None, Some(code)) => {
            let err = open::<M>(&frame, &key).expect_err(name);
            assert_eq!(err.reason(), code, "{name}");
            // Where the header still parses, it says what the block says.
            if let Ok(raw) = RawFrame::parse(&frame) {
                assert_eq!((raw.header().eui, raw.header().counter), (eui, counter), "{name}");
            }
        }
        _ => panic!("{name}: a vector needs exactly one of message or error"),
    }
}

#[test]
fn every_vector_in_spec_md_matches_the_code() {
    let blocks = vector_blocks();
    assert!(blocks.len() >= 15, "only {} vectors", blocks.len());
    // The gateway's own steps (topic, registry, counter window, frame budget) are checked by
    // the gateway's tests (`gateway/tests/spec_vectors.rs`); here only that the frame is sound.
    for v in blocks.iter().filter(|v| v.get("receiver").is_some_and(|r| r == "gateway")) {
        let key = DeviceKey::from_hex(&v["key"]).unwrap();
        let frame = hex::decode(v["frame"].replace(' ', "")).unwrap();
        assert!(open::<Uplink>(&frame, &key).is_ok(), "{}: the frame itself must open", v["name"]);
    }
    for v in blocks.iter().filter(|v| !v.contains_key("receiver")) {
        match v["direction"].as_str() {
            "up" => check::<Uplink>(v),
            "down" => check::<Downlink>(v),
            other => panic!("{}: direction {other}", v["name"]),
        }
    }
}

#[test]
fn every_message_kind_of_both_directions_has_a_vector() {
    let uplinks = examples::uplinks();
    let downlinks = examples::downlinks();
    // The examples cover every variant, so they list every kind.
    assert_eq!(uplinks.len() as u32, Uplink::KNOWN_VARIANTS);
    assert_eq!(downlinks.len() as u32, Downlink::KNOWN_VARIANTS);
    let named: BTreeSet<String> = vector_blocks()
        .into_iter()
        .filter(|v| v.contains_key("message"))
        .map(|v| format!("{} {}", v["direction"], v["name"]))
        .collect();
    let wanted = uplinks
        .iter()
        .map(|m| (Direction::Uplink, m.kind_name()))
        .chain(downlinks.iter().map(|m| (Direction::Downlink, m.kind_name())));
    for (direction, kind) in wanted {
        let key = format!("{} {kind}", direction.as_str());
        assert!(named.contains(&key), "SPEC.md has no vector for {key}");
    }
}

#[test]
fn the_bounds_spec_md_quotes_are_the_code_s() {
    let uplink_row = format!(
        "| uplink | {} bytes (a `Backlog` of 24 `Fix` samples, every varint at its longest) | {} bytes |",
        Uplink::POSTCARD_MAX_SIZE,
        MAX_UPLINK_FRAME_LEN
    );
    let downlink_row = format!(
        "| downlink | {} bytes (a `Config` of 16 settings, each a 1-byte index and a 5-byte varint) | {} bytes |",
        Downlink::POSTCARD_MAX_SIZE,
        MAX_DOWNLINK_FRAME_LEN
    );
    assert!(SPEC.contains(&uplink_row), "SPEC.md §7.3 should say: {uplink_row}");
    assert!(SPEC.contains(&downlink_row), "SPEC.md §7.3 should say: {downlink_row}");
    assert_eq!(gridsense_protocol::MAX_BACKLOG_SAMPLES, 24);
    assert_eq!(gridsense_protocol::MAX_SETTINGS, 16);
    assert_eq!(gridsense_protocol::MAX_NOTE_BYTES, 96);
}

/// The error codes §8 names, from its table.
fn section_8_codes() -> BTreeSet<String> {
    let section = SPEC.split("## 8.").nth(1).unwrap().split("## 9.").next().unwrap();
    let mut codes = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| step")) {
        let last = row.trim_end_matches('|').rsplit('|').next().unwrap_or("");
        for code in last.split('`').skip(1).step_by(2) {
            codes.insert(code.to_owned());
        }
    }
    codes
}

#[test]
fn every_error_code_of_section_8_has_a_vector() {
    let codes = section_8_codes();
    assert!(codes.len() >= 17, "{codes:?}");
    let covered: BTreeSet<String> =
        vector_blocks().into_iter().filter_map(|v| v.get("error").cloned()).collect();
    let missing: Vec<_> = codes.difference(&covered).collect();
    assert!(missing.is_empty(), "SPEC.md §8 codes without a vector: {missing:?}");
    let unknown: Vec<_> = covered.difference(&codes).collect();
    assert!(unknown.is_empty(), "vectors with codes §8 does not name: {unknown:?}");
}
