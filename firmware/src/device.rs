//! The device core, sans-IO in the manner of quinn-proto: inputs go in with `now`
//! (`handle_*`), frames and deadlines come out (`poll_*`). No clock, socket or executor here;
//! the MQTT session (or the simulator, or a test) drives it.
//!
//! Order of use by a driver, at every wake-up:
//! 1. if [`Device::sample_due`], read the sensors and call [`Device::handle_input`];
//! 2. call [`Device::handle_timeout`] (heartbeats);
//! 3. while connected and nothing awaits a PUBACK, publish [`Device::poll_transmit`];
//!    on PUBACK call [`Device::handle_puback`]; downlink payloads go to
//!    [`Device::handle_downlink`];
//! 4. sleep until [`Device::poll_timeout`], a packet, or a user action.

use gridsense_protocol::{
    AckOutcome, AlarmKind, CounterVerdict, CounterWindow, DeviceKey, Direction, Downlink,
    DownlinkAck, Eui, FirmwareVersion, FrameBuf, FrameError, RawFrame, ResetCause, Status, seal,
    topic::{Lane, MAX_TOPIC_LEN, lane_of, topic, uplink_topic},
};

use crate::{
    Config, Instant, WallClock,
    counter::{CounterError, CounterStore, FrameCounter},
    outbox::{Outbox, OutboxStats, Sink, Urgent},
    sensing::{Context, Latch, Sensing, latch_message},
};

/// An MQTT topic, as the protocol crate writes it.
pub type TopicName = heapless::String<MAX_TOPIC_LEN>;

/// A frame to publish and the topic it goes on.
#[derive(Debug)]
pub struct Transmit<'a> {
    /// Its lane's topic, or version 1's.
    pub topic: TopicName,
    /// The sealed frame.
    pub frame: &'a [u8],
}

/// How far above the low-battery level (mV) the battery must recover before the alarm clears.
pub const BATTERY_HYSTERESIS_MV: u16 = 100;

/// Who a device is: identity and firmware facts that go into its status.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The device EUI.
    pub eui: Eui,
    /// Its key (never logged: `Debug` redacts it).
    pub key: DeviceKey,
    /// Running firmware version.
    pub firmware: FirmwareVersion,
    /// Why it last reset.
    pub reset_cause: ResetCause,
}

/// Battery, radio and temperature, read by the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Battery voltage, mV.
    pub battery_mv: u16,
    /// Radio signal strength, dBm.
    pub rssi_dbm: i16,
    /// Board temperature, 0.1 °C.
    pub temperature_dc: i16,
}

/// Why a downlink was not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownlinkError {
    /// The frame is malformed or its tag does not verify.
    Frame(FrameError),
    /// The frame is for another device.
    WrongDevice(Eui),
    /// The counter was seen before or is too old.
    Counter(CounterVerdict),
}

/// Why nothing could be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransmitError<E> {
    /// The counter reservation could not be persisted, or the counter is exhausted.
    Counter(CounterError<E>),
}

/// Running counts, for the status page of a board and the simulator's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceStats {
    /// Frames sealed (first sends, not resends).
    pub frames_sealed: u32,
    /// Frames the broker acknowledged.
    pub frames_acked: u32,
    /// Resends of a frame still awaiting its PUBACK.
    pub resends: u32,
    /// Downlinks applied.
    pub downlinks_applied: u32,
    /// Downlinks rejected.
    pub downlinks_rejected: u32,
}

/// A field device: common core plus one kind's [`Sensing`] policy, an outbox of `U` urgent
/// messages and `T` telemetry samples, and counter storage `C`.
#[derive(Debug)]
pub struct Device<S: Sensing, C: CounterStore, const U: usize, const T: usize> {
    id: Identity,
    sensing: S,
    config: Config,
    clock: WallClock,
    outbox: Outbox<U, T>,
    store: C,
    counter: FrameCounter,
    /// The sealed frame awaiting its PUBACK; resent byte-identical until then.
    in_flight: Option<FrameBuf>,
    in_flight_sent: bool,
    /// The lane of the frame in flight.
    in_flight_lane: Lane,
    /// The counter of the frame in flight, and whether it is to be kept until the gateway
    /// confirms it (a frame on a sharded topic, not already held).
    in_flight_counter: u32,
    in_flight_confirm: bool,
    /// Urgent frames awaiting the gateway's `UplinkAck`.
    confirm: crate::confirm::Urgent,
    /// Other frames awaiting an `UplinkWindow` that holds them.
    confirm_up: crate::confirm::Telemetry,
    /// Whether urgent frames wait for the gateway's confirmation (off for a transport that
    /// takes no downlink, such as the pooled load).
    confirmations: bool,
    downlinks: CounterWindow,
    health: Option<Health>,
    low_battery: Latch,
    next_status: Instant,
    stats: DeviceStats,
}

