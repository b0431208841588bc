//! The gateway's path for one uplink, as a flat list of steps on pure state (no I/O, `now`
//! passed in). Its effects go into a [`Batch`] that the shell commits in one transaction before
//! acknowledging the MQTT messages:
//!
//! 1. decode, look up the device, verify the tag, check the counter window ([`Intake::check`]);
//!    rejects are counted by reason, audited with the raw bytes, logged at a limited rate;
//! 2. record the counter (so a copy later in the same batch is a duplicate);
//! 3. update device health (online, battery, …) and collect its events;
//! 4. turn readings into telemetry points at their sample times;
//! 5. keep alarms, reports, SOS, check-ins, acks and status as messages for the trace;
//! 6. downlinks the frame makes due (time sync, a waiting configuration or status request),
//!    sealed here and published by the shell after the commit;
//! 7. rules on the frame's observations (and on health transitions: online/offline), their
//!    condition changes into incidents, cases and outbox entries; a worker's report into a case,
//!    an SOS into an alert, a check-in into a patrol record — all in the same batch, so the
//!    frame is acknowledged only once its case is durable.
//!
//! [`Pipeline::tick`] runs the timers: offline deadlines and rule holds/windows.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use gridsense_protocol::{
    DeviceTime, Direction, Eui, MAX_UPLINK_FRAME_LEN, Message, PositionFix, Uplink, seal,
    topic::{Lane, lane_of, parse_topic},
};

use crate::{
    batch::{AuditRecord, Batch, MessageRecord},
    cases::{Cases, MaintenanceWindow, Place, Site},
    cluster::ShardMask,
    downlink::{DownlinkConfig, Downlinks, Outgoing, Pending},
    geo::GridLayer,
    health::{DeviceHealth, EventKind, HealthConfig, HealthEvent, HealthTracker},
    intake::{Intake, Reject},
    registry::{Device, DeviceId, Registered},
    rules::{ConditionChange, Observation, Rules, Signal, device_ms, observations},
    telemetry,
};

