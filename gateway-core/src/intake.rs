//! The first steps of the gateway's path for one uplink, as pure code: topic → envelope →
//! device key → tag → body → counter window. No I/O and no clock; the ingest shell (rumqttc)
//! feeds it and acts on the verdict.
//!
//! [`Intake::check`] changes nothing; [`Intake::commit`] records the counter in memory and
//! returns the window, which the pipeline persists in the same transaction as the frame's
//! effects. The MQTT message is acknowledged only after that commit, so a frame lost before it
//! was stored is redelivered; if a commit fails the gateway stops acknowledging and the state
//! in memory is rebuilt from the store.

use std::collections::HashMap;

use crate::registry::{Device, DeviceId, Kind};
use gridsense_protocol::{
    CounterVerdict, CounterWindow, DeviceKey, Eui, FrameError, Header, RawFrame, Uplink,
    topic::{DEFAULT_SHARDS, Route, parse_route, shard_of},
};

/// Why an uplink was rejected. [`Reject::reason`] is the stable code counted in metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The topic is not a device's uplink topic (`gridsense/{shard}/{eui}/up|urgent`, or
    /// version 1's `gridsense/{eui}/up`).
    BadTopic,
    /// The topic's shard level is not its EUI's shard (the broker's ACLs cannot tell).
    WrongShard {
        /// EUI in the topic.
        eui: Eui,
        /// The shard level the topic has.
        shard: u8,
    },
    /// The envelope or body does not decode.
    Malformed(FrameError),
    /// The frame's EUI is not the one its topic names.
    TopicMismatch {
        /// EUI in the topic.
        topic: Eui,
        /// EUI in the frame header.
        frame: Eui,
    },
    /// No key is registered for this EUI.
    UnknownDevice(Eui),
    /// The tag does not verify under the device's key.
    BadTag(Eui),
    /// Counter seen before (redelivery or resend).
    Duplicate(Eui, u32),
    /// Counter older than the window.
    Replay(Eui, u32),
    /// Counter far below the window and near zero: the device may have lost its counter.
    ResetSuspect(Eui, u32),
    /// The device sent more than its frame budget this minute (throttled before its tag is
    /// even checked).
    RateLimited(Eui),
}

impl Reject {
    /// Stable snake_case reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::BadTopic => "bad_topic",
            Reject::WrongShard { .. } => "wrong_shard",
            Reject::Malformed(e) => e.reason(),
            Reject::TopicMismatch { .. } => "topic_mismatch",
            Reject::UnknownDevice(_) => "unknown_device",
            Reject::BadTag(_) => "bad_tag",
            Reject::Duplicate(..) => "duplicate",
            Reject::Replay(..) => "replay",
            Reject::ResetSuspect(..) => "reset_suspect",
            Reject::RateLimited(_) => "rate_limited",
        }
    }
}

/// An authentic, new uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The device that sent it.
    pub device: Device,
    /// The authenticated header.
    pub header: Header,
    /// The decoded message.
    pub message: Uplink,
    /// Counters skipped since the device's previous highest one (frames lost or late).
    pub skipped: u32,
    /// It came on version 1's topic (`gridsense/{eui}/up`).
    pub legacy: bool,
}

/// Device keys and counter windows for the uplink check, and the dense numbering
/// ([`DeviceId`]) the other per-device state is indexed by.
#[derive(Debug)]
pub struct Intake {
    index: HashMap<Eui, DeviceId>,
    slots: Vec<Slot>,
    registered: usize,
    /// The deployment's shards (`[cluster] shards`): a sharded topic must name the EUI's.
    shards: u16,
}

/// One device: 40 bytes (its key, its window, whether it is registered and as what).
#[derive(Debug, Clone)]
struct Slot {
    key: DeviceKey,
    window: CounterWindow,
    /// `None`: not registered (retired, or only its window is known).
    kind: Option<Kind>,
}

impl Default for Intake {
    fn default() -> Self {
        Intake { index: HashMap::new(), slots: Vec::new(), registered: 0, shards: DEFAULT_SHARDS }
    }
}

impl Intake {
    /// An intake that knows no device yet.
    pub fn new() -> Self {
        Intake::default()
    }

    /// Room for `n` more devices without growing.
    pub fn reserve(&mut self, n: usize) {
        self.index.reserve(n);
        self.slots.reserve_exact(n);
    }