impl<S: Sensing, C: CounterStore, const U: usize, const T: usize> Device<S, C, U, T> {
    /// Boots a device at `now` with default settings for its kind. Reads the counter store.
    pub fn boot(
        id: Identity,
        sensing: S,
        mut store: C,
        clock: WallClock,
        now: Instant,
    ) -> Result<Self, C::Error> {
        let counter = FrameCounter::boot(&mut store)?;
        Ok(Device {
            id,
            sensing,
            config: Config::defaults(S::KIND),
            clock,
            outbox: Outbox::new(),
            store,
            counter,
            in_flight: None,
            in_flight_sent: false,
            in_flight_lane: Lane::Up,
            in_flight_counter: 0,
            in_flight_confirm: false,
            confirm: crate::confirm::Urgent::new(crate::confirm::URGENT_ACK_TIMEOUT_MS),
            confirm_up: crate::confirm::Telemetry::new(crate::confirm::TELEMETRY_ACK_TIMEOUT_MS),
            confirmations: true,
            downlinks: CounterWindow::new(),
            health: None,
            low_battery: Latch::default(),
            next_status: now,
            stats: DeviceStats::default(),
        })
    }

    /// The device EUI.
    pub const fn eui(&self) -> Eui {
        self.id.eui
    }

    /// Current settings.
    pub const fn config(&self) -> &Config {
        &self.config
    }

    /// Applies settings locally (provisioning, or a test bench), all or none, as a `Config`
    /// downlink would.
    pub fn configure(&mut self, settings: &[gridsense_protocol::Setting]) -> AckOutcome {
        self.config.apply(S::KIND, settings)
    }

    /// The sensing policy, for inspection.
    pub const fn sensing(&self) -> &S {
        &self.sensing
    }

    /// The counter store, for inspection.
    pub const fn store(&self) -> &C {
        &self.store
    }

    /// Takes the counter store back (what survives a power loss).
    pub fn into_store(self) -> C {
        self.store
    }

    /// Running counts.
    pub const fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// What the outbox had to drop or refuse.
    pub const fn outbox_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// Messages waiting (urgent, telemetry samples), not counting the one in flight.
    pub fn backlog(&self) -> (usize, usize) {
        (self.outbox.urgent_len(), self.outbox.telemetry_len())
    }

    /// Whether anything waits to be sent or acknowledged.
    pub fn has_pending(&self) -> bool {
        self.in_flight.is_some()
            || !self.outbox.is_empty()
            || self.confirm.has_resend()
            || self.confirm_up.has_resend()
    }

    /// Urgent frames sent and awaiting the gateway's confirmation, and the counts of
    /// confirmed, resent and given-up ones.
    pub const fn confirmations(&self) -> &crate::confirm::Urgent {
        &self.confirm
    }

    /// The other frames sent and awaiting the gateway's cumulative confirmation, and the
    /// counts of confirmed, resent, given-up and expired ones.
    pub const fn telemetry_confirmations(&self) -> &crate::confirm::Telemetry {
        &self.confirm_up
    }

    /// Whether frames are kept until the gateway confirms them (default on; off for a
    /// transport that takes no downlink).
    pub fn set_confirmations(&mut self, on: bool) {
        self.confirmations = on;
    }

    /// Connected again (to either broker): unconfirmed frames go again.
    pub fn reconnected(&mut self) {
        self.confirm.reconnected();
        self.confirm_up.reconnected();
    }

    /// Whether a frame awaits its PUBACK.
    pub const fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Wall-clock time at `now`.
    pub fn time_at(&self, now: Instant) -> gridsense_protocol::DeviceTime {
        self.clock.at(now)
    }