/// What became of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted: the message kind.
    Accepted(&'static str),
    /// Rejected: the reason code.
    Rejected(&'static str),
}

/// Longest a changed health row waits to be written, ms (transitions are written at once).
pub const HEALTH_FLUSH_MS: i64 = 2_000;

/// Logs at most this many rejects per reason per second; the rest are only counted.
const REJECT_LOGS_PER_SECOND: u32 = 5;

/// Characters of a rejected message's topic kept in the audit log (a device topic has 29).
const AUDIT_TOPIC_CHARS: usize = 128;

/// Clamps every time in `message` later than `limit` to `now` (a sample, an alarm's onset or
/// end, a report): a device clock running ahead must not date readings, incidents or cases in
/// the future. A backlog's samples keep their order: one that would land before the sample
/// ahead of it goes to that sample's time instead. Returns how many times were clamped.
pub fn clamp_future(message: &mut Uplink, now: DeviceTime, limit: DeviceTime) -> u32 {
    let mut n = 0;
    let mut fix = |t: &mut DeviceTime| {
        if *t > limit {
            *t = now;
            n += 1;
        }
    };
    match message {
        Uplink::CoverReading { at, .. }
        | Uplink::DrainReading { at, .. }
        | Uplink::PatrolFix { at, .. } => fix(at),
        Uplink::Status(s) => fix(&mut s.at),
        Uplink::AlarmRaised(a) => fix(&mut a.since),
        Uplink::AlarmCleared(a) => {
            fix(&mut a.since);
            fix(&mut a.at);
        }
        Uplink::CheckIn(c) => fix(&mut c.at),
        Uplink::IncidentReport(r) => fix(&mut r.at),
        Uplink::Sos(s) => fix(&mut s.at),
        Uplink::Backlog(b) => {
            if b.base <= limit && b.timed().all(|(t, _)| t <= limit) {
                return 0;
            }
            // Each sample's time, clamped, and never before the one ahead of it.
            let mut previous = DeviceTime(0);
            let times: Vec<DeviceTime> = b
                .timed()
                .map(|(t, _)| {
                    let t = if t > limit {
                        n += 1;
                        now
                    } else {
                        t
                    };
                    previous = previous.max(t);
                    previous
                })
                .collect();
            let base = if b.base > limit { now } else { b.base };
            let base = times.first().map_or(base, |first| base.min(*first));
            let mut last = base;
            for (sample, t) in b.samples.iter_mut().zip(times) {
                sample.delta_s = t.secs_since(last).unwrap_or(0);
                last = t;
            }
            b.base = base;
        }
        Uplink::DownlinkAck(_) => {}
    }
    n
}

/// The pipeline's state: registry keys and counter windows, and health.
#[derive(Debug)]
pub struct Pipeline {
    intake: Intake,
    health: HealthTracker,
    downlinks: Downlinks,
    log_budget: HashMap<&'static str, (i64, u32)>,
    /// Devices whose health changed since the last [`Pipeline::finish`].
    dirty: HashSet<DeviceId>,
    /// The grid layer and each device's place in it.
    grids: Option<Grids>,
    /// When health rows were last put into a batch.
    last_health_flush: i64,
    /// Rules, incidents and cases, once configured.
    cases: Option<CaseLayer>,
    /// Per-device frame budget.
    rate: RateLimit,
    /// Devices' recent telemetry frames, written to their lists at most every
    /// [`RECENT_EVERY_MS`].
    recent: RecentWrites,
    /// Sample times more than this ahead of the receive time are clamped to it, ms.
    max_ahead_ms: i64,
}

/// What the store holds for the devices of shards being taken over
/// ([`Pipeline::adopt_shards`]).
#[derive(Debug, Default)]
pub struct ShardState {
    /// Counter windows.
    pub counters: Vec<(Eui, gridsense_protocol::CounterWindow)>,
    /// Next downlink counters.
    pub downlink_counters: Vec<(Eui, u32)>,
    /// Health rows (their offline deadlines follow from the last-seen times).
    pub health: Vec<(Eui, DeviceHealth)>,
    /// Rule states.
    pub rule_states: Vec<(Eui, String, crate::rules::RuleState)>,
    /// Open incidents.
    pub open: crate::cases::OpenIncidents,
    /// The highest ids used.
    pub sequences: crate::cases::Sequences,
}

/// Frames per device per gateway minute (fixed windows): per device the minute it last
/// counted in and its count there (8 bytes, indexed by [`DeviceId`]).
#[derive(Debug, Default)]
struct RateLimit {
    per_minute: u32,
    counts: Vec<(u32, u32)>,
}

impl RateLimit {
    /// Counts a frame; `Some(first)` when it is over the budget (`first`: the first refused
    /// this minute).
    fn over(&mut self, now_ms: i64, id: DeviceId) -> Option<bool> {
        if self.per_minute == 0 {
            return None;
        }
        // Only compared for equality, so the minute's low 32 bits are enough.
        let minute = u32::try_from(now_ms.div_euclid(60_000) & 0xFFFF_FFFF).unwrap_or(0);
        if id.index() >= self.counts.len() {
            self.counts.resize(id.index() + 1, (minute, 0));
        }
        let (at, n) = self.counts.get_mut(id.index())?;
        if *at != minute {
            (*at, *n) = (minute, 0);
        }
        *n = n.saturating_add(1);
        (*n > self.per_minute).then_some(*n == self.per_minute + 1)
    }
}

/// How often a device's list of recent telemetry frames is written at most, ms: a device that
/// reports faster has its frames collected meanwhile (the newest 16) and written together,
/// so a fast sender's list costs one row update per interval, not one per frame (at 3 frames/s
/// per device, a write per 5 s still cost 7 % of the throughput). Devices report every few
/// minutes at most, so theirs is written at each frame.
pub const RECENT_EVERY_MS: i64 = 30_000;

/// Devices whose recent-frames list was written within the last [`RECENT_EVERY_MS`], with the
/// frames collected since (only fast senders are here; the map is swept every second).
#[derive(Debug, Default)]
struct RecentWrites {
    devices: HashMap<DeviceId, (i64, Vec<crate::batch::RecentFrame>)>,
    last_sweep: i64,
}

impl RecentWrites {
    /// A telemetry frame: into `out` (the batch) now, or collected until the device's interval
    /// has passed.
    fn on_frame(
        &mut self,
        now_ms: i64,
        id: DeviceId,
        frame: crate::batch::RecentFrame,
        out: &mut Vec<crate::batch::RecentFrame>,
    ) {
        match self.devices.get_mut(&id) {
            Some((written, held)) if now_ms.saturating_sub(*written) < RECENT_EVERY_MS => {
                if held.len() == crate::batch::RECENT_FRAME_SLOTS {
                    held.remove(0);
                }
                held.push(frame);
            }
            Some((written, held)) => {
                out.append(held);
                out.push(frame);
                *written = now_ms;
            }
            None => {
                out.push(frame);
                self.devices.insert(id, (now_ms, Vec::new()));
            }
        }
    }

    /// Frames held longer than the interval (every frame held, with `all`: at shutdown) go
    /// into `out`; devices with nothing held and an interval passed are forgotten. At most
    /// once a second unless `all`.
    fn sweep(&mut self, now_ms: i64, all: bool, out: &mut Vec<crate::batch::RecentFrame>) {
        if !all && now_ms.saturating_sub(self.last_sweep) < 1_000 {
            return;
        }
        self.last_sweep = now_ms;
        self.devices.retain(|_, (written, held)| {
            if !all && now_ms.saturating_sub(*written) < RECENT_EVERY_MS {
                return true;
            }
            if held.is_empty() {
                return false;
            }
            out.append(held);
            *written = now_ms;
            true
        });
    }
}

/// The rules and the incident/case core with what they need to know about devices.
#[derive(Debug)]
struct CaseLayer {
    rules: Rules,
    cases: Cases,
    sites: Sites,
    observations: Vec<Observation>,
    changes: Vec<ConditionChange>,
}

/// The grid layer and where each registered device stands.
#[derive(Debug)]
struct Grids {
    layer: Arc<GridLayer>,
    /// Each device's cell in the layer, by [`DeviceId`] (`u32::MAX`: outside every grid).
    placed: Vec<u32>,
    /// The optional unit-grid layer (looked up only when a case is placed).
    units: Option<Arc<GridLayer>>,
}

impl Grids {
    fn place(&mut self, id: DeviceId, cell: Option<usize>) {
        if id.index() >= self.placed.len() {
            self.placed.resize(id.index() + 1, u32::MAX);
        }
        if let Some(p) = self.placed.get_mut(id.index()) {
            *p = cell.and_then(|c| u32::try_from(c).ok()).unwrap_or(u32::MAX);
        }
    }

    /// The cell a device's registered position is in.
    fn home(&self, id: Option<DeviceId>) -> Option<&crate::geo::GridCell> {
        let cell = *self.placed.get(id?.index())?;
        self.layer.cells().get(usize::try_from(cell).ok()?)
    }
}

impl Pipeline {
    /// Builds the state from what the store holds.
    pub fn new(
        registry: Vec<Registered>,
        counters: Vec<(Eui, gridsense_protocol::CounterWindow)>,
        health: Vec<(Eui, DeviceHealth)>,
        config: HealthConfig,
    ) -> Self {
        let mut intake = Intake::new();
        intake.reserve(registry.len());
        for r in registry {
            intake.register(r.eui, r.kind, r.key);
        }
        for (eui, window) in counters {
            intake.restore_window(eui, window);
        }
        let max_ahead_ms = config.max_ahead_ms;
        let mut tracker = HealthTracker::new(config);
        tracker.reserve(intake.numbered());
        for (eui, h) in health {
            if let Some(id) = intake.number(eui) {
                tracker.restore(id, eui, h);
            }
        }
        Pipeline {
            max_ahead_ms,
            intake,
            health: tracker,
            downlinks: Downlinks::new(DownlinkConfig::default()),
            log_budget: HashMap::new(),
            dirty: HashSet::new(),
            grids: None,
            last_health_flush: i64::MIN,
            cases: None,
            rate: RateLimit::default(),
            recent: RecentWrites::default(),
        }
    }

    /// Limits each device to `per_minute` frames a minute (0: no limit).
    #[must_use]
    pub fn with_rate_limit(mut self, per_minute: u32) -> Self {
        self.rate.per_minute = per_minute;
        self
    }

    /// The deployment's number of shards (`[cluster] shards`): a frame on a sharded topic
    /// whose shard level is not its EUI's is rejected (`wrong_shard`).
    #[must_use]
    pub fn with_shards(mut self, shards: u16) -> Self {
        self.intake.set_shards(shards);
        self
    }

    /// Turns on rules and cases: every device with its site and rule attributes, the rule
    /// states and open incidents persisted before a restart.
    #[must_use]
    pub fn with_cases(
        self,
        rules: Rules,
        cases: Cases,
        sites: Vec<(Eui, Site, crate::rules::Attributes)>,
        states: Vec<(Eui, String, crate::rules::RuleState)>,
    ) -> Self {
        let mut pipeline = self.with_case_layer(rules, cases);
        for (eui, site, attrs) in sites {
            pipeline.add_site(eui, site, attrs);
        }
        pipeline.seal_sites();
        for (eui, rule, state) in states {
            pipeline.restore_rule_state(eui, &rule, state);
        }
        pipeline
    }

    /// Turns on rules and cases, with no site yet: then [`Pipeline::add_site`] for every
    /// device, [`Pipeline::seal_sites`], and [`Pipeline::restore_rule_state`] for what was
    /// persisted — row by row as the store reads them, so that a million devices' rows are
    /// never all held at once.
    #[must_use]
    pub fn with_case_layer(mut self, mut rules: Rules, cases: Cases) -> Self {
        rules.reserve(self.intake.numbered());
        self.cases = Some(CaseLayer {
            rules,
            cases,
            sites: Sites::default(),
            observations: Vec::new(),
            changes: Vec::new(),
        });
        self
    }

    /// A device's site and rule attributes (after [`Pipeline::with_case_layer`]).
    pub fn add_site(&mut self, eui: Eui, site: Site, attrs: crate::rules::Attributes) {
        let Some(layer) = &mut self.cases else { return };
        if let Some(id) = self.intake.number(eui) {
            layer.rules.add_device(Device { id, eui, kind: site.kind }, attrs);
        }
        if layer.sites.compact.capacity() == 0 {
            layer.sites.compact.reserve_exact(self.intake.len());
        }
        layer.sites.insert(eui, site);
    }

    /// Sorts the sites for lookups, after the last [`Pipeline::add_site`].
    pub fn seal_sites(&mut self) {
        if let Some(layer) = &mut self.cases {
            layer.sites.seal();
        }
    }

    /// A rule state persisted before a restart (after [`Pipeline::seal_sites`]).
    pub fn restore_rule_state(&mut self, eui: Eui, rule: &str, state: crate::rules::RuleState) {
        if let Some(layer) = &mut self.cases
            && let Some(device) = self.intake.device(eui)
        {
            layer.rules.restore(device, rule, state);
        }
    }

    /// A device's health persisted before a restart.
    pub fn restore_health(&mut self, eui: Eui, health: DeviceHealth) {
        if let Some(id) = self.intake.number(eui) {
            self.health.restore(id, eui, health);
        }
    }

    /// Mints incident, case, cluster and alert ids per shard (several gateway instances share
    /// the store; see [`crate::cases::ID_STRIDE`]).
    pub fn set_sharded_ids(&mut self) {
        let shards = self.intake.shards();
        if let Some(layer) = &mut self.cases {
            layer.cases.set_sharded_ids(shards);
        }
    }

    /// The shard of a device (`[cluster] shards`).
    pub fn shard_of(&self, eui: Eui) -> u16 {
        u16::from(gridsense_protocol::topic::shard_of(eui, self.intake.shards()))
    }

    /// Forgets the hot state of every device in the shards `gone` marks (handed over to, or
    /// lost to, another gateway instance): counter windows, health and its offline deadline,
    /// rule states and their timers, open incidents, downlink counters, unflushed rows. So
    /// timers fire only at a shard's owner, and nothing stale is written later.
    pub fn forget_shards(&mut self, gone: &ShardMask) {
        let is_gone = |eui: Eui| gone.has_device(eui);
        let devices: Vec<(Eui, DeviceId)> =
            self.intake.numbered_devices().filter(|(eui, _)| is_gone(*eui)).collect();
        for (eui, id) in devices {
            self.intake.restore_window(eui, gridsense_protocol::CounterWindow::new());
            self.health.forget(id);
            self.downlinks.restore_counter(id, 0);
            self.dirty.remove(&id);
            self.recent.devices.remove(&id);
        }
        if let Some(layer) = &mut self.cases {
            layer.rules.forget(&is_gone);
            layer.cases.forget(&is_gone);
        }
    }

    /// Takes over shards claimed from another gateway instance: their devices' state is
    /// replaced by what the store holds (read after the claim, so after the previous owner's
    /// last commit for them). `state` may hold other devices' rows too: only those in `mine`
    /// are taken.
    pub fn adopt_shards(&mut self, mine: &ShardMask, state: ShardState) {
        self.forget_shards(mine);
        let is_mine = |eui: Eui| mine.has_device(eui);
        for (eui, window) in state.counters {
            if is_mine(eui) {
                self.intake.restore_window(eui, window);
            }
        }
        for (eui, next) in state.downlink_counters {
            if is_mine(eui)
                && let Some(id) = self.intake.id_of(eui)
            {
                self.downlinks.restore_counter(id, next);
            }
        }
        for (eui, h) in state.health {
            if is_mine(eui) {
                self.restore_health(eui, h);
            }
        }
        for (eui, rule, st) in state.rule_states {
            if is_mine(eui) {
                self.restore_rule_state(eui, &rule, st);
            }
        }
        if let Some(layer) = &mut self.cases {
            layer.cases.adopt(state.sequences, state.open, &is_mine);
        }
    }

    /// Applies registry changes made while running (new keys, retirements, new or moved
    /// devices): keys at once, and the device's grid, site and rules with them.
    pub fn apply_registry(&mut self, changes: Vec<crate::batch::RegistryChange>) {
        let mut moved_sites = false;
        for change in changes {
            let eui = change.eui;
            let Some((key, site, attrs)) = change.active else {
                self.intake.unregister(eui);
                continue;
            };
            let Some(id) = self.intake.register(eui, site.kind, key) else { continue };
            if let Some(grids) = &mut self.grids {
                let cell = grids.layer.locate_index(site.lat, site.lon).map(|(i, _)| i);
                grids.place(id, cell);
            }
            if let Some(layer) = &mut self.cases {
                layer.rules.add_device(Device { id, eui, kind: site.kind }, attrs);
                layer.sites.insert(eui, site);
                moved_sites = true;
            }
        }
        if moved_sites && let Some(layer) = &mut self.cases {
            layer.sites.seal();
        }
    }

    /// Replaces the maintenance windows.
    pub fn set_windows(&mut self, windows: Vec<MaintenanceWindow>) {
        if let Some(layer) = &mut self.cases {
            layer.cases.set_windows(windows);
        }
    }

    /// A case reached closed or voided (operator or platform): its incident is finished.
    pub fn case_finished(&mut self, case_id: i64, now_ms: i64, batch: &mut Batch) {
        if let Some(layer) = &mut self.cases {
            layer.cases.on_case_final(case_id, now_ms, &mut batch.cases);
        }
    }

    /// Open incidents.
    pub fn open_incidents(&self) -> usize {
        self.cases.as_ref().map_or(0, |l| l.cases.open_count())
    }

    /// The place (grid codes, address) of a point, or of a device's registered position.
    fn place_at(&self, eui: Eui, fix: Option<(f64, f64)>, home: Option<(f64, f64)>) -> Place {
        let Some(grids) = &self.grids else { return Place::default() };
        let cell = match fix {
            Some((lat, lon)) => grids.layer.locate(lat, lon).grid(),
            None => grids.home(self.intake.id_of(eui)),
        };
        let position = fix.or(home);
        let unit = grids
            .units
            .as_ref()
            .zip(position)
            .and_then(|(units, (lat, lon))| units.locate(lat, lon).grid())
            .map(|u| &*u.grid_code);
        Place::of(cell, unit)
    }

    /// Step 7: rules on the frame's observations; beacons' reports, SOS and check-ins.
    fn evaluate(
        &mut self,
        now_ms: i64,
        device: Device,
        counter: u32,
        message: &Uplink,
        events_from: usize,
        batch: &mut Batch,
    ) {
        let Some(mut layer) = self.cases.take() else { return };
        let eui = device.eui;
        layer.observations.clear();
        observations(message, &mut layer.observations);
        online_observations(
            batch.events.get(events_from..).unwrap_or_default(),
            eui,
            &mut layer.observations,
        );
        layer.changes.clear();
        layer.rules.observe(now_ms, device, &layer.observations, &mut layer.changes);
        let changes = std::mem::take(&mut layer.changes);
        self.apply_changes(&mut layer, &changes, Some(counter), batch);
        layer.changes = changes;
        let position = |f: &Option<PositionFix>| {
            f.map(|f| (f64::from(f.lat_udeg) / 1e6, f64::from(f.lon_udeg) / 1e6))
        };
        // A beacon's newest fix, for the map.
        let fix = match message {
            Uplink::PatrolFix { at, fix } => Some((*at, position(&Some(*fix)))),
            Uplink::CheckIn(c) => Some((c.at, position(&c.fix))),
            Uplink::IncidentReport(r) => Some((r.at, position(&r.fix))),
            Uplink::Sos(s) => Some((s.at, position(&s.fix))),
            _ => None,
        };
        if let Some((at, Some((lat, lon)))) = fix {
            let at_ms = device_ms(at);
            if batch.fixes.get(&eui).is_none_or(|f| f.2 <= at_ms) {
                let grid = self.place_at(eui, Some((lat, lon)), None).grid_code;
                batch.fixes.insert(eui, (lat, lon, at_ms, grid));
            }
        }
        match message {
            Uplink::IncidentReport(r) => {
                let fix = position(&r.fix);
                let home = layer.sites.get(eui).map_or((f64::NAN, f64::NAN), |s| (s.lat, s.lon));
                let place = self.place_at(eui, fix, Some(home));
                layer.cases.on_report(
                    eui,
                    counter,
                    device_ms(r.at),
                    now_ms,
                    r.class,
                    &r.note,
                    fix.unwrap_or(home),
                    &place,
                    &mut batch.cases,
                );
            }
            Uplink::Sos(sos) => {
                let place = self.place_at(eui, position(&sos.fix), None);
                layer.cases.on_sos(
                    eui,
                    device_ms(sos.at),
                    now_ms,
                    sos.fix.as_ref(),
                    place.grid_code,
                    &mut batch.cases,
                );
            }
            Uplink::CheckIn(c) => {
                let place = self.place_at(eui, position(&c.fix), None);
                layer.cases.on_checkin(
                    eui,
                    device_ms(c.at),
                    c.checkpoint,
                    place.grid_code,
                    &mut batch.cases,
                );
            }
            _ => {}
        }
        self.cases = Some(layer);
    }

    fn apply_changes(
        &self,
        layer: &mut CaseLayer,
        changes: &[ConditionChange],
        frame: Option<u32>,
        batch: &mut Batch,
    ) {
        for change in changes {
            let Some(site) = layer.sites.get(change.eui) else { continue };
            let place = self.place_at(change.eui, None, Some((site.lat, site.lon)));
            let id = self.intake.id_of(change.eui);
            let battery = id.and_then(|id| self.health.battery_mv(id));
            layer.cases.on_change(change, &site, &place, frame, battery, &mut batch.cases);
        }
        // A condition that changed goes with the rule states behind it, in the same commit;
        // other changes wait for the next flush ([`Pipeline::finish`]).
        if !changes.is_empty() {
            batch.rule_states.extend(layer.rules.take_dirty());
        }
    }

    /// Places every device in the grid layer (by its registered position); telemetry is then
    /// tagged with grid and street, patrol fixes by where each fix was taken. Returns where
    /// each device went (the index of its cell in the layer, metres when snapped from
    /// outside); devices outside every grid beyond the tolerance are not in it.
    pub fn with_grids(
        &mut self,
        layer: Arc<GridLayer>,
        locations: &[(Eui, f64, f64)],
    ) -> Vec<(Eui, usize, Option<f64>)> {
        let mut grids = Grids { layer, placed: Vec::new(), units: None };
        grids.placed.reserve_exact(self.intake.numbered());
        let mut placements = Vec::with_capacity(locations.len());
        for (eui, lat, lon) in locations {
            let Some(id) = self.intake.number(*eui) else { continue };
            let found = grids.layer.locate_index(*lat, *lon);
            grids.place(id, found.map(|(i, _)| i));
            if let Some((i, distance)) = found {
                placements.push((*eui, i, distance));
            }
        }
        self.grids = Some(grids);
        placements
    }

    /// Adds the unit-grid layer (after [`Pipeline::with_grids`]): cases then carry the unit
    /// grid code of where they are.
    pub fn with_unit_grids(&mut self, units: Arc<GridLayer>) {
        if let Some(grids) = &mut self.grids {
            grids.units = Some(units);
        }
    }

    /// Tags points from `start` on with their grid: the device's, or for positions the fix's.
    fn tag_grids(&self, id: DeviceId, batch: &mut Batch, start: usize) {
        let Some(grids) = &self.grids else { return };
        let home = grids.home(Some(id));
        let points = batch.telemetry.get_mut(start..).unwrap_or_default();
        // Positions: locate each fix (lat and lon points share their time).
        let mut fixes: HashMap<i64, (f64, f64)> = HashMap::new();
        for p in points.iter().filter(|p| p.measurement == "position") {
            let entry = fixes.entry(p.at_ms).or_insert((f64::NAN, f64::NAN));
            match p.field {
                "lat" => entry.0 = p.value,
                "lon" => entry.1 = p.value,
                _ => {}
            }
        }
        for p in points.iter_mut() {
            let cell = if p.measurement == "position" {
                fixes.get(&p.at_ms).and_then(|(lat, lon)| grids.layer.locate(*lat, *lon).grid())
            } else {
                home
            };
            if let Some(cell) = cell {
                p.grid = Some(cell.grid_code.clone());
                p.street = Some(cell.street_code.clone());
            }
        }
    }

    /// Sets the downlink policy and restores persisted downlink counters and open requests.
    #[must_use]
    pub fn with_downlinks(
        mut self,
        config: DownlinkConfig,
        counters: Vec<(Eui, u32)>,
        requests: Vec<(Eui, Pending)>,
    ) -> Self {
        self.downlinks = Downlinks::new(config);
        for (eui, next) in counters {
            if let Some(id) = self.intake.number(eui) {
                self.downlinks.restore_counter(id, next);
            }
        }
        for (eui, pending) in requests {
            self.request(eui, pending);
        }
        self
    }

    /// Queues an operator's request for a registered device (others are ignored).
    pub fn request(&mut self, eui: Eui, pending: Pending) {
        if self.intake.kind_of(eui).is_some() {
            self.downlinks.request(eui, pending);
        }
    }

    fn seal_downlinks(&mut self, outgoing: Vec<Outgoing>, batch: &mut Batch) {
        for o in outgoing {
            if let Some(key) = self.intake.key_of(o.eui) {
                let frame = seal(o.eui, o.counter, &o.message, key);
                let topic =
                    gridsense_protocol::topic::topic(o.eui, Direction::Downlink).to_string();
                batch.downlinks.push((topic, frame.to_vec(), o.route));
                let next = self.intake.id_of(o.eui).map_or(0, |id| self.downlinks.next_counter(id));
                batch.downlink_counters.insert(o.eui, next);
            }
        }
    }

    /// Device health, for status pages.
    pub fn health(&self) -> &HealthTracker {
        &self.health
    }

    /// Registered devices.
    pub fn registered(&self) -> usize {
        self.intake.len()
    }

    /// Processes one uplink received at `now_ms` on `topic`.
    pub fn handle(
        &mut self,
        now_ms: i64,
        topic: &str,
        payload: &[u8],
        batch: &mut Batch,
    ) -> Outcome {
        // 0. A device over its frame budget is refused before any crypto (a flood costs little).
        if self.rate.per_minute > 0
            && let Ok((eui, Direction::Uplink)) = parse_topic(topic)
            && let Some(device) = self.intake.device(eui)
            && let Some(first) = self.rate.over(now_ms, device.id)
        {
            if !first {
                // Counted only: auditing every frame of a flood would be the flood's work.
                *batch.rejects.entry("rate_limited").or_default() += 1;
                return Outcome::Rejected("rate_limited");
            }
            batch.events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::Flooding });
            tracing::warn!(%eui, limit = self.rate.per_minute, "device flooding: throttled");
            return self.reject(now_ms, topic, payload, &Reject::RateLimited(eui), batch);
        }
        // 1. Decode, look up, verify, counter window.
        let mut accepted = match self.intake.check(topic, payload) {
            Ok(accepted) => accepted,
            Err(reject) => {
                // A copy on a sharded topic: the device did not get its confirmation (or it
                // is on its way); it gets one more, with the batch that drops the copy — an
                // urgent frame its `UplinkAck`, another its window.
                if let Reject::Duplicate(eui, counter) = reject
                    && let Ok(gridsense_protocol::topic::Route::Uplink { lane, .. }) =
                        gridsense_protocol::topic::parse_route(topic)
                    && let Some(device) = self.intake.device(eui)
                {
                    if lane == Lane::Urgent {
                        let mut outgoing = Vec::new();
                        self.downlinks.confirm(device, counter, &mut outgoing);
                        self.seal_downlinks(outgoing, batch);
                    } else {
                        self.downlinks.stored_up(device, true);
                    }
                }
                return self.reject(now_ms, topic, payload, &reject, batch);
            }
        };
        // 1b. Times too far ahead of the receive time are clamped to it (a device clock
        // running ahead), before anything dates readings, incidents or cases by them; the
        // time sync below still sees the device's own clock.
        let device_clock = self.clamp_future(now_ms, &mut accepted.message, batch);
        let header = accepted.header;
        let device = accepted.device;
        let Device { eui, kind, .. } = device;
        // 2. Counter, persisted with this batch.
        let window = self.intake.commit(&accepted);
        batch.counters.insert(eui, window);
        // 3. Health.
        let events_from = batch.events.len();
        self.health.on_frame(
            now_ms,
            device,
            &header,
            &accepted.message,
            accepted.skipped,
            &mut batch.events,
        );
        // Its row is written at the next flush ([`Pipeline::finish`]), not with every frame.
        self.dirty.insert(device.id);
        // 4. Telemetry at the device's sample times.
        let first_point = batch.telemetry.len();
        let telemetry_only = telemetry::points(eui, kind, &accepted.message, &mut batch.telemetry);
        self.tag_grids(device.id, batch, first_point);
        // 5. Everything else is kept for the trace (and the rules of the next issue).
        let name = accepted.message.kind_name();
        if telemetry_only {
            let samples = match &accepted.message {
                Uplink::Backlog(b) => u16::try_from(b.samples.len()).unwrap_or(u16::MAX),
                _ => 1,
            };
            let frame = crate::batch::RecentFrame {
                eui,
                counter: header.counter,
                received_ms: now_ms,
                kind: name,
                samples,
            };
            self.recent.on_frame(now_ms, device.id, frame, &mut batch.recent);
        } else {
            batch.messages.push(MessageRecord {
                eui,
                counter: header.counter,
                received_ms: now_ms,
                kind: name,
                message: accepted.message.clone(),
            });
        }
        // 6. Downlinks this frame makes due.
        let mut outgoing = Vec::new();
        self.downlinks.on_frame(
            now_ms,
            device,
            device_clock.as_ref().unwrap_or(&accepted.message),
            &mut outgoing,
            &mut batch.request_updates,
        );
        if accepted.legacy {
            self.downlinks.move_topics(now_ms, device, self.intake.shards(), &mut outgoing);
        } else if lane_of(&accepted.message) == Lane::Urgent {
            // Confirmed end to end once durable: the device keeps it until then.
            self.downlinks.confirm(device, header.counter, &mut outgoing);
        } else {
            // Confirmed cumulatively, by a window at the batch's end ([`Pipeline::finish`]).
            self.downlinks.stored_up(device, false);
        }
        self.seal_downlinks(outgoing, batch);
        // 7. Rules, incidents, cases.
        self.evaluate(now_ms, device, header.counter, &accepted.message, events_from, batch);
        batch.accepted += 1;
        Outcome::Accepted(name)
    }

    /// Clamps the message's times that are more than `max_ahead_ms` ahead of `now_ms`
    /// ([`clamp_future`]), counting them in the batch; the message as the device sent it when
    /// something was clamped.
    fn clamp_future(
        &mut self,
        now_ms: i64,
        message: &mut Uplink,
        batch: &mut Batch,
    ) -> Option<Uplink> {
        let now = DeviceTime::from_unix_secs(u64::try_from(now_ms.div_euclid(1000)).ok()?)?;
        let limit = DeviceTime::from_unix_secs(
            u64::try_from(now_ms.saturating_add(self.max_ahead_ms).div_euclid(1000)).ok()?,
        )?;
        let original = message.clone();
        let clamped = clamp_future(message, now, limit);
        if clamped == 0 {
            return None;
        }
        batch.future_samples += u64::from(clamped);
        Some(original)
    }

    fn reject(
        &mut self,
        now_ms: i64,
        topic: &str,
        payload: &[u8],
        reject: &Reject,
        batch: &mut Batch,
    ) -> Outcome {
        let reason = reject.reason();
        *batch.rejects.entry(reason).or_default() += 1;
        let claimed = parse_topic(topic).ok().map(|(eui, _)| eui);
        if let Some(device) = claimed.and_then(|eui| self.intake.device(eui)) {
            self.health.on_reject(device.id);
            self.dirty.insert(device.id);
        }
        // Bounded: at most the largest frame's bytes and a topic's worth of text are kept, so
        // oversized messages cannot fill the audit log.
        let topic_kept =
            topic.char_indices().nth(AUDIT_TOPIC_CHARS).map_or(topic, |(i, _)| &topic[..i]);
        batch.audit.push(AuditRecord {
            received_ms: now_ms,
            topic: topic_kept.to_owned(),
            reason,
            eui: claimed,
            raw: payload.get(..MAX_UPLINK_FRAME_LEN).unwrap_or(payload).to_vec(),
        });
        let second = now_ms.div_euclid(1000);
        let budget = self.log_budget.entry(reason).or_insert((second, 0));
        if budget.0 != second {
            *budget = (second, 0);
        }
        budget.1 += 1;
        if budget.1 <= REJECT_LOGS_PER_SECOND {
            tracing::warn!(reason, topic, len = payload.len(), "frame rejected");
        }
        Outcome::Rejected(reason)
    }

    /// Offline deadlines that passed by `now_ms`, and requests given up.
    pub fn tick(&mut self, now_ms: i64, batch: &mut Batch) {
        self.downlinks.tick(now_ms, &mut batch.request_updates);
        let events_from = batch.events.len();
        let offline = self.health.poll_deadlines(now_ms, &mut batch.events);
        self.dirty.extend(offline);
        let Some(mut layer) = self.cases.take() else { return };
        let mut changes = std::mem::take(&mut layer.changes);
        changes.clear();
        // Offline transitions are observations of the `online` signal.
        let events = batch.events.get(events_from..).unwrap_or_default().to_vec();
        for e in &events {
            layer.observations.clear();
            online_observations(std::slice::from_ref(e), e.eui, &mut layer.observations);
            if let Some(device) = self.intake.device(e.eui) {
                layer.rules.observe(now_ms, device, &layer.observations, &mut changes);
            }
        }
        layer.rules.tick(now_ms, &mut changes);
        self.apply_changes(&mut layer, &changes, None, batch);
        layer.changes = changes;
        self.cases = Some(layer);
    }

    /// Puts the health rows changed since the last flush into the batch, once per device
    /// however many frames it sent. A device's row goes with its transition (online, offline,
    /// battery, reboot) at once; every changed row goes when `force` is set (shutdown) or
    /// every [`HEALTH_FLUSH_MS`]: between flushes only `last_seen` and counts move, and after a
    /// crash the restored deadlines are at most that much early. Rule states follow the same
    /// rule: a state whose condition changed goes with that change (and its case), the others
    /// at the flush, so a crash loses at most that much of a rule's history (a duration
    /// counted from a little later, a rate over a longer span), never a case. Call before
    /// committing.
    pub fn finish(&mut self, batch: &mut Batch, now_ms: i64, force: bool) {
        // The cumulative confirmations due, with the batch that makes them true.
        let mut windows = Vec::new();
        let intake = &self.intake;
        self.downlinks.windows(now_ms, |id| intake.window_of(id), &mut windows);
        self.seal_downlinks(windows, batch);
        let due = force || now_ms.saturating_sub(self.last_health_flush) >= HEALTH_FLUSH_MS;
        if !due {
            // Only the devices that changed state: their rows are committed with the event.
            for e in &batch.events {
                if let Some(device) = self.intake.device(e.eui)
                    && self.dirty.remove(&device.id)
                    && let Some((eui, h)) = self.health.get(device.id)
                {
                    batch.health.insert(eui, h);
                }
            }
            return;
        }
        self.last_health_flush = now_ms;
        // Rule states that moved without changing a condition (a level's last sample, a
        // count within its window): written once per flush, not with every frame.
        if let Some(layer) = self.cases.as_mut() {
            batch.rule_states.extend(layer.rules.take_dirty());
        }
        // Recent frames held back for fast senders.
        self.recent.sweep(now_ms, force, &mut batch.recent);
        for id in self.dirty.drain() {
            if let Some((eui, h)) = self.health.get(id) {
                batch.health.insert(eui, h);
            }
        }
    }

    /// When [`Pipeline::tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<i64> {
        let rules = self.cases.as_ref().and_then(|l| l.rules.next_deadline());
        match (self.health.next_deadline(), rules) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Every registered device's site, kept compact (it is held for every device; 40 bytes each):
