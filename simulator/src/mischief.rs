//! Misbehaving senders for the `bad-actors` scenario: replayed frames, garbage, and a flooding
//! device. (Wrong-key devices run the normal firmware with a key the gateway does not have.)
//! Each actor has its own MQTT connection and publishes on the topic of the device it abuses.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use gridsense_protocol::{
    CoverSample, DeviceKey, DeviceTime, Direction, Eui, SwitchState, Uplink, seal, topic::topic,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::{clock::SimClock, rng::Rng, scenario::Mischief, stats::Counters};

/// One misbehaving sender.
#[derive(Debug, Clone)]
pub struct Actor {
    /// What it does.
    pub mode: Mischief,
    /// The device whose topic it uses.
    pub eui: Eui,
    /// That device's real key (the flooder has it: it is the device, misbehaving).
    pub key: DeviceKey,
    /// Messages per simulated second.
    pub rate_per_s: f64,
    /// Randomness.
    pub seed: u64,
}

/// Runs an actor until shutdown.
pub async fn run(
    actor: Actor,
    broker: SocketAddr,
    clock: SimClock,
    mut shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let mut options = MqttOptions::new(
        format!("gridsim-actor-{}-{}", actor.eui, std::process::id()),
        broker.ip().to_string(),
        broker.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let up = topic(actor.eui, Direction::Uplink).to_string();
    if actor.mode == Mischief::Replay {
        // Record the victim's own frames to play them back later.
        let _ = client.subscribe(up.clone(), QoS::AtMostOnce).await;
    }
    let mut rng = Rng::new(actor.seed);
    let mut recorded: Vec<Vec<u8>> = Vec::new();
    let mut counter: u32 = 3_000_000_000;
    let real_rate = (actor.rate_per_s * clock.speed()).clamp(0.01, 5_000.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / real_rate));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::Publish(p))) if recorded.len() < 256 => recorded.push(p.payload.to_vec()),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            },
            _ = tick.tick() => {
                let payload = match actor.mode {
                    Mischief::Replay => {
                        if recorded.is_empty() { continue; }
                        recorded[rng.below(recorded.len() as u64) as usize].clone()
                    }
                    Mischief::Garbage => {
                        let len = 1 + rng.below(80) as usize;
                        (0..len).map(|_| rng.next_u32() as u8).collect()
                    }
                    Mischief::Flood => {
                        counter = counter.wrapping_add(1);
                        let at = DeviceTime::from_unix_secs(clock.unix_ms(clock.sim_ms()) / 1000).unwrap_or_default();
                        let msg = Uplink::CoverReading { at, sample: CoverSample { tilt_ddeg: 3, switch: SwitchState::Absent, water_mm: None } };
                        seal(actor.eui, counter, &msg, &actor.key).to_vec()
                    }
                    Mischief::WrongKey => continue,
                };
                if client.try_publish(up.clone(), QoS::AtMostOnce, false, payload).is_ok() {
                    counters.mischief.fetch_add(1, Relaxed);
                }
            }
        }
    }
    let _ = client.try_disconnect();
}
