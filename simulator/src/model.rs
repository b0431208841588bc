//! Glue between the simulated world and the firmware: each device kind's [`Model`] turns the
//! physics into sensor readings and user actions, and [`SimBoard`] presents a model to the
//! firmware's MQTT session as its [`Board`].

use std::{collections::VecDeque, sync::Arc};

use gridsense_firmware::{
    Health, Instant,
    beacon::{Beacon, BeaconInput},
    cover::{Cover, CoverInput},
    drain::{Drain, DrainInput},
    sensing::Sensing,
    session::{Board, Wake},
};
use tokio::sync::watch;

use crate::{
    clock::SimClock,
    physics::{BeaconWorld, CoverWorld, DrainWorld, RainField, Supply},
    stats::Counters,
};

/// Shared, read-only facts of the world (rain).
#[derive(Debug, Default)]
pub struct Env {
    /// Rain over the district.
    pub rain: RainField,
}

/// One device kind's world: readings on request, interrupts and user actions when they happen.
pub trait Model: Send + 'static {
    /// The firmware policy this model feeds.
    type Sensing: Sensing + Send + 'static;
    /// The sensors at simulated second `t`.
    fn read(&mut self, t: f64, env: &Env) -> <Self::Sensing as Sensing>::Input;
    /// Battery, radio, temperature at `t`.
    fn health(&mut self, t: f64) -> Health;
    /// The next moment after `t` something happens by itself (`INFINITY`: nothing).
    fn next_push(&mut self, t: f64) -> f64;
    /// What happened by `t`, oldest first.
    fn take_push(&mut self, t: f64, env: &Env) -> Vec<<Self::Sensing as Sensing>::Input>;
}

/// A cover and its surroundings.
#[derive(Debug)]
pub struct CoverModel {
    /// The cover's world.
    pub world: CoverWorld,
    /// Its supply.
    pub supply: Supply,
}

impl Model for CoverModel {
    type Sensing = Cover;
    fn read(&mut self, t: f64, env: &Env) -> CoverInput {
        self.world.read(t, &env.rain)
    }
    fn health(&mut self, t: f64) -> Health {
        self.supply.health(t)
    }
    fn next_push(&mut self, t: f64) -> f64 {
        self.world.next_interrupt(t)
    }
    fn take_push(&mut self, t: f64, env: &Env) -> Vec<CoverInput> {
        // A motion interrupt: the firmware reads the accelerometer at once.
        vec![self.world.read(t, &env.rain)]
    }
}

/// A drainage well and its sensor.
#[derive(Debug)]
pub struct DrainModel {
    /// The well.
    pub world: DrainWorld,
    /// Its supply.
    pub supply: Supply,
}

impl Model for DrainModel {
    type Sensing = Drain;
    fn read(&mut self, t: f64, env: &Env) -> DrainInput {
        self.world.read(t, &env.rain)
    }
    fn health(&mut self, t: f64) -> Health {
        self.supply.health(t)
    }
    fn next_push(&mut self, _t: f64) -> f64 {
        f64::INFINITY
    }
    fn take_push(&mut self, _t: f64, _env: &Env) -> Vec<DrainInput> {
        Vec::new()
    }
}

/// A grid worker with a beacon.
#[derive(Debug)]
pub struct BeaconModel {
    /// The worker.
    pub world: BeaconWorld,
    /// The beacon's supply.
    pub supply: Supply,
}

impl Model for BeaconModel {
    type Sensing = Beacon;
    fn read(&mut self, t: f64, _env: &Env) -> BeaconInput {
        BeaconInput::Fix(self.world.fix(t))
    }
    fn health(&mut self, t: f64) -> Health {
        self.supply.health(t)
    }
    fn next_push(&mut self, t: f64) -> f64 {
        self.world.next_action_at(t)
    }
    fn take_push(&mut self, t: f64, _env: &Env) -> Vec<BeaconInput> {
        self.world.take_actions(t)
    }
}

/// Simulated seconds of a device instant.
pub fn secs(now: Instant) -> f64 {
    now.as_millis() as f64 / 1000.0
}

/// A model as the firmware session's board.
pub struct SimBoard<M: Model> {
    /// The world model.
    pub model: M,
    env: Arc<Env>,
    clock: SimClock,
    shutdown: watch::Receiver<bool>,
    queue: VecDeque<<M::Sensing as Sensing>::Input>,
    counters: Arc<Counters>,
}

impl<M: Model + std::fmt::Debug> std::fmt::Debug for SimBoard<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBoard").field("model", &self.model).finish_non_exhaustive()
    }
}

impl<M: Model> SimBoard<M> {
    /// A board for `model`; `shutdown` turning true ends the session.
    pub fn new(
        model: M,
        env: Arc<Env>,
        clock: SimClock,
        shutdown: watch::Receiver<bool>,
        counters: Arc<Counters>,
    ) -> Self {
        SimBoard { model, env, clock, shutdown, queue: VecDeque::new(), counters }
    }
}

impl<M: Model> Board<M::Sensing> for SimBoard<M>
where
    <M::Sensing as Sensing>::Input: Send,
{
    fn read(&mut self, now: Instant) -> <M::Sensing as Sensing>::Input {
        self.model.read(secs(now), &self.env)
    }

    fn health(&mut self, now: Instant) -> Health {
        self.model.health(secs(now))
    }

    async fn wait(&mut self) -> Wake<<M::Sensing as Sensing>::Input> {
        loop {
            if *self.shutdown.borrow() {
                return Wake::Shutdown;
            }
            if let Some(input) = self.queue.pop_front() {
                return Wake::Input(input);
            }
            let t = self.clock.sim_ms() as f64 / 1000.0;
            let next = self.model.next_push(t);
            let deadline = if next.is_finite() {
                Some(self.clock.real_at((next.max(0.0) * 1000.0).ceil() as u64))
            } else {
                None
            };
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {
                    // Nothing is awaited between here and the return: cancel-safe.
                    let inputs = self.model.take_push(next, &self.env);
                    self.queue.extend(inputs);
                }
                changed = self.shutdown.changed() => {
                    if changed.is_err() {
                        return Wake::Shutdown;
                    }
                }
            }
        }
    }

    fn sent(&mut self, frame: &[u8]) {
        self.counters.frame_sent(frame);
    }

    fn map_time_sync(
        &mut self,
        _now: Instant,
        gateway: gridsense_protocol::DeviceTime,
    ) -> gridsense_protocol::DeviceTime {
        self.clock.map_time_sync(gateway)
    }
}