    /// The device's number, given now if it has none (`None` only past 4 billion devices).
    fn slot(&mut self, eui: Eui) -> Option<(DeviceId, &mut Slot)> {
        let next = DeviceId(u32::try_from(self.slots.len()).ok()?);
        let id = *self.index.entry(eui).or_insert(next);
        if id == next {
            let key = DeviceKey::from_bytes([0; 16]);
            self.slots.push(Slot { key, window: CounterWindow::new(), kind: None });
        }
        Some((id, self.slots.get_mut(id.index())?))
    }

    /// The device's number, given now if it has none (registered or not; `None` only past 4
    /// billion devices).
    pub fn number(&mut self, eui: Eui) -> Option<DeviceId> {
        self.slot(eui).map(|(id, _)| id)
    }

    /// The device's number, if it has one (registered or not).
    pub fn id_of(&self, eui: Eui) -> Option<DeviceId> {
        self.index.get(&eui).copied()
    }

    /// Registers (or re-keys) a device. Counters are per key (SPEC §4): a registered device
    /// given a different key starts a new counter space, so its window is forgotten (frames
    /// under the old key no longer verify, so none can be replayed); the same key, or a device
    /// brought back after retirement, keeps the window.
    pub fn register(&mut self, eui: Eui, kind: Kind, key: DeviceKey) -> Option<DeviceId> {
        let (id, slot) = self.slot(eui)?;
        let was = slot.kind.replace(kind);
        if was.is_some() && slot.key != key {
            slot.window = CounterWindow::new();
        }
        slot.key = key;
        if was.is_none() {
            self.registered += 1;
        }
        Some(id)
    }

    /// Stops accepting a device (retired or replaced). Its counter window is kept, so a
    /// device brought back cannot replay old frames.
    pub fn unregister(&mut self, eui: Eui) {
        if let Some(slot) = self.get_mut(eui)
            && slot.kind.take().is_some()
        {
            slot.key = DeviceKey::from_bytes([0; 16]);
            self.registered -= 1;
        }
    }

    /// The deployment's number of shards.
    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// Every device numbered (registered or not), with its number.
    pub fn numbered_devices(&self) -> impl Iterator<Item = (Eui, DeviceId)> + '_ {
        self.index.iter().map(|(eui, id)| (*eui, *id))
    }

    /// Restores a device's persisted counter window.
    pub fn restore_window(&mut self, eui: Eui, window: CounterWindow) {
        if let Some((_, slot)) = self.slot(eui) {
            slot.window = window;
        }
    }

    fn get(&self, eui: Eui) -> Option<&Slot> {
        self.slots.get(self.index.get(&eui)?.index())
    }

    fn get_mut(&mut self, eui: Eui) -> Option<&mut Slot> {
        self.slots.get_mut(self.index.get(&eui)?.index())
    }

    /// A registered device.
    pub fn device(&self, eui: Eui) -> Option<Device> {
        let id = *self.index.get(&eui)?;
        let kind = self.slots.get(id.index())?.kind?;
        Some(Device { id, eui, kind })
    }

    /// A registered device's key.
    pub fn key_of(&self, eui: Eui) -> Option<&DeviceKey> {
        self.get(eui).filter(|s| s.kind.is_some()).map(|s| &s.key)
    }

    /// A registered device's kind.
    pub fn kind_of(&self, eui: Eui) -> Option<Kind> {
        self.get(eui)?.kind
    }

    /// Devices numbered (registered or not): every [`DeviceId`] given is below this.
    pub fn numbered(&self) -> usize {
        self.slots.len()
    }

    /// Registered devices.
    pub fn len(&self) -> usize {
        self.registered
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.registered == 0
    }

    /// The deployment's number of shards (default [`DEFAULT_SHARDS`]).
    pub fn set_shards(&mut self, shards: u16) {
        self.shards = shards;
    }

    /// Checks one uplink. Changes nothing: call [`Self::commit`] once it is stored.
    pub fn check(&self, topic: &str, payload: &[u8]) -> Result<Accepted, Reject> {
        let (topic_eui, legacy) = match parse_route(topic).map_err(|_| Reject::BadTopic)? {
            Route::LegacyUplink(eui) => (eui, true),
            Route::Uplink { eui, shard, .. } if shard == shard_of(eui, self.shards) => (eui, false),
            Route::Uplink { eui, shard, .. } => return Err(Reject::WrongShard { eui, shard }),
            Route::Downlink(_) => return Err(Reject::BadTopic),
        };
        let raw = RawFrame::parse(payload).map_err(Reject::Malformed)?;
        let header = raw.header();
        if header.eui != topic_eui {
            return Err(Reject::TopicMismatch { topic: topic_eui, frame: header.eui });
        }
        let unknown = Reject::UnknownDevice(header.eui);
        let id = *self.index.get(&header.eui).ok_or_else(|| unknown.clone())?;
        let slot = self.slots.get(id.index()).ok_or_else(|| unknown.clone())?;
        let kind = slot.kind.ok_or(unknown)?;
        let verified = raw.verify(&slot.key).map_err(|_| Reject::BadTag(header.eui))?;
        let message = verified.decode::<Uplink>().map_err(Reject::Malformed)?;
        let device = Device { id, eui: header.eui, kind };
        match slot.window.check(header.counter) {
            CounterVerdict::New { skipped } => {
                Ok(Accepted { device, header, message, skipped, legacy })
            }
            CounterVerdict::Duplicate => Err(Reject::Duplicate(header.eui, header.counter)),
            CounterVerdict::Replay => Err(Reject::Replay(header.eui, header.counter)),
            CounterVerdict::ResetSuspect => Err(Reject::ResetSuspect(header.eui, header.counter)),
        }
    }

    /// A device's counter window as accepted so far.
    pub fn window_of(&self, id: DeviceId) -> Option<CounterWindow> {
        self.slots.get(id.index()).map(|s| s.window)
    }

    /// Records an accepted frame's counter (before the next frame is checked, so a copy in
    /// the same batch is a duplicate); returns the device's window to persist with the batch.
    pub fn commit(&mut self, accepted: &Accepted) -> CounterWindow {
        // Checked, so numbered: its slot by number, no second lookup by EUI.
        let Some(slot) = self.slots.get_mut(accepted.device.id.index()) else {
            return CounterWindow::new();
        };
        slot.window.accept(accepted.header.counter);
        slot.window
    }
}

