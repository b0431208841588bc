//! The MQTT topic scheme: `gridsense/{eui}/up` and `gridsense/{eui}/down`, `{eui}` being the
//! device EUI as 16 lowercase hex digits. Broker ACLs bind each device's account to its own two
//! topics, and the gateway checks that a frame's EUI matches the topic it arrived on.

use core::fmt::{self, Write as _};

use heapless::String;

use crate::{Direction, Eui};

/// The first level of every gridsense topic.
pub const TOPIC_PREFIX: &str = "gridsense";
/// The filter the gateway subscribes to for every device's uplink.
pub const UPLINK_FILTER: &str = "gridsense/+/up";
/// Longest topic the scheme produces (`gridsense/` + 16 + `/down`).
pub const MAX_TOPIC_LEN: usize = 31;

/// The topic a device publishes (`Uplink`) or receives (`Downlink`) frames on.
pub fn topic(eui: Eui, direction: Direction) -> String<MAX_TOPIC_LEN> {
    let mut out = String::new();
    // Cannot fail: the longest result is MAX_TOPIC_LEN bytes.
    let _ = write!(out, "{TOPIC_PREFIX}/{eui}/{}", direction.as_str());
    out
}

/// A topic outside the gridsense scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Not `gridsense/{eui}/{up|down}`.
    NotGridsense,
    /// The device level is not 16 lowercase hex digits.
    BadEui,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::NotGridsense => "topic is not gridsense/{eui}/up or gridsense/{eui}/down",
            TopicError::BadEui => "topic's device level is not 16 lowercase hex digits",
        })
    }
}

impl core::error::Error for TopicError {}

/// The device and direction a topic names.
pub fn parse_topic(topic: &str) -> Result<(Eui, Direction), TopicError> {
    let mut levels = topic.split('/');
    let (Some(TOPIC_PREFIX), Some(device), Some(dir), None) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return Err(TopicError::NotGridsense);
    };
    let direction = match dir {
        "up" => Direction::Uplink,
        "down" => Direction::Downlink,
        _ => return Err(TopicError::NotGridsense),
    };
    if device.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(TopicError::BadEui);
    }
    let eui = device.parse().map_err(|_| TopicError::BadEui)?;
    Ok((eui, direction))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let eui = Eui(0x0123_4567_89ab_cdef);
        assert_eq!(topic(eui, Direction::Uplink).as_str(), "gridsense/0123456789abcdef/up");
        assert_eq!(topic(eui, Direction::Downlink).as_str(), "gridsense/0123456789abcdef/down");
        assert_eq!(parse_topic("gridsense/0123456789abcdef/up"), Ok((eui, Direction::Uplink)));
        assert_eq!(parse_topic("gridsense/0123456789abcdef/down"), Ok((eui, Direction::Downlink)));
        assert_eq!(topic(Eui(u64::MAX), Direction::Downlink).len(), MAX_TOPIC_LEN);
    }

    #[test]
    fn foreign_topics_are_rejected() {
        for bad in [
            "",
            "gridsense",
            "gridsense/0123456789abcdef",
            "gridsense/0123456789abcdef/sideways",
            "gridsense/0123456789abcdef/up/extra",
            "other/0123456789abcdef/up",
        ] {
            assert_eq!(parse_topic(bad), Err(TopicError::NotGridsense), "{bad}");
        }
        for bad in
            ["gridsense/0123456789ABCDEF/up", "gridsense/0123/up", "gridsense/0123456789abcdeg/up"]
        {
            assert_eq!(parse_topic(bad), Err(TopicError::BadEui), "{bad}");
        }
    }
}