    /// Sets the wall clock to `time` at `now` (an RTC reading, or a board's mapping of a time
    /// sync, [`crate::session::Board::map_time_sync`]).
    pub fn set_time(&mut self, now: Instant, time: gridsense_protocol::DeviceTime) {
        self.clock.sync(now, time);
    }

    fn context_parts(&mut self, now: Instant) -> (&mut S, Context<'_>) {
        let time = self.clock.at(now);
        (&mut self.sensing, Context { config: &self.config, time, sink: &mut self.outbox })
    }

    /// Whether the policy wants a sensor reading at `now`.
    pub fn sample_due(&self, now: Instant) -> bool {
        self.sensing.next_sample_at(&self.config).is_some_and(|at| at <= now)
    }

    /// A sensor reading or user action at `now`.
    pub fn handle_input(&mut self, now: Instant, input: S::Input) {
        let (sensing, mut cx) = self.context_parts(now);
        sensing.on_input(now, input, &mut cx);
    }

    /// Battery, signal and temperature at `now`; raises or clears the low-battery alarm.
    pub fn handle_health(&mut self, now: Instant, health: Health) {
        self.health = Some(health);
        let time = self.clock.at(now);
        let low = self.config.low_battery_mv;
        let on = health.battery_mv < low;
        let off = u32::from(health.battery_mv) >= u32::from(low) + u32::from(BATTERY_HYSTERESIS_MV);
        if let Some(change) = self.low_battery.update(time, on, off) {
            let msg = latch_message(change, AlarmKind::LowBattery, health.battery_mv.into(), time);
            self.outbox.urgent(msg);
        }
    }

