//! The MQTT topic scheme (SPEC.md §2), `{eui}` being the device EUI as 16 lowercase hex digits
//! and `{shard}` its shard as 2 lowercase hex digits:
//!
//! - `gridsense/{shard}/{eui}/up`: a device's telemetry, status and everything not urgent;
//! - `gridsense/{shard}/{eui}/urgent`: its urgent frames (alarms raised and cleared, SOS,
//!   incident reports), a lane of their own so that they never wait behind telemetry;
//! - `gridsense/{eui}/down`: downlinks to it;
//! - `gridsense/{eui}/up`: version 1's uplink topic, still accepted from devices in the field.
//!
//! A device's shard is [`shard_of`] its EUI for the deployment's number of shards (fixed when
//! its store is made): every gateway instance handles whole shards, one MQTT session per shard
//! and lane. Broker ACLs bind each device's account to its own topics whatever the shard level
//! says (Mosquitto's patterns cannot compute a shard), so the gateway checks that the shard
//! level is the EUI's, and that a frame's EUI matches its topic.

use core::fmt::{self, Write as _};

use heapless::String;

use crate::{Direction, Eui};

/// The first level of every gridsense topic.
pub const TOPIC_PREFIX: &str = "gridsense";
/// The filter for version 1's uplinks (`gridsense/{eui}/up`, no shard level).
pub const UPLINK_FILTER: &str = "gridsense/+/up";
/// Longest topic the scheme produces (`gridsense/` + 2 + `/` + 16 + `/urgent`).
pub const MAX_TOPIC_LEN: usize = 36;
/// The most shards a deployment may have (the shard level is two hex digits).
pub const MAX_SHARDS: u16 = 256;
/// Shards of a deployment unless it says otherwise (`[cluster] shards`).
pub const DEFAULT_SHARDS: u16 = 64;

/// The lane a message goes on: urgent for what must never wait behind telemetry — an alarm
/// raised or cleared, an SOS, an incident report — everything else on `up`.
pub const fn lane_of(message: &crate::Uplink) -> Lane {
    match message {
        crate::Uplink::AlarmRaised(_)
        | crate::Uplink::AlarmCleared(_)
        | crate::Uplink::Sos(_)
        | crate::Uplink::IncidentReport(_) => Lane::Urgent,
        _ => Lane::Up,
    }
}

/// Which of a device's two uplink topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// `…/up`: telemetry, status, everything not urgent.
    Up,
    /// `…/urgent`: alarms raised and cleared, SOS, incident reports.
    Urgent,
}

impl Lane {
    /// The topic's last level.
    pub const fn as_str(self) -> &'static str {
        match self {
            Lane::Up => "up",
            Lane::Urgent => "urgent",
        }
    }
}

/// The shard of a device among `shards` (1 ..= [`MAX_SHARDS`]; outside that, clamped):
/// MurmurHash3's 64-bit finaliser of the EUI, modulo `shards`. A mix rather than the EUI's low
/// bits, so that EUIs a vendor hands out in steps still spread evenly.
pub const fn shard_of(eui: Eui, shards: u16) -> u8 {
    let n = if shards == 0 {
        1
    } else if shards > MAX_SHARDS {
        MAX_SHARDS as u64
    } else {
        shards as u64
    };
    let mut k = eui.0;
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    // `n` ≤ 256, so the remainder fits.
    #[allow(clippy::cast_possible_truncation)]
    let shard = (k % n) as u8;
    shard
}

/// The topic a device publishes (`Uplink`, version 1's form) or receives (`Downlink`) frames
/// on.
pub fn topic(eui: Eui, direction: Direction) -> String<MAX_TOPIC_LEN> {
    let mut out = String::new();
    // Cannot fail: the longest result is MAX_TOPIC_LEN bytes.
    let _ = write!(out, "{TOPIC_PREFIX}/{eui}/{}", direction.as_str());
    out
}

/// A device's uplink topic on `lane` in its shard (`gridsense/{shard}/{eui}/{up|urgent}`).
pub fn uplink_topic(eui: Eui, shards: u16, lane: Lane) -> String<MAX_TOPIC_LEN> {
    let mut out = String::new();
    // Cannot fail: the longest result is MAX_TOPIC_LEN bytes.
    let _ = write!(out, "{TOPIC_PREFIX}/{:02x}/{eui}/{}", shard_of(eui, shards), lane.as_str());
    out
}

/// The filter for one shard's uplinks on one lane (`gridsense/{shard}/+/{up|urgent}`).
pub fn shard_filter(shard: u8, lane: Lane) -> String<MAX_TOPIC_LEN> {
    let mut out = String::new();
    let _ = write!(out, "{TOPIC_PREFIX}/{shard:02x}/+/{}", lane.as_str());
    out
}

/// The filter for every shard's uplinks on one lane (`gridsense/+/+/{up|urgent}`).
pub fn all_shards_filter(lane: Lane) -> String<MAX_TOPIC_LEN> {
    let mut out = String::new();
    let _ = write!(out, "{TOPIC_PREFIX}/+/+/{}", lane.as_str());
    out
}

/// What a topic names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `gridsense/{shard}/{eui}/{up|urgent}`.
    Uplink {
        /// The device.
        eui: Eui,
        /// The shard level as written (the gateway checks it is the EUI's).
        shard: u8,
        /// Which lane.
        lane: Lane,
    },
    /// `gridsense/{eui}/up`: version 1's uplink topic.
    LegacyUplink(Eui),
    /// `gridsense/{eui}/down`.
    Downlink(Eui),
}

