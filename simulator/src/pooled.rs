//! Pooled transport for load: a few rumqttc connections publish on behalf of many devices,
//! each still decided by its own firmware core and world model. Devices are scheduled on a
//! timer heap per connection; a frame counts as delivered once rumqttc has it (its session
//! retransmits after a reconnect).

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::Result;
use gridsense_firmware::{
    Device, WallClock, beacon::Beacon, counter::RamStore, cover::Cover, drain::Drain,
};
use gridsense_protocol::DeviceKey;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};
use tokio::{sync::watch, task::JoinSet};

use crate::{
    clock::SimClock,
    fleet::{AnyModel, DeviceReport, POOLED_QUEUES, Planned, configure},
    inventory::Device as Record,
    model::{BeaconModel, CoverModel, DrainModel, Env, Model, secs},
    stats::Counters,
};

const U: usize = POOLED_QUEUES.0;
const T: usize = POOLED_QUEUES.1;

/// One device and its world, as the pooled scheduler holds them.
pub struct Slot<M: Model> {
    device: Device<M::Sensing, RamStore, U, T>,
    model: M,
    pending_push: f64,
}

impl<M: Model> std::fmt::Debug for Slot<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("eui", &self.device.eui()).finish_non_exhaustive()
    }
}

/// A pooled device of any kind.
#[derive(Debug)]
pub enum AnySlot {
    /// A cover.
    Cover(Slot<CoverModel>),
    /// A drain.
    Drain(Slot<DrainModel>),
    /// A beacon.
    Beacon(Slot<BeaconModel>),
}

impl<M: Model> Slot<M> {
    /// Runs the device at `now`; returns the frames to publish and its next wake-up (ms).
    fn step(&mut self, now_ms: u64, env: &Env, out: &mut Vec<(String, Vec<u8>)>) -> u64 {
        let now = gridsense_firmware::Instant::from_millis(now_ms);
        let t = secs(now);
        if self.pending_push <= t {
            for input in self.model.take_push(self.pending_push, env) {
                self.device.handle_input(now, input);
            }
        }
        if self.device.sample_due(now) {
            let input = self.model.read(t, env);
            self.device.handle_input(now, input);
            let health = self.model.health(t);
            self.device.handle_health(now, health);
        }
        self.device.handle_timeout(now);
        while let Ok(Some(gridsense_firmware::device::Transmit { topic, frame })) =
            self.device.poll_transmit_on()
        {
            out.push((topic.as_str().to_owned(), frame.to_vec()));
            self.device.handle_puback();
        }
        self.pending_push = self.model.next_push(t);
        let push_ms = if self.pending_push.is_finite() {
            (self.pending_push.max(0.0) * 1000.0).ceil() as u64
        } else {
            u64::MAX
        };
        self.device.poll_timeout().as_millis().min(push_ms).max(now_ms + 1)
    }
}

impl AnySlot {
    fn step(&mut self, now_ms: u64, env: &Env, out: &mut Vec<(String, Vec<u8>)>) -> u64 {
        match self {
            AnySlot::Cover(s) => s.step(now_ms, env, out),
            AnySlot::Drain(s) => s.step(now_ms, env, out),
            AnySlot::Beacon(s) => s.step(now_ms, env, out),
        }
    }

    fn report(&self) -> DeviceReport {
        let (device, outbox) = match self {
            AnySlot::Cover(s) => (s.device.stats(), s.device.outbox_stats()),
            AnySlot::Drain(s) => (s.device.stats(), s.device.outbox_stats()),
            AnySlot::Beacon(s) => (s.device.stats(), s.device.outbox_stats()),
        };
        DeviceReport { device, outbox, ..Default::default() }
    }
}

fn slot<M: Model>(
    record: &Record,
    key: &DeviceKey,
    sensing: M::Sensing,
    model: M,
    clock: &SimClock,
) -> Slot<M> {
    let id = gridsense_firmware::Identity {
        eui: record.eui,
        key: key.clone(),
        firmware: crate::fleet::FIRMWARE,
        reset_cause: gridsense_protocol::ResetCause::PowerOn,
    };
    let boot = Device::boot(
        id,
        sensing,
        RamStore::default(),
        WallClock::new(clock.start_device_time()),
        clock.device_now(),
    );
    // RAM counter storage cannot fail.
    let device = match boot {
        Ok(d) => d,
        Err(never) => match never {},
    };
    Slot { device, model, pending_push: f64::NEG_INFINITY }
}

/// Builds a pooled slot from a planned device.
pub fn make_slot(planned: Planned, clock: &SimClock) -> AnySlot {
    let Planned { record, key, model, .. } = planned;
    match model {
        AnyModel::Cover(m, baseline, settings) => {
            let mut s = slot(&record, &key, Cover::new(baseline), m, clock);
            configure(&mut s.device, &settings);
            // No downlink reaches a pooled device: nothing would ever confirm its alarms.
            s.device.set_confirmations(false);
            AnySlot::Cover(s)
        }
        AnyModel::Drain(m, settings) => {
            let mut s = slot(&record, &key, Drain::new(), m, clock);
            configure(&mut s.device, &settings);
            // No downlink reaches a pooled device: nothing would ever confirm its alarms.
            s.device.set_confirmations(false);
            AnySlot::Drain(s)
        }
        AnyModel::Beacon(m, settings) => {
            let mut s = slot(&record, &key, Beacon::new(), m, clock);
            configure(&mut s.device, &settings);
            // No downlink reaches a pooled device: nothing would ever confirm its alarms.
            s.device.set_confirmations(false);
            AnySlot::Beacon(s)
        }
    }
}

