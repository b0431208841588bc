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
    fleet::{AnyModel, DeviceReport, POOLED_QUEUES, Planned, uplink_topic},
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
    topic: String,
    pending_push: f64,
}

impl<M: Model> std::fmt::Debug for Slot<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("topic", &self.topic).finish_non_exhaustive()
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
    fn step(&mut self, now_ms: u64, env: &Env, out: &mut Vec<Vec<u8>>) -> u64 {
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
        while let Ok(Some(frame)) = self.device.poll_transmit() {
            out.push(frame.to_vec());
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
    fn step(&mut self, now_ms: u64, env: &Env, out: &mut Vec<Vec<u8>>) -> u64 {
        match self {
            AnySlot::Cover(s) => s.step(now_ms, env, out),
            AnySlot::Drain(s) => s.step(now_ms, env, out),
            AnySlot::Beacon(s) => s.step(now_ms, env, out),
        }
    }

    fn topic(&self) -> &str {
        match self {
            AnySlot::Cover(s) => &s.topic,
            AnySlot::Drain(s) => &s.topic,
            AnySlot::Beacon(s) => &s.topic,
        }
    }

    fn report(&self) -> DeviceReport {
        let (device, outbox) = match self {
            AnySlot::Cover(s) => (s.device.stats(), s.device.outbox_stats()),
            AnySlot::Drain(s) => (s.device.stats(), s.device.outbox_stats()),
            AnySlot::Beacon(s) => (s.device.stats(), s.device.outbox_stats()),
        };
        DeviceReport { device, outbox, session: Default::default() }
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
    Slot { device, model, topic: uplink_topic(record.eui), pending_push: f64::NEG_INFINITY }
}

/// Builds a pooled slot from a planned device.
pub fn make_slot(planned: Planned, clock: &SimClock) -> AnySlot {
    let Planned { record, key, model, .. } = planned;
    match model {
        AnyModel::Cover(m, baseline) => {
            AnySlot::Cover(slot(&record, &key, Cover::new(baseline), m, clock))
        }
        AnyModel::Drain(m, settings) => {
            let mut s = slot(&record, &key, Drain::new(), m, clock);
            s.device.configure(&settings);
            AnySlot::Drain(s)
        }
        AnyModel::Beacon(m) => AnySlot::Beacon(slot(&record, &key, Beacon::new(), m, clock)),
    }
}

/// Size in memory of one pooled device of each kind (device core, world model, topic).
pub fn slot_sizes() -> [(&'static str, usize); 3] {
    [
        ("cover", size_of::<Slot<CoverModel>>() + 26),
        ("drain", size_of::<Slot<DrainModel>>() + 26),
        ("beacon", size_of::<Slot<BeaconModel>>() + 26),
    ]
}

/// Starts `connections` pooled publishers sharing the devices.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    set: &mut JoinSet<Result<DeviceReport>>,
    devices: Vec<Planned>,
    broker: SocketAddr,
    clock: SimClock,
    env: Arc<Env>,
    shutdown: &watch::Receiver<bool>,
    counters: &Arc<Counters>,
    connections: usize,
    qos1: bool,
) -> Result<()> {
    let connections = connections.max(1);
    let mut shards: Vec<Vec<AnySlot>> = (0..connections).map(|_| Vec::new()).collect();
    for (i, planned) in devices.into_iter().enumerate() {
        if let Some(shard) = shards.get_mut(i % connections) {
            shard.push(make_slot(planned, &clock));
        }
    }
    for (n, shard) in shards.into_iter().enumerate() {
        let mut options = MqttOptions::new(
            format!("gridsim-pool-{n}-{}", std::process::id()),
            broker.ip().to_string(),
            broker.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1_000);
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, eventloop) = AsyncClient::new(options, 10_000);
        let qos = if qos1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        set.spawn(drive(eventloop, shutdown.clone(), counters.clone()));
        set.spawn(schedule(
            shard,
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
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    report.session.connects += 1;
                    counters.connected.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => {
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
    mut slots: Vec<AnySlot>,
    client: AsyncClient,
    qos: QoS,
    clock: SimClock,
    env: Arc<Env>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<DeviceReport> {
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..slots.len()).map(|i| Reverse((0, i))).collect();
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
        for frame in frames.drain(..) {
            counters.frame_sent(&frame);
            if client.publish(slot.topic(), qos, false, frame).await.is_err() {
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