#[cfg(test)]
mod tests {
    use crate::registry::Kind;
    use gridsense_protocol::{
        Direction, examples, seal,
        topic::{Lane, topic, uplink_topic},
    };

    use super::*;

    const EUI: Eui = Eui(0x0102_0304_0506_0708);

    fn intake() -> (Intake, DeviceKey) {
        let key = DeviceKey::from_bytes([5; 16]);
        let mut intake = Intake::new();
        intake.register(EUI, Kind::Cover, key.clone());
        (intake, key)
    }

    #[test]
    fn both_lanes_of_the_eui_s_shard_and_version_1_s_topic_are_accepted() {
        let (mut intake, key) = intake();
        let msg = examples::uplinks()[1].clone();
        let topics = [
            uplink_topic(EUI, DEFAULT_SHARDS, Lane::Up).to_string(),
            uplink_topic(EUI, DEFAULT_SHARDS, Lane::Urgent).to_string(),
            up(EUI),
        ];
        for (n, t) in (1..).zip(&topics) {
            let accepted = intake.check(t, &seal(EUI, n, &msg, &key)).expect(t);
            intake.commit(&accepted);
        }
        // With another number of shards the EUI's shard differs, and so does its topic.
        let mut other = Intake::new();
        other.register(EUI, Kind::Cover, key.clone());
        other.set_shards(7);
        let frame = seal(EUI, 1, &msg, &key);
        assert!(other.check(&uplink_topic(EUI, 7, Lane::Up), &frame).is_ok());
        // (Shard 0 of 7, shard 0x0e of 64: the values an independent fmix64 gives.)
        assert_eq!((shard_of(EUI, 7), shard_of(EUI, 64)), (0, 0x0e));
        assert_eq!(
            other.check(&uplink_topic(EUI, 64, Lane::Up), &frame).map(|_| ()),
            Err(Reject::WrongShard { eui: EUI, shard: 0x0e })
        );
    }

    fn up(eui: Eui) -> String {
        topic(eui, Direction::Uplink).to_string()
    }

    #[test]
    fn accepts_once_and_only_after_commit_rejects_the_duplicate() {
        let (mut intake, key) = intake();
        let msg = examples::uplinks()[0].clone();
        let frame = seal(EUI, 1, &msg, &key);
        let accepted = intake.check(&up(EUI), &frame).expect("accepted");
        assert_eq!(accepted.message, msg);
        // Not committed yet: a redelivery before the store is still new.
        assert!(intake.check(&up(EUI), &frame).is_ok());
        intake.commit(&accepted);
        assert_eq!(intake.check(&up(EUI), &frame), Err(Reject::Duplicate(EUI, 1)));
    }