    /// Heartbeats due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.confirm.tick(now);
        self.confirm_up.tick(now);
        if now >= self.next_status {
            self.outbox.status(self.status(now));
            self.next_status = now.add_secs(self.config.heartbeat_interval_s);
        }
    }

    /// The earliest instant the device needs to run again.
    pub fn poll_timeout(&self) -> Instant {
        let next = match self.sensing.next_sample_at(&self.config) {
            Some(at) => at.min(self.next_status),
            None => self.next_status,
        };
        [self.confirm.next_due(), self.confirm_up.next_due()]
            .into_iter()
            .flatten()
            .fold(next, Instant::min)
    }

    fn status(&self, now: Instant) -> Status {
        let health =
            self.health.unwrap_or(Health { battery_mv: 0, rssi_dbm: 0, temperature_dc: 0 });
        Status {
            at: self.clock.at(now),
            battery_mv: health.battery_mv,
            rssi_dbm: health.rssi_dbm,
            temperature_dc: health.temperature_dc,
            firmware: self.id.firmware,
            uptime_s: u32::try_from(now.as_millis() / 1000).unwrap_or(u32::MAX),
            reset_cause: self.id.reset_cause,
        }
    }

    /// The next frame to publish with QoS1: the frame awaiting its PUBACK (byte-identical), or
    /// the next waiting message sealed now with the next counter. `None` if nothing waits.
    pub fn poll_transmit(&mut self) -> Result<Option<&[u8]>, TransmitError<C::Error>> {
        if !self.prepare_transmit()? {
            return Ok(None);
        }
        Ok(self.in_flight.as_deref())
    }

    /// As [`Device::poll_transmit`], with the topic the frame goes on
    /// ([`Device::transmit_topic`]).
    pub fn poll_transmit_on(&mut self) -> Result<Option<Transmit<'_>>, TransmitError<C::Error>> {
        if !self.prepare_transmit()? {
            return Ok(None);
        }
        let topic = self.transmit_topic();
        Ok(self.in_flight.as_deref().map(|frame| Transmit { topic, frame }))
    }

    /// Seals the next waiting message if nothing is in flight; false when nothing waits.
    fn prepare_transmit(&mut self) -> Result<bool, TransmitError<C::Error>> {
        if self.in_flight.is_none() {
            // An urgent frame whose confirmation is overdue goes first, byte-identical.
            // Then new urgent messages, then the other frames whose confirmation is overdue.
            let resend = match self.confirm.next_resend() {
                Some(urgent) => Some((urgent, Lane::Urgent)),
                None if self.outbox.urgent_len() == 0 => {
                    self.confirm_up.next_resend().map(|up| (up, Lane::Up))
                }
                None => None,
            };
            if let Some(((counter, frame), lane)) = resend {
                self.in_flight = Some(frame);
                self.in_flight_lane = lane;
                (self.in_flight_counter, self.in_flight_confirm) = (counter, false);
                self.in_flight_sent = true;
                self.stats.resends = self.stats.resends.saturating_add(1);
                return Ok(true);
            }
            if self.outbox.is_empty() {
                return Ok(false);
            }
            let counter = self.counter.next(&mut self.store).map_err(TransmitError::Counter)?;
            let Some(msg) = self.outbox.take_next() else { return Ok(false) };
            self.in_flight = Some(seal(self.id.eui, counter, &msg, &self.id.key));
            self.in_flight_lane = lane_of(&msg);
            self.in_flight_counter = counter;
            // Only the gateway of the sharded topics confirms (SPEC §7.2).
            self.in_flight_confirm = self.confirmations && self.config.shards != 0;
            self.in_flight_sent = false;
            self.stats.frames_sealed = self.stats.frames_sealed.saturating_add(1);
        } else if self.in_flight_sent {
            self.stats.resends = self.stats.resends.saturating_add(1);
        }
        self.in_flight_sent = true;
        Ok(true)
    }

    /// The topic the frame in flight goes on: its shard's lane once the device knows the
    /// deployment's shards ([`Config::shards`]), else version 1's uplink topic.
    pub fn transmit_topic(&self) -> TopicName {
        match self.config.shards {
            0 => topic(self.id.eui, Direction::Uplink),
            shards => uplink_topic(self.id.eui, shards, self.in_flight_lane),
        }
    }

    /// The broker acknowledged the frame in flight: it is delivered and can be forgotten.
    pub fn handle_puback(&mut self) {
        if let Some(frame) = self.in_flight.take() {
            self.stats.frames_acked = self.stats.frames_acked.saturating_add(1);
            if core::mem::take(&mut self.in_flight_confirm) {
                match self.in_flight_lane {
                    Lane::Urgent => self.confirm.keep(self.in_flight_counter, &frame),
                    Lane::Up => self.confirm_up.keep(self.in_flight_counter, &frame),
                }
            }
        }
    }

    /// A frame arrived on the device's downlink topic at `now`. Authentic, new downlinks are
    /// applied; configuration and time sync are answered with a [`DownlinkAck`].
    pub fn handle_downlink(
        &mut self,
        now: Instant,
        bytes: &[u8],
    ) -> Result<Downlink, DownlinkError> {
        let result = self.open_downlink(bytes);
        let Ok((counter, downlink)) = result else {
            self.stats.downlinks_rejected = self.stats.downlinks_rejected.saturating_add(1);
            return result.map(|(_, d)| d);
        };
        let outcome = match &downlink {
            Downlink::Config { settings } => Some(self.config.apply(S::KIND, settings)),
            Downlink::TimeSync { now: gateway } => {
                self.clock.sync(now, *gateway);
                Some(AckOutcome::Applied)
            }
            Downlink::UplinkAck { counter } => {
                self.confirm.confirmed(*counter);
                None
            }
            Downlink::UplinkWindow { highest, seen } => {
                // The window holds every lane's frames: a lost `UplinkAck` is made good too.
                self.confirm_up.confirmed_window(*highest, *seen);
                self.confirm.confirmed_window(*highest, *seen);
                None
            }
            Downlink::StatusRequest => {
                self.outbox.status(self.status(now));
                None
            }
        };
        if let Some(outcome) = outcome {
            self.outbox.urgent(Urgent::Ack(DownlinkAck { counter, outcome }));
        }
        self.stats.downlinks_applied = self.stats.downlinks_applied.saturating_add(1);
        Ok(downlink)
    }

    fn open_downlink(&mut self, bytes: &[u8]) -> Result<(u32, Downlink), DownlinkError> {
        let raw = RawFrame::parse(bytes).map_err(DownlinkError::Frame)?;
        let header = raw.header();
        if header.eui != self.id.eui {
            return Err(DownlinkError::WrongDevice(header.eui));
        }
        let verified = raw.verify(&self.id.key).map_err(DownlinkError::Frame)?;
        let downlink = verified.decode::<Downlink>().map_err(DownlinkError::Frame)?;
        match self.downlinks.accept(header.counter) {
            CounterVerdict::New { .. } => Ok((header.counter, downlink)),
            other => Err(DownlinkError::Counter(other)),
        }
    }
}