/// position, kind, and the object code and class as numbers when they are the usual 16 and 4
/// digits, other codes in a side table; sorted by EUI and looked up only when a case is
/// placed. The registry changes only at a restart, so a sorted vector beats a hash map here.
#[derive(Debug, Default)]
struct Sites {
    compact: Vec<(Eui, CompactSite)>,
    odd: HashMap<Eui, (Option<String>, Option<String>)>,
}

#[derive(Debug, Clone, Copy)]
struct CompactSite {
    lat: f64,
    lon: f64,
    /// The 16-digit object code as a number; `u64::MAX`: none or not numeric (see `odd`).
    object: u64,
    /// The 4-digit major+minor class as a number; `u16::MAX`: none or see `odd`.
    class: u16,
    kind: crate::registry::Kind,
}

fn digits<T: std::str::FromStr>(s: Option<&str>, len: usize) -> Option<T> {
    s.filter(|s| s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

impl Sites {
    fn insert(&mut self, eui: Eui, site: Site) {
        let object = digits::<u64>(site.object_code.as_deref(), 16);
        let class = digits::<u16>(site.minor_class.as_deref(), 4);
        let odd_object = site.object_code.is_some() && object.is_none();
        let odd_class = site.minor_class.is_some() && class.is_none();
        if odd_object || odd_class {
            self.odd.insert(eui, (site.object_code.clone(), site.minor_class.clone()));
        }
        self.compact.push((
            eui,
            CompactSite {
                lat: site.lat,
                lon: site.lon,
                object: object.unwrap_or(u64::MAX),
                class: class.unwrap_or(u16::MAX),
                kind: site.kind,
            },
        ));
    }

    /// Sorts for lookups (after the last insert); a later duplicate EUI replaces an earlier.
    fn seal(&mut self) {
        self.compact.reverse();
        self.compact.sort_by_key(|(eui, _)| *eui);
        self.compact.dedup_by_key(|(eui, _)| *eui);
        self.compact.shrink_to_fit();
    }

    fn get(&self, eui: Eui) -> Option<Site> {
        let i = self.compact.binary_search_by_key(&eui, |(e, _)| *e).ok()?;
        let (_, c) = self.compact.get(i)?;
        let (odd_object, odd_class) = self.odd.get(&eui).cloned().unwrap_or_default();
        Some(Site {
            kind: c.kind,
            lat: c.lat,
            lon: c.lon,
            object_code: (c.object != u64::MAX).then(|| format!("{:016}", c.object)).or(odd_object),
            minor_class: (c.class != u16::MAX).then(|| format!("{:04}", c.class)).or(odd_class),
        })
    }
}

/// Online/offline transitions of a device as observations of [`Signal::Online`].
fn online_observations(events: &[HealthEvent], eui: Eui, out: &mut Vec<Observation>) {
    for e in events.iter().filter(|e| e.eui == eui) {
        let value = match e.kind {
            EventKind::Online => 1.0,
            EventKind::Offline => 0.0,
            _ => continue,
        };
        out.push(Observation { signal: Signal::Online, value, at_ms: e.at_ms });
    }
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::{DeviceKey, Direction, examples, seal, topic::topic};

    use super::*;
    use crate::{health::EventKind, registry::Kind};

    fn pipeline() -> (Pipeline, DeviceKey) {
        pipeline_of(&[1])
    }

    /// A pipeline with these drains registered, all under one key.
    fn pipeline_of(euis: &[u64]) -> (Pipeline, DeviceKey) {
        let key = DeviceKey::from_bytes([3; 16]);
        let registry = euis
            .iter()
            .map(|n| Registered { eui: Eui(*n), kind: Kind::Drain, key: key.clone() })
            .collect();
        let config = HealthConfig {
            offline_factor: 2.0,
            interval_ms: [1, 60_000, 1],
            low_battery_mv: 3_300,
            max_ahead_ms: 120_000,
        };
        (Pipeline::new(registry, vec![], vec![], config), key)
    }

    #[test]
    fn times_far_ahead_are_clamped_to_the_receive_time_and_a_backlog_keeps_its_order() {
        use gridsense_protocol::{
            AlarmCleared, AlarmKind, Backlog, DrainSample, Sample, TimedSample,
        };
        let now = DeviceTime(1_000_000);
        let limit = DeviceTime(1_000_120);
        let drain =
            |at| Uplink::DrainReading { at, sample: DrainSample { level_mm: 1, rate_mm_h: 0 } };
        let mut m = drain(DeviceTime(1_000_100));
        assert_eq!(clamp_future(&mut m, now, limit), 0, "within max_ahead: kept");
        let mut m = drain(DeviceTime(u32::MAX));
        assert_eq!(clamp_future(&mut m, now, limit), 1);
        assert_eq!(m, drain(now));
        let mut m = Uplink::AlarmCleared(AlarmCleared {
            kind: AlarmKind::CoverOpen,
            value: 1,
            since: DeviceTime(999_000),
            at: DeviceTime(2_000_000),
        });
        assert_eq!(clamp_future(&mut m, now, limit), 1);
        let Uplink::AlarmCleared(a) = m else { panic!() };
        assert_eq!((a.since, a.at), (DeviceTime(999_000), now));
        // A backlog: 999,900, then 1,000,110 (kept), then 5,000,000 (clamped: but not before
        // the sample ahead of it), 5,000,300.
        let s = Sample::Drain(DrainSample { level_mm: 1, rate_mm_h: 0 });
        let deltas = [0, 210, 3_999_890, 300];
        let samples = deltas.iter().map(|d| TimedSample { delta_s: *d, sample: s }).collect();
        let mut m = Uplink::Backlog(Backlog { base: DeviceTime(999_900), samples });
        assert_eq!(clamp_future(&mut m, now, limit), 2);
        let Uplink::Backlog(b) = m else { panic!() };
        let times: Vec<u32> = b.timed().map(|(t, _)| t.secs()).collect();
        assert_eq!(times, [999_900, 1_000_110, 1_000_110, 1_000_110]);
    }

    #[test]
    fn a_reading_dated_in_the_future_is_stored_at_its_receive_time_and_counted() {
        let (mut p, key) = pipeline();
        let up = topic(Eui(1), Direction::Uplink);
        let now_ms: i64 = 1_796_000_000_000;
        let ahead =
            |s: i64| DeviceTime::from_unix_secs(u64::try_from(now_ms / 1000 + s).unwrap()).unwrap();
        let reading = |at| Uplink::DrainReading {
            at,
            sample: gridsense_protocol::DrainSample { level_mm: 900, rate_mm_h: 0 },
        };
        let mut batch = Batch::default();
        p.handle(now_ms, &up, &seal(Eui(1), 1, &reading(ahead(60)), &key), &mut batch);
        p.handle(now_ms, &up, &seal(Eui(1), 2, &reading(ahead(3_600)), &key), &mut batch);
        assert_eq!(batch.future_samples, 1, "only the one over 120 s ahead");
        let times: Vec<i64> = batch.telemetry.iter().map(|t| t.at_ms).collect();
        assert!(times.contains(&(now_ms + 60_000)), "{times:?}");
        assert!(times.contains(&now_ms), "clamped to the receive time: {times:?}");
        assert!(times.iter().all(|t| *t <= now_ms + 60_000), "{times:?}");
    }

    #[test]
    fn a_fast_senders_recent_frames_are_written_together_once_an_interval() {
        let mut w = RecentWrites::default();
        let id = DeviceId(3);
        let frame = |counter: u32, at: i64| crate::batch::RecentFrame {
            eui: Eui(7),
            counter,
            received_ms: at,
            kind: "drain_reading",
            samples: 1,
        };
        let mut out = Vec::new();
        let s = RECENT_EVERY_MS / 5;
        // The first goes at once; the next four are held (within the interval of the write).
        for (i, at) in [0, s, 2 * s, 3 * s, 4 * s].into_iter().enumerate() {
            w.on_frame(at, id, frame(u32::try_from(i).unwrap(), at), &mut out);
        }
        assert_eq!(out.iter().map(|f| f.counter).collect::<Vec<_>>(), [0]);
        // An interval on, a frame takes the held ones with it.
        let t = RECENT_EVERY_MS;
        w.on_frame(t, id, frame(5, t), &mut out);
        assert_eq!(out.iter().map(|f| f.counter).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
        // A frame held, then the device falls silent: the sweep writes it once its interval
        // has passed, and forgets the device after the next one.
        out.clear();
        w.on_frame(t + s, id, frame(6, t + s), &mut out);
        w.sweep(t + 2 * s, false, &mut out);
        assert!(out.is_empty(), "within the interval: held");
        w.sweep(2 * t + 1, false, &mut out);
        assert_eq!(out.len(), 1);
        w.sweep(4 * t, false, &mut out);
        assert!(w.devices.is_empty(), "nothing held, interval passed: forgotten");
        // At shutdown everything held is written; more than 16 held keeps the newest 16.
        out.clear();
        let u = 10 * t;
        w.on_frame(u, id, frame(100, u), &mut out);
        for i in 0..20 {
            w.on_frame(u + 1 + i64::from(i), id, frame(101 + i, u + 1), &mut out);
        }
        out.clear();
        w.sweep(u + 100, true, &mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(out.last().map(|f| f.counter), Some(120));
    }

    #[test]
    fn an_accepted_frame_fills_every_part_of_the_batch() {
        let (mut p, key) = pipeline();
        let up = topic(Eui(1), Direction::Uplink);
        let mut batch = Batch::default();
        let uplinks = examples::uplinks();
        let drain = &uplinks[1];
        let status = &uplinks[2];
        assert_eq!(
            p.handle(1_000, &up, &seal(Eui(1), 1, drain, &key), &mut batch),
            Outcome::Accepted("drain_reading")
        );
        assert_eq!(
            p.handle(1_001, &up, &seal(Eui(1), 2, status, &key), &mut batch),
            Outcome::Accepted("status")
        );
        // The same frame again within the batch is a duplicate, stored nowhere.
        assert_eq!(
            p.handle(1_002, &up, &seal(Eui(1), 2, status, &key), &mut batch),
            Outcome::Rejected("duplicate")
        );
        p.finish(&mut batch, 0, true);
        assert_eq!(batch.accepted, 2);
        assert_eq!(batch.telemetry.len(), 2 + 4);
        assert_eq!(batch.messages.len(), 1);
        assert_eq!(batch.counters[&Eui(1)].highest(), Some(2));
        assert_eq!(batch.events.iter().map(|e| e.kind).collect::<Vec<_>>(), [EventKind::Online]);
        assert_eq!(batch.rejects["duplicate"], 1);
        assert_eq!(batch.audit.len(), 1);
        assert_eq!(batch.health[&Eui(1)].rejects, 1);
    }

    #[test]
    fn a_devices_health_row_is_written_once_per_flush_not_with_every_frame() {
        let (mut p, key) = pipeline_of(&[1, 2]);
        let up = topic(Eui(1), Direction::Uplink);
        let drain = &examples::uplinks()[1];
        // The first frame brings the device online: a transition, flushed at once.
        let mut batch = Batch::default();
        p.handle(10_000, &up, &seal(Eui(1), 1, drain, &key), &mut batch);
        p.finish(&mut batch, 10_000, false);
        assert_eq!(batch.health[&Eui(1)].frames, 1);
        // Frames within the flush interval: counters and telemetry go, the row waits.
        let mut counts = Vec::new();
        for (n, at) in [(2, 10_500), (3, 11_000), (4, 11_900)] {
            let mut batch = Batch::default();
            p.handle(at, &up, &seal(Eui(1), n, drain, &key), &mut batch);
            p.finish(&mut batch, at, false);
            assert!(batch.counters.contains_key(&Eui(1)), "the counter goes with its frame");
            counts.push(batch.health.get(&Eui(1)).map(|h| h.frames));
        }
        assert_eq!(counts, [None, None, None], "no row before {HEALTH_FLUSH_MS} ms");
        // Another device comes online meanwhile: its row goes with its event, the first's not.
        let mut batch = Batch::default();
        p.handle(
            11_950,
            &topic(Eui(2), Direction::Uplink),
            &seal(Eui(2), 1, drain, &key),
            &mut batch,
        );
        p.finish(&mut batch, 11_950, false);
        assert_eq!(batch.health.keys().copied().collect::<Vec<_>>(), [Eui(2)]);
        // The interval over: one row with every frame counted.
        let mut batch = Batch::default();
        p.handle(12_000, &up, &seal(Eui(1), 5, drain, &key), &mut batch);
        p.finish(&mut batch, 12_000, false);
        assert_eq!(batch.health[&Eui(1)].frames, 5);
    }

    #[test]
    fn rule_states_go_once_per_flush_unless_their_condition_changes() {
        use gridsense_protocol::{DeviceTime, DrainSample};
        let (p, key) = pipeline();
        let tables = Arc::new(crate::cases::CaseTables::default());
        let cases = Cases::new(tables, 600_000).unwrap();
        let site =
            Site { kind: Kind::Drain, lat: 38.9, lon: 121.6, object_code: None, minor_class: None };
        let attrs = crate::rules::Attributes {
            warn_mm: Some(500.0),
            alarm_mm: Some(800.0),
            well_depth_mm: Some(1_000.0),
        };
        let rules = Rules::new(&crate::rules::RulesConfig::default());
        let mut p = p.with_cases(rules, cases, vec![(Eui(1), site, attrs)], vec![]);
        let up = topic(Eui(1), Direction::Uplink);
        let reading = |at_s: u32, level_mm: u16| Uplink::DrainReading {
            at: DeviceTime(at_s),
            sample: DrainSample { level_mm, rate_mm_h: 0 },
        };
        let send = |p: &mut Pipeline, n: u32, level_mm: u16, now: i64| {
            let mut batch = Batch::default();
            let frame = seal(Eui(1), n, &reading(1_000_000 + n, level_mm), &key);
            assert!(matches!(p.handle(now, &up, &frame, &mut batch), Outcome::Accepted(_)));
            p.finish(&mut batch, now, false);
            batch
        };
        // The first flush is due at once; then readings that move the rate and stuck rules'
        // states but change no condition wait for the next one.
        send(&mut p, 1, 100, 10_000);
        let waiting: Vec<usize> = [(2, 110, 10_500), (3, 120, 11_000), (4, 130, 11_900)]
            .into_iter()
            .map(|(n, level, at)| send(&mut p, n, level, at).rule_states.len())
            .collect();
        assert_eq!(waiting, [0, 0, 0], "no rule state before {HEALTH_FLUSH_MS} ms");
        let flushed = send(&mut p, 5, 140, 12_000);
        assert!(!flushed.rule_states.is_empty(), "the states moved, and go at the flush");
        // Over the alarm level: the condition changes, and its states go with its case.
        let alarm = send(&mut p, 6, 900, 12_100);
        assert!(!alarm.cases.outbox.is_empty(), "a case");
        assert!(
            alarm.rule_states.iter().any(|(_, rule, _)| rule.starts_with("drain_overflow")),
            "{:?}",
            alarm.rule_states
        );
    }

    #[test]
    fn rejects_are_counted_and_audited_by_reason() {
        let (mut p, key) = pipeline();
        let mut batch = Batch::default();
        let msg = &examples::uplinks()[0];
        let stranger = seal(Eui(2), 1, msg, &key);
        p.handle(0, &topic(Eui(2), Direction::Uplink), &stranger, &mut batch);
        let forged = seal(Eui(1), 1, msg, &DeviceKey::from_bytes([4; 16]));
        p.handle(0, &topic(Eui(1), Direction::Uplink), &forged, &mut batch);
        p.handle(0, "junk", b"xx", &mut batch);
        for _ in 0..100 {
            p.handle(0, &topic(Eui(1), Direction::Uplink), b"garbage", &mut batch);
        }
        assert_eq!(batch.rejects["unknown_device"], 1);
        assert_eq!(batch.rejects["bad_tag"], 1);
        assert_eq!(batch.rejects["bad_topic"], 1);
        assert_eq!(batch.rejects["truncated"], 100);
        assert_eq!(batch.accepted, 0);
        assert!(batch.telemetry.is_empty());
    }

    #[test]
    fn compact_sites_give_back_what_was_registered() {
        let site = |object: Option<&str>, class: Option<&str>| Site {
            kind: Kind::Cover,
            lat: 38.914_123_4,
            lon: 121.614_567_8,
            object_code: object.map(str::to_owned),
            minor_class: class.map(str::to_owned),
        };
        let cases = [
            site(Some("2102020102000001"), Some("0102")),
            site(Some("0000000000000042"), Some("0007")),
            site(Some("ZS-0102-77"), Some("01x2")),
            site(None, None),
        ];
        let mut sites = Sites::default();
        for (i, s) in cases.iter().enumerate() {
            sites.insert(Eui(10 - i as u64), s.clone());
        }
        // A later registration of the same device wins.
        sites.insert(Eui(10), site(Some("2102020102000009"), Some("0103")));
        sites.seal();
        assert_eq!(sites.get(Eui(10)), Some(site(Some("2102020102000009"), Some("0103"))));
        for (i, s) in cases.iter().enumerate().skip(1) {
            assert_eq!(sites.get(Eui(10 - i as u64)).as_ref(), Some(s));
        }
        assert_eq!(sites.get(Eui(99)), None);
    }

    #[test]
    fn a_flooding_device_is_throttled_and_flagged_once_a_minute() {
        let (p, key) = pipeline();
        let mut p = p.with_rate_limit(300);
        let up = topic(Eui(1), Direction::Uplink);
        let reading = &examples::uplinks()[1];
        let mut batch = Batch::default();
        for counter in 1..=310 {
            p.handle(1_000, &up, &seal(Eui(1), counter, reading, &key), &mut batch);
        }
        assert_eq!(batch.accepted, 300);
        assert_eq!(batch.rejects["rate_limited"], 10);
        assert_eq!(batch.audit.len(), 1, "the first refusal is audited, the rest counted");
        let flooding = batch.events.iter().filter(|e| e.kind == EventKind::Flooding).count();
        assert_eq!(flooding, 1);
        // The next minute the budget is back.
        let mut next = Batch::default();
        p.handle(61_000, &up, &seal(Eui(1), 311, reading, &key), &mut next);
        assert_eq!(next.accepted, 1);
        // Unknown devices are not counted (they are refused anyway), and the limit can be off.
        let (p, key) = pipeline();
        let mut p = p.with_rate_limit(0);
        let mut batch = Batch::default();
        for counter in 1..=400 {
            p.handle(1_000, &up, &seal(Eui(1), counter, reading, &key), &mut batch);
        }
        assert_eq!(batch.accepted, 400);
    }

    #[test]
    fn deadlines_tick_into_offline_events() {
        let (mut p, key) = pipeline();
        let mut batch = Batch::default();
        p.handle(
            0,
            &topic(Eui(1), Direction::Uplink),
            &seal(Eui(1), 1, &examples::uplinks()[1], &key),
            &mut batch,
        );
        assert_eq!(p.next_deadline(), Some(120_000));
        let mut later = Batch::default();
        p.tick(120_000, &mut later);
        p.finish(&mut later, 0, true);
        assert_eq!(later.events.iter().map(|e| e.kind).collect::<Vec<_>>(), [EventKind::Offline]);
        assert!(!later.health[&Eui(1)].online);
    }

    #[test]
    fn a_shard_handed_over_keeps_no_timer_here_and_one_taken_over_gets_the_stored_state() {
        let shards = 4;
        let (p, key) = pipeline_of(&[1, 2]);
        let mut p = p.with_shards(shards);
        let shard = |n: u64| usize::from(p.shard_of(Eui(n)));
        let (one, two) = (shard(1), shard(2));
        assert_ne!(one, two, "the two devices are in different shards of {shards}");
        let mut batch = Batch::default();
        for n in [1, 2] {
            let t = gridsense_protocol::topic::uplink_topic(Eui(n), shards, Lane::Up);
            let frame = seal(Eui(n), 5, &examples::uplinks()[1], &key);
            assert!(matches!(p.handle(0, t.as_str(), &frame, &mut batch), Outcome::Accepted(_)));
        }
        p.finish(&mut batch, 0, true);
        let stored = batch.health[&Eui(1)].clone();
        // Device 1's shard goes: its deadline, row and window go with it.
        let gone = ShardMask::of(shards, [u16::try_from(one).unwrap()]);
        p.forget_shards(&gone);
        let mut later = Batch::default();
        p.tick(1_000_000, &mut later);
        p.finish(&mut later, 1_000_000, true);
        let offline: Vec<Eui> = later.events.iter().map(|e| e.eui).collect();
        assert_eq!(offline, [Eui(2)], "only the device still owned here went offline");
        assert!(!later.health.contains_key(&Eui(1)));
        // Taken back: the stored window (counter 5) and health (deadline from last seen).
        let state = ShardState {
            counters: batch.counters.iter().map(|(e, w)| (*e, *w)).collect(),
            health: vec![(Eui(1), stored), (Eui(2), batch.health[&Eui(2)].clone())],
            ..ShardState::default()
        };
        p.adopt_shards(&gone, state);
        assert_eq!(p.next_deadline(), Some(120_000));
        let mut again = Batch::default();
        let t = gridsense_protocol::topic::uplink_topic(Eui(1), shards, Lane::Up);
        let replay = seal(Eui(1), 5, &examples::uplinks()[1], &key);
        assert_eq!(p.handle(10, t.as_str(), &replay, &mut again), Outcome::Rejected("duplicate"));
        let mut after = Batch::default();
        p.tick(120_000, &mut after);
        assert_eq!(after.events.iter().map(|e| e.eui).collect::<Vec<_>>(), [Eui(1)]);
    }

    #[test]
    fn an_urgent_frame_is_confirmed_with_its_batch_and_again_for_every_copy() {
        use gridsense_protocol::{Downlink, open, topic::uplink_topic};
        let (p, key) = pipeline_of(&[1]);
        let mut p = p.with_shards(4);
        let alarm = Uplink::AlarmRaised(gridsense_protocol::AlarmRaised {
            kind: gridsense_protocol::AlarmKind::CoverRemoved,
            value: 1,
            since: DeviceTime(1_000),
        });
        let urgent = uplink_topic(Eui(1), 4, Lane::Urgent);
        let frame = seal(Eui(1), 7, &alarm, &key);
        let acks = |batch: &Batch| -> Vec<u32> {
            batch
                .downlinks
                .iter()
                .filter_map(|(_, f, _)| match open::<Downlink>(f, &key).ok()?.1 {
                    Downlink::UplinkAck { counter } => Some(counter),
                    _ => None,
                })
                .collect()
        };
        let mut batch = Batch::default();
        assert!(matches!(p.handle(0, &urgent, &frame, &mut batch), Outcome::Accepted(_)));
        assert_eq!(acks(&batch), [7]);
        let mut again = Batch::default();
        assert_eq!(p.handle(10, &urgent, &frame, &mut again), Outcome::Rejected("duplicate"));
        assert_eq!(acks(&again), [7], "a copy means the confirmation was missed: sent again");
        // Telemetry is not confirmed frame by frame; version 1's topic gets the move instead.
        let mut plain = Batch::default();
        let reading = seal(Eui(1), 8, &examples::uplinks()[1], &key);
        p.handle(20, &uplink_topic(Eui(1), 4, Lane::Up), &reading, &mut plain);
        assert!(acks(&plain).is_empty());
        let mut legacy = Batch::default();
        let old = seal(Eui(1), 9, &alarm, &key);
        p.handle(30, &topic(Eui(1), Direction::Uplink), &old, &mut legacy);
        assert!(acks(&legacy).is_empty(), "version 1 devices do not wait for it");
        assert_eq!(legacy.downlinks.len(), 1, "but are told the shards");
    }

    #[test]
    fn other_frames_are_confirmed_by_a_window_at_the_batch_s_end_every_8_frames_or_30_s() {
        use gridsense_protocol::{Downlink, open, topic::uplink_topic};
        let (p, key) = pipeline_of(&[1]);
        let mut p = p.with_shards(4);
        let up = uplink_topic(Eui(1), 4, Lane::Up);
        let windows = |batch: &Batch| -> Vec<(u32, u64)> {
            batch
                .downlinks
                .iter()
                .filter_map(|(_, f, route)| match open::<Downlink>(f, &key).ok()?.1 {
                    Downlink::UplinkWindow { highest, seen } => {
                        assert_eq!(*route, crate::downlink::Route::Confirmation, "at most once");
                        Some((highest, seen))
                    }
                    _ => None,
                })
                .collect()
        };
        let reading = |counter: u32| seal(Eui(1), counter, &examples::uplinks()[1], &key);
        // The first frame: a window at once (none was ever sent), with its batch.
        let mut batch = Batch::default();
        p.handle(0, &up, &reading(10), &mut batch);
        assert!(windows(&batch).is_empty(), "not before the batch is complete");
        p.finish(&mut batch, 0, true);
        assert_eq!(windows(&batch), [(10, 1)]);
        // Seven more in one batch, counter 12 lost on the way: not due yet.
        let mut batch = Batch::default();
        for c in [11, 13, 14, 15, 16, 17, 18] {
            p.handle(100, &up, &reading(c), &mut batch);
        }
        p.finish(&mut batch, 100, true);
        assert!(windows(&batch).is_empty(), "7 since the last window");
        // The eighth: one window for the batch, its gap showing.
        let mut batch = Batch::default();
        p.handle(200, &up, &reading(19), &mut batch);
        p.handle(200, &up, &reading(20), &mut batch);
        p.finish(&mut batch, 200, true);
        let seen = [20u32, 19, 18, 17, 16, 15, 14, 13, 11, 10]
            .iter()
            .fold(0u64, |bits, c| bits | 1 << (20 - c));
        assert_eq!(windows(&batch), [(20, seen)], "one per device and batch");
        assert!(!Downlink::window_holds(20, seen, 12), "the lost frame shows as a gap");
        // A copy of a stored frame: the device missed the window, it gets one more.
        let mut batch = Batch::default();
        assert_eq!(p.handle(300, &up, &reading(19), &mut batch), Outcome::Rejected("duplicate"));
        p.finish(&mut batch, 300, true);
        assert_eq!(windows(&batch), [(20, seen)]);
        // One frame 30 s after the last window: due by time.
        let mut batch = Batch::default();
        p.handle(30_300, &up, &reading(12), &mut batch);
        p.finish(&mut batch, 30_300, true);
        assert_eq!(windows(&batch), [(20, seen | 1 << 8)], "the resent gap is held now");
        // Version 1's topic is not confirmed.
        let mut legacy = Batch::default();
        p.handle(90_000, &topic(Eui(1), Direction::Uplink), &reading(21), &mut legacy);
        p.finish(&mut legacy, 90_000, true);
        assert!(windows(&legacy).is_empty());
    }
}