    #[test]
    fn a_retired_device_keeps_its_number_and_window_and_cannot_replay_when_back() {
        assert!(size_of::<Slot>() <= 40, "{}", size_of::<Slot>());
        let (mut intake, key) = intake();
        let id = intake.device(EUI).unwrap().id;
        let frame = seal(EUI, 5, &examples::uplinks()[0], &key);
        let accepted = intake.check(&up(EUI), &frame).unwrap();
        assert_eq!(accepted.device, Device { id, eui: EUI, kind: Kind::Cover });
        intake.commit(&accepted);
        intake.unregister(EUI);
        assert_eq!((intake.len(), intake.device(EUI), intake.key_of(EUI)), (0, None, None));
        assert_eq!(intake.check(&up(EUI), &frame), Err(Reject::UnknownDevice(EUI)));
        // Back as a drain with a new key: same number, and the old frame is still a duplicate.
        assert_eq!(intake.register(EUI, Kind::Drain, key.clone()), Some(id));
        assert_eq!((intake.len(), intake.kind_of(EUI)), (1, Some(Kind::Drain)));
        assert_eq!(intake.check(&up(EUI), &frame), Err(Reject::Duplicate(EUI, 5)));
        // A window restored for a device never registered numbers it, unregistered.
        intake.restore_window(Eui(9), CounterWindow::from_parts(Some(3), 1));
        assert_eq!((intake.numbered(), intake.len(), intake.device(Eui(9))), (2, 1, None));
        assert_eq!(intake.id_of(Eui(9)), Some(DeviceId(1)));
    }

    #[test]
    fn a_new_key_starts_a_new_counter_space_and_the_same_key_keeps_the_window() {
        let (mut intake, key) = intake();
        let msg = examples::uplinks()[0].clone();
        // The counter is exhausted under the old key.
        let last = seal(EUI, u32::MAX, &msg, &key);
        let accepted = intake.check(&up(EUI), &last).unwrap();
        intake.commit(&accepted);
        // Re-registered with the same key (an import): the window holds, counter 1 is old.
        intake.register(EUI, Kind::Cover, key.clone());
        let first = seal(EUI, 1, &msg, &key);
        assert_eq!(intake.check(&up(EUI), &first), Err(Reject::ResetSuspect(EUI, 1)));
        // Re-keyed: the device starts again at 1; the old key no longer verifies.
        let new_key = DeviceKey::from_bytes([6; 16]);
        intake.register(EUI, Kind::Cover, new_key.clone());
        let again = intake.check(&up(EUI), &seal(EUI, 1, &msg, &new_key)).unwrap();
        intake.commit(&again);
        assert_eq!(
            intake.check(&up(EUI), &seal(EUI, 1, &msg, &new_key)),
            Err(Reject::Duplicate(EUI, 1))
        );
        assert_eq!(intake.check(&up(EUI), &last), Err(Reject::BadTag(EUI)));
    }

    #[test]
    fn every_reject_is_named() {
        let (intake, key) = intake();
        let msg = examples::uplinks()[1].clone();
        let frame = seal(EUI, 1, &msg, &key);
        let other = Eui(9);
        assert_eq!(intake.check("gridsense/x/up", &frame), Err(Reject::BadTopic));
        assert_eq!(intake.check(&topic(EUI, Direction::Downlink), &frame), Err(Reject::BadTopic));
        // A sharded topic must carry the EUI's shard: the broker's ACLs cannot tell.
        let shard = shard_of(EUI, DEFAULT_SHARDS);
        let wrong = (shard + 1) % 64;
        assert_eq!(
            intake.check(&format!("gridsense/{wrong:02x}/{EUI}/up"), &frame).map(|_| ()),
            Err(Reject::WrongShard { eui: EUI, shard: wrong })
        );
        assert_eq!(Reject::WrongShard { eui: EUI, shard: wrong }.reason(), "wrong_shard");
        assert_eq!(
            intake.check(&up(other), &frame),
            Err(Reject::TopicMismatch { topic: other, frame: EUI })
        );
        let stranger = seal(other, 1, &msg, &key);
        assert_eq!(intake.check(&up(other), &stranger), Err(Reject::UnknownDevice(other)));
        let mut tampered = frame.clone();
        if let Some(b) = tampered.get_mut(14) {
            *b ^= 1;
        }
        assert_eq!(intake.check(&up(EUI), &tampered), Err(Reject::BadTag(EUI)));
        assert_eq!(
            intake.check(&up(EUI), &frame[..5]),
            Err(Reject::Malformed(FrameError::Truncated { len: 5 }))
        );
        let downlink = seal(EUI, 1, &examples::downlinks()[0], &key);
        assert_eq!(
            intake.check(&up(EUI), &downlink).map_err(|r| r.reason()),
            Err("wrong_direction")
        );
    }
}