/// A topic outside the gridsense scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Not one of the scheme's forms.
    NotGridsense,
    /// The device level is not 16 lowercase hex digits.
    BadEui,
    /// The shard level is not 2 lowercase hex digits.
    BadShard,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::NotGridsense => {
                "topic is not gridsense/{shard}/{eui}/up|urgent, gridsense/{eui}/up or gridsense/{eui}/down"
            }
            TopicError::BadEui => "topic's device level is not 16 lowercase hex digits",
            TopicError::BadShard => "topic's shard level is not 2 lowercase hex digits",
        })
    }
}

impl core::error::Error for TopicError {}

/// The device and direction a topic names (any of the scheme's forms).
pub fn parse_topic(topic: &str) -> Result<(Eui, Direction), TopicError> {
    Ok(match parse_route(topic)? {
        Route::Uplink { eui, .. } | Route::LegacyUplink(eui) => (eui, Direction::Uplink),
        Route::Downlink(eui) => (eui, Direction::Downlink),
    })
}

/// What a topic names: its device, and for an uplink its shard level and lane.
pub fn parse_route(topic: &str) -> Result<Route, TopicError> {
    let mut levels = topic.split('/');
    let (Some(TOPIC_PREFIX), Some(second), Some(third)) =
        (levels.next(), levels.next(), levels.next())
    else {
        return Err(TopicError::NotGridsense);
    };
    match (levels.next(), levels.next()) {
        (None, _) => {
            let eui = parse_eui(second)?;
            match third {
                "up" => Ok(Route::LegacyUplink(eui)),
                "down" => Ok(Route::Downlink(eui)),
                _ => Err(TopicError::NotGridsense),
            }
        }
        (Some(last), None) => {
            let lane = match last {
                "up" => Lane::Up,
                "urgent" => Lane::Urgent,
                _ => return Err(TopicError::NotGridsense),
            };
            let shard = parse_shard(second)?;
            Ok(Route::Uplink { eui: parse_eui(third)?, shard, lane })
        }
        (Some(_), Some(_)) => Err(TopicError::NotGridsense),
    }
}

fn parse_eui(level: &str) -> Result<Eui, TopicError> {
    if level.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(TopicError::BadEui);
    }
    level.parse().map_err(|_| TopicError::BadEui)
}

fn parse_shard(level: &str) -> Result<u8, TopicError> {
    let b = level.as_bytes();
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    match b {
        [hi, lo] => match (digit(*hi), digit(*lo)) {
            (Some(h), Some(l)) => Ok(h * 16 + l),
            _ => Err(TopicError::BadShard),
        },
        _ => Err(TopicError::BadShard),
    }
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
        assert_eq!(topic(Eui(u64::MAX), Direction::Downlink).len(), 31);
    }

    #[test]
    fn sharded_topics_round_trip_and_name_the_euis_shard() {
        let eui = Eui(0x3205_0801_0100_0001);
        let shard = shard_of(eui, 64);
        let up = uplink_topic(eui, 64, Lane::Up);
        let mut want: String<MAX_TOPIC_LEN> = String::new();
        write!(want, "gridsense/{shard:02x}/3205080101000001/up").unwrap();
        assert_eq!(up, want);
        assert_eq!(parse_route(&up), Ok(Route::Uplink { eui, shard, lane: Lane::Up }));
        let urgent = uplink_topic(eui, 64, Lane::Urgent);
        assert_eq!(parse_route(&urgent), Ok(Route::Uplink { eui, shard, lane: Lane::Urgent }));
        assert_eq!(parse_topic(&urgent), Ok((eui, Direction::Uplink)));
        assert_eq!(uplink_topic(Eui(u64::MAX), 256, Lane::Urgent).len(), MAX_TOPIC_LEN);
        assert_eq!(
            parse_route("gridsense/3205080101000001/up"),
            Ok(Route::LegacyUplink(eui)),
            "version 1's topic"
        );
        assert_eq!(shard_filter(7, Lane::Urgent).as_str(), "gridsense/07/+/urgent");
        assert_eq!(all_shards_filter(Lane::Up).as_str(), "gridsense/+/+/up");
        for bad in [
            "gridsense/7/3205080101000001/up",
            "gridsense/0A/3205080101000001/up",
            "gridsense/g0/3205080101000001/up",
        ] {
            assert_eq!(parse_route(bad), Err(TopicError::BadShard), "{bad}");
        }
        for bad in ["gridsense/07/3205080101000001/down", "gridsense/07/3205080101000001/up/x"] {
            assert_eq!(parse_route(bad), Err(TopicError::NotGridsense), "{bad}");
        }
    }

    #[test]
    fn shards_are_fixed_by_the_eui_and_even_for_sequential_and_stepped_euis() {
        // The values SPEC.md gives (an independent implementation checks against them).
        assert_eq!(shard_of(Eui(0x3205_0801_0100_0001), 64), SPEC_SHARD_OF_0001);
        assert_eq!(shard_of(Eui(0), 1), 0);
        assert_eq!(shard_of(Eui(5), 0), 0, "no shards: one");
        for step in [1u64, 64, 256, 4096] {
            let mut counts = [0u32; 64];
            for n in 0..64_000u64 {
                counts[usize::from(shard_of(Eui(0x3205_0801_0000_0000 + n * step), 64))] += 1;
            }
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            // 1,000 each on average; a fair hash stays within a few percent.
            assert!(*min > 850 && *max < 1_150, "step {step}: {min} … {max}");
        }
    }

    const SPEC_SHARD_OF_0001: u8 = 0x1d;

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
