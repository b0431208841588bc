//! # gridsense wire format, version 1
//!
//! The one place the bytes between field devices and the gateway are defined (`SPEC.md` beside
//! this crate documents them byte by byte, with test vectors that the tests check against this
//! code). `#![no_std]`, no allocation: it runs on the devices as it runs in the gateway.
//!
//! - [`frame`]: the envelope: header (version, direction, EUI, counter), postcard body,
//!   AES-128-CMAC tag; sealing at send time and total, typed decoding.
//! - [`message`]: the [`Uplink`] and [`Downlink`] message enums, which only grow at the end.
//! - [`counter`]: the per-device sliding counter window (new / duplicate / replay / reset).
//! - [`topic`]: the MQTT topic scheme.
//! - [`DeviceKey`], [`Eui`], [`DeviceTime`]: identity, keys that never reach a log, and device
//!   time in seconds since 2025-01-01T00:00:00Z.
#![no_std]

pub mod counter;
mod eui;
pub mod examples;
pub mod frame;
mod hex;
mod key;
pub mod message;
#[cfg(feature = "proptest")]
pub mod strategy;
mod time;
pub mod topic;

pub use counter::{CounterVerdict, CounterWindow};
pub use eui::{Eui, EuiParseError};
pub use frame::{
    FORMAT_VERSION, FrameBuf, FrameError, HEADER_LEN, Header, MAX_DOWNLINK_FRAME_LEN,
    MAX_FRAME_LEN, MAX_UPLINK_FRAME_LEN, MIN_FRAME_LEN, RawFrame, SealError, TAG_LEN,
    VerifiedFrame, open, seal, seal_into,
};
pub use key::{DeviceKey, KEY_LEN, KeyParseError};
pub use message::*;
pub use time::{DeviceTime, EPOCH_UNIX_S};