/// What a scheduler entry adds per device: its heap slot (wake time, index).
type AnySlotTag = (u64, usize);

/// Size in memory of one pooled device of each kind: device core and world model (in an
/// `AnySlot`, whose size is that of the largest kind) plus its timer-heap entry. (Street codes
/// are shared, one string per street.)
pub fn slot_sizes() -> [(&'static str, usize); 4] {
    [
        ("any", size_of::<AnySlot>() + size_of::<AnySlotTag>()),
        ("cover", size_of::<Slot<CoverModel>>() + size_of::<AnySlotTag>()),
        ("drain", size_of::<Slot<DrainModel>>() + size_of::<AnySlotTag>()),
        ("beacon", size_of::<Slot<BeaconModel>>() + size_of::<AnySlotTag>()),
    ]
}

/// Starts `connections` pooled publishers sharing the devices.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    set: &mut JoinSet<Result<DeviceReport>>,
    devices: Vec<Planned>,
    (broker, tls): (SocketAddr, Option<&crate::tls::Tls>),
    clock: SimClock,
    env: Arc<Env>,
    shutdown: &watch::Receiver<bool>,
    counters: &Arc<Counters>,
    (connections, qos1): (usize, bool),
    boot_spread_ms: u64,
) -> Result<()> {
    let connections = connections.max(1);
    let per_shard = devices.len().div_ceil(connections);
    let mut shards: Vec<Vec<AnySlot>> =
        (0..connections).map(|_| Vec::with_capacity(per_shard)).collect();
    for (i, planned) in devices.into_iter().enumerate() {
        if let Some(shard) = shards.get_mut(i % connections) {
            shard.push(make_slot(planned, &clock));
        }
    }
    for (n, shard) in shards.into_iter().enumerate() {
        // With TLS, rumqttc checks the certificate against this host: the name it must carry.
        let host =
            tls.map_or_else(|| broker.ip().to_string(), |t| t.server_name.to_str().into_owned());
        let mut options = MqttOptions::new(
            format!("gridsim-pool-{n}-{}", std::process::id()),
            host,
            broker.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1_000);
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        if let Some(tls) = tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, 10_000);
        let qos = if qos1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        set.spawn(drive(eventloop, shutdown.clone(), counters.clone()));
        set.spawn(schedule(
            (shard, boot_spread_ms),
            client,
            qos,
            clock,
            env.clone(),
            shutdown.clone(),
            counters.clone(),
        ));
    }
    Ok(())
}

async fn drive(
    mut eventloop: EventLoop,
    mut shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<DeviceReport> {
    let mut report = DeviceReport::default();
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    counters.broker_acked.fetch_add(1, Relaxed);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    report.session.connects += 1;
                    counters.connected.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    if report.session.failures == 0 {
                        tracing::warn!("pooled connection: {e}");
                    }
                    report.session.failures += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = shutdown.changed() => {
                // Let queued publishes drain briefly before stopping.
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    loop {
                        if eventloop.poll().await.is_err() { break; }
                    }
                }).await;
                return Ok(report);
            }
        }
    }
}

async fn schedule(
    (mut slots, boot_spread_ms): (Vec<AnySlot>, u64),
    client: AsyncClient,
    qos: QoS,
    clock: SimClock,
    env: Arc<Env>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<DeviceReport> {
    // First wake-ups evenly over `boot_spread_ms`, as if the devices had booted at different
    // times (devices that all boot at 0 keep reporting in lockstep, one burst per interval).
    let n = slots.len().max(1) as u64;
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..slots.len()).map(|i| Reverse((i as u64 * boot_spread_ms / n, i))).collect();
    let mut frames = Vec::new();
    while let Some(Reverse((wake_ms, idx))) = heap.pop() {
        if *shutdown.borrow() {
            break;
        }
        if wake_ms > clock.sim_ms() {
            let at = clock.real_at(wake_ms);
            let mut stop = shutdown.clone();
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                _ = stop.changed() => break,
            }
        }
        let now_ms = clock.sim_ms().max(wake_ms);
        let Some(slot) = slots.get_mut(idx) else { continue };
        let next = slot.step(now_ms, &env, &mut frames);
        for (topic, frame) in frames.drain(..) {
            counters.frame_sent(&frame);
            if client.publish(topic, qos, false, frame).await.is_err() {
                break;
            }
        }
        heap.push(Reverse((next, idx)));
    }
    let _ = client.disconnect().await;
    let mut total = DeviceReport::default();
    for s in &slots {
        let r = s.report();
        total.outbox.telemetry_dropped += r.outbox.telemetry_dropped;
        total.outbox.urgent_refused += r.outbox.urgent_refused;
    }
    Ok(total)
}

/// Component sizes, for `gridsim sizes`.
pub fn component_sizes() -> Vec<(&'static str, usize)> {
    vec![
        ("device_core_cover", size_of::<Device<Cover, RamStore, U, T>>()),
        ("device_core_drain", size_of::<Device<Drain, RamStore, U, T>>()),
        ("device_core_beacon", size_of::<Device<Beacon, RamStore, U, T>>()),
        ("world_cover", size_of::<CoverModel>()),
        ("world_drain", size_of::<DrainModel>()),
        ("world_beacon", size_of::<BeaconModel>()),
        ("urgent_message", size_of::<gridsense_firmware::outbox::Urgent>()),
        ("frame_buffer", size_of::<gridsense_protocol::FrameBuf>()),
        ("outbox", size_of::<gridsense_firmware::outbox::Outbox<U, T>>()),
    ]
}
