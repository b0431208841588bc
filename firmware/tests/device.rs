//! Device behaviour in virtual time: every timing rule (debounce, hold, hysteresis, deadband,
//! heartbeat, fast sampling, store-and-forward, resends) driven by `now`, with the frames the
//! device emits decoded by the protocol crate exactly as the gateway would.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use gridsense_firmware::{
    Device, Health, Identity, Instant, WallClock,
    beacon::{Beacon, BeaconInput},
    counter::RamStore,
    cover::{Cover, CoverInput},
    drain::{Drain, DrainInput},
    sensing::Sensing,
};
use gridsense_protocol::{
    AckOutcome, AlarmKind, CaseClass, ClassKind, CounterWindow, DeviceKey, DeviceTime, Downlink,
    DownlinkAck, Eui, FirmwareVersion, PositionFix, ResetCause, Sample, Setting, SwitchState,
    Uplink, open, seal,
};

const EUI: Eui = Eui(0x3205_0801_0100_0001);
const KEY: DeviceKey = DeviceKey::from_bytes([0x42; 16]);
const BOOT: DeviceTime = DeviceTime(60_000_000);

fn identity() -> Identity {
    Identity {
        eui: EUI,
        key: KEY,
        firmware: FirmwareVersion { major: 1, minor: 2, patch: 3 },
        reset_cause: ResetCause::PowerOn,
    }
}

type Dev<S> = Device<S, RamStore, 8, 64>;

fn boot<S: Sensing>(sensing: S) -> Dev<S> {
    Device::boot(identity(), sensing, RamStore::default(), WallClock::new(BOOT), Instant::ZERO)
        .unwrap()
}

/// Publishes everything the device has, as a connected device would (each frame PUBACKed),
/// and returns the decoded messages with their counters.
fn drain_frames<S: Sensing>(dev: &mut Dev<S>) -> Vec<(u32, Uplink)> {
    let mut out = Vec::new();
    while let Some(frame) = dev.poll_transmit().unwrap() {
        let (header, msg) = open::<Uplink>(frame, &KEY).unwrap();
        assert_eq!(header.eui, EUI);
        out.push((header.counter, msg));
        dev.handle_puback();
    }
    out
}

fn alarms(msgs: &[(u32, Uplink)]) -> Vec<(&'static str, AlarmKind, u32)> {
    msgs.iter()
        .filter_map(|(_, m)| match m {
            Uplink::AlarmRaised(a) => Some(("raised", a.kind, a.since.0)),
            Uplink::AlarmCleared(a) => Some(("cleared", a.kind, a.since.0)),
            _ => None,
        })
        .collect()
}

/// Accelerometer reading for a cover tilted by `deg` from its baseline (gravity on z).
fn tilted(deg: f32) -> CoverInput {
    let r = deg.to_radians();
    CoverInput {
        accel_mg: [(1000.0 * r.sin()) as i16, 0, (1000.0 * r.cos()) as i16],
        switch: SwitchState::Closed,
        water_mm: None,
    }
}

/// Feeds the cover a constant tilt from `from_ms` to `to_ms` at the rate it asks for.
fn hold_tilt(dev: &mut Dev<Cover>, deg: f32, from_ms: u64, to_ms: u64) {
    let mut now = Instant::from_millis(from_ms);
    dev.handle_input(now, tilted(deg));
    loop {
        now = dev.poll_timeout().max(now.add_millis(1));
        if now.as_millis() > to_ms {
            break;
        }
        dev.handle_input(now, tilted(deg));
        dev.handle_timeout(now);
    }
}

#[test]
fn passing_vehicle_spikes_do_not_alarm_but_a_held_tilt_does_with_its_onset() {
    let mut dev = boot(Cover::new([0, 0, 1000]));
    hold_tilt(&mut dev, 0.5, 0, 60_000);
    // Twenty vehicles, each tipping the cover 25° for 1.5 s (under the 2 s hold).
    for i in 0..20u64 {
        let start = 60_000 + i * 10_000;
        hold_tilt(&mut dev, 25.0, start, start + 1_500);
        hold_tilt(&mut dev, 0.5, start + 1_600, start + 9_000);
    }
    let msgs = drain_frames(&mut dev);
    assert!(alarms(&msgs).is_empty(), "{:?}", alarms(&msgs));

    // Displaced: 25° held for 5 s, then put back.
    hold_tilt(&mut dev, 25.0, 300_000, 305_000);
    let msgs = drain_frames(&mut dev);
    let onset = BOOT.0 + 300;
    assert_eq!(alarms(&msgs), [("raised", AlarmKind::CoverTilt, onset)]);
    let raised_value = msgs.iter().find_map(|(_, m)| match m {
        Uplink::AlarmRaised(a) => Some(a.value),
        _ => None,
    });
    assert_eq!(raised_value, Some(250));
    hold_tilt(&mut dev, 0.5, 305_100, 320_000);
    let msgs = drain_frames(&mut dev);
    assert_eq!(alarms(&msgs), [("cleared", AlarmKind::CoverTilt, onset)]);
    // Readings went with both changes as evidence.
    assert!(
        msgs.iter().any(|(_, m)| matches!(m, Uplink::CoverReading { .. } | Uplink::Backlog(_)))
    );
}

#[test]
fn a_removed_cover_alarms_at_once() {
    let mut dev = boot(Cover::new([0, 0, 1000]));
    hold_tilt(&mut dev, 0.0, 0, 20_000);
    drain_frames(&mut dev);
    let now = Instant::from_millis(20_100);
    dev.handle_input(now, tilted(170.0));
    let msgs = drain_frames(&mut dev);
    assert_eq!(alarms(&msgs), [("raised", AlarmKind::CoverRemoved, BOOT.0 + 20)]);
}

#[test]
fn a_tilt_alarm_escalates_to_removed() {
    let mut dev = boot(Cover::new([0, 0, 1000]));
    hold_tilt(&mut dev, 30.0, 0, 3_000);
    hold_tilt(&mut dev, 120.0, 3_100, 4_000);
    let got = alarms(&drain_frames(&mut dev));
    assert_eq!(
        got,
        [("raised", AlarmKind::CoverTilt, BOOT.0), ("raised", AlarmKind::CoverRemoved, BOOT.0)]
    );
}

#[test]
fn open_switch_and_water_alarm_and_clear() {
    let mut dev = boot(Cover::new([0, 0, 1000]));
    let mut input = tilted(0.0);
    dev.handle_input(Instant::ZERO, input);
    input.switch = SwitchState::Open;
    dev.handle_input(Instant::from_secs(10), input);
    input.switch = SwitchState::Closed;
    input.water_mm = Some(350);
    dev.handle_input(Instant::from_secs(20), input);
    input.water_mm = Some(280); // inside the hysteresis band: still raised
    dev.handle_input(Instant::from_secs(30), input);
    input.water_mm = Some(100);
    dev.handle_input(Instant::from_secs(40), input);
    let got = alarms(&drain_frames(&mut dev));
    assert_eq!(
        got,
        [
            ("raised", AlarmKind::CoverOpen, BOOT.0 + 10),
            ("cleared", AlarmKind::CoverOpen, BOOT.0 + 10),
            ("raised", AlarmKind::CoverWater, BOOT.0 + 20),
            ("cleared", AlarmKind::CoverWater, BOOT.0 + 20),
        ]
    );
}

/// Runs a drain over a level curve, sampling whenever it asks; returns every emitted message.
fn run_drain(dev: &mut Dev<Drain>, until_s: u64, level: impl Fn(u64) -> u16) -> Vec<(u32, Uplink)> {
    let mut msgs = Vec::new();
    let mut now = Instant::ZERO;
    while now.as_millis() <= until_s * 1000 {
        if dev.sample_due(now) {
            dev.handle_input(now, DrainInput { level_mm: level(now.as_millis() / 1000) });
        }
        dev.handle_timeout(now);
        msgs.extend(drain_frames(dev));
        now = dev.poll_timeout().max(now.add_millis(1));
    }
    msgs
}

#[test]
fn calm_weather_samples_every_5_minutes_and_reports_only_changes_or_heartbeats() {
    let mut dev = boot(Drain::new());
    // Ten hours of a level wobbling by 5 mm, inside the 20 mm deadband.
    let msgs = run_drain(&mut dev, 36_000, |t| 800 + (t / 300 % 2) as u16 * 5);
    let readings: Vec<u32> = msgs
        .iter()
        .filter_map(|(_, m)| match m {
            Uplink::DrainReading { at, .. } => Some(at.0 - BOOT.0),
            _ => None,
        })
        .collect();
    // The first reading, then one per heartbeat (1 h) of silence.
    assert_eq!(readings, (0..=10).map(|h| h * 3_600).collect::<Vec<_>>());
    let statuses = msgs.iter().filter(|(_, m)| matches!(m, Uplink::Status(_))).count();
    assert_eq!(statuses, 11);
}

#[test]
fn a_storm_raises_warning_then_alarm_samples_fast_and_clears_with_hysteresis() {
    let mut dev = boot(Drain::new());
    // Level (mm) over time (s): calm, rising 10 mm/min from t=3000 to 4.5 m, then falling.
    let curve = |t: u64| -> u16 {
        let t = t as i64;
        let level = if t < 3_000 {
            1_000
        } else if t < 3_000 + 21_000 {
            1_000 + (t - 3_000) / 6
        } else {
            4_500 - (t - 24_000) / 6
        };
        level.clamp(0, 7_000) as u16
    };
    let msgs = run_drain(&mut dev, 50_000, curve);
    let got = alarms(&msgs);
    let kinds: Vec<_> = got.iter().map(|(what, kind, _)| (*what, *kind)).collect();
    assert_eq!(
        kinds,
        [
            ("raised", AlarmKind::DrainWarning),
            ("raised", AlarmKind::DrainAlarm),
            ("cleared", AlarmKind::DrainAlarm),
            ("cleared", AlarmKind::DrainWarning),
        ]
    );
    // Warning at 2500 mm is reached at t = 3000 + 9000 = 12000 s; the calm 5-minute sampling
    // sees it at the first sample at or after that.
    let warn_since = got[0].2 - BOOT.0;
    assert!((12_000..12_300).contains(&warn_since), "{warn_since}");
    // While in warning it samples every 60 s, and reports every sample with a rising rate.
    let fast: Vec<(u32, i32)> = msgs
        .iter()
        .filter_map(|(_, m)| match m {
            Uplink::DrainReading { at, sample }
                if sample.level_mm >= 2_600 && sample.level_mm < 4_000 =>
            {
                Some((at.0, sample.rate_mm_h))
            }
            _ => None,
        })
        .collect();
    assert!(fast.len() > 50, "{}", fast.len());
    assert!(fast.windows(2).all(|w| w[1].0 - w[0].0 == 60 || w[1].1 < 0), "{fast:?}");
    assert!(fast.iter().any(|(_, rate)| *rate == 600), "{fast:?}"); // 10 mm/min = 600 mm/h
    // The alarm clears only once the level is 100 mm below 4000.
    let cleared_at = got[2].2;
    let _ = cleared_at;
    let clear_level = msgs.iter().find_map(|(_, m)| match m {
        Uplink::AlarmCleared(a) if a.kind == AlarmKind::DrainAlarm => Some(a.value),
        _ => None,
    });
    assert!(clear_level.unwrap() < 3_900, "{clear_level:?}");
}

#[test]
fn sos_overtakes_queued_telemetry_with_the_next_counter_and_nothing_is_lost() {
    let mut dev: Dev<Beacon> = boot(Beacon::new());
    drain_frames(&mut dev); // boot status
    dev.handle_input(Instant::ZERO, BeaconInput::PatrolStart);
    let fix =
        |i: i32| PositionFix { lat_udeg: 38_914_000 + i, lon_udeg: 121_646_000, accuracy_m: 3 };
    // Offline for ten minutes: fixes queue up.
    for i in 0..20 {
        dev.handle_input(Instant::from_secs(30 * i as u64), BeaconInput::Fix(fix(i)));
    }
    dev.handle_input(Instant::from_secs(601), BeaconInput::Sos);
    dev.handle_input(Instant::from_secs(602), BeaconInput::CheckIn(17));
    let msgs = drain_frames(&mut dev);
    assert!(matches!(msgs[0].1, Uplink::Sos(s) if s.fix == Some(fix(19))), "{:?}", msgs[0]);
    assert!(matches!(msgs[1].1, Uplink::CheckIn(c) if c.checkpoint == 17));
    let counters: Vec<u32> = msgs.iter().map(|(c, _)| *c).collect();
    assert!(counters.windows(2).all(|w| w[1] == w[0] + 1), "{counters:?}");
    // The fixes follow in one batch, in order, with their original times.
    let Uplink::Backlog(batch) = &msgs[2].1 else { panic!("{:?}", msgs[2]) };
    let times: Vec<u32> = batch.timed().map(|(t, _)| t.0 - BOOT.0).collect();
    assert_eq!(times, (0..20).map(|i| 30 * i).collect::<Vec<_>>());
    assert!(batch.timed().enumerate().all(|(i, (_, s))| s == Sample::Fix(fix(i as i32))));
}

#[test]
fn incident_reports_carry_class_note_and_last_fix() {
    let mut dev: Dev<Beacon> = boot(Beacon::new());
    let fix = PositionFix { lat_udeg: 38_900_000, lon_udeg: 121_600_000, accuracy_m: 5 };
    dev.handle_input(Instant::ZERO, BeaconInput::Fix(fix));
    let class = CaseClass { kind: ClassKind::Event, major: 4, minor: 6 };
    let note = heapless::String::try_from("路面积水").unwrap();
    dev.handle_input(Instant::from_secs(5), BeaconInput::Report { class, note: note.clone() });
    let msgs = drain_frames(&mut dev);
    let report = msgs.iter().find_map(|(_, m)| match m {
        Uplink::IncidentReport(r) => Some(r.clone()),
        _ => None,
    });
    let report = report.unwrap();
    assert_eq!((report.class, report.note, report.fix), (class, note, Some(fix)));
    // Off patrol, fixes are not reported as telemetry.
    assert!(!msgs.iter().any(|(_, m)| matches!(m, Uplink::PatrolFix { .. })));
}

#[test]
fn a_frame_awaiting_its_puback_is_resent_byte_identical_and_then_forgotten() {
    let mut dev = boot(Drain::new());
    dev.handle_input(Instant::ZERO, DrainInput { level_mm: 900 });
    let first = dev.poll_transmit().unwrap().unwrap().to_vec();
    // The connection drops before the PUBACK: the same bytes go again, twice.
    assert_eq!(dev.poll_transmit().unwrap().unwrap(), first.as_slice());
    assert_eq!(dev.poll_transmit().unwrap().unwrap(), first.as_slice());
    assert_eq!(dev.stats().resends, 2);
    // A reading taken meanwhile waits its turn.
    dev.handle_input(Instant::from_secs(300), DrainInput { level_mm: 990 });
    dev.handle_puback();
    let next = dev.poll_transmit().unwrap().unwrap().to_vec();
    assert_ne!(next, first);
    let (h1, _) = open::<Uplink>(&first, &KEY).unwrap();
    let (h2, _) = open::<Uplink>(&next, &KEY).unwrap();
    assert_eq!(h2.counter, h1.counter + 1);
}

#[test]
fn an_outage_beyond_the_queue_bound_drops_only_the_oldest_telemetry_and_counts_it() {
    let mut dev: Device<Drain, RamStore, 4, 16> = Device::boot(
        identity(),
        Drain::new(),
        RamStore::default(),
        WallClock::new(BOOT),
        Instant::ZERO,
    )
    .unwrap();
    // 40 reportable readings and two alarms while offline (no poll_transmit at all).
    for i in 0..40u64 {
        let level = if i == 20 { 4_200 } else { 500 + 50 * i as u16 % 1_000 };
        dev.handle_input(Instant::from_secs(300 * i), DrainInput { level_mm: level });
    }
    assert_eq!(dev.outbox_stats().urgent_refused, 0);
    let dropped = dev.outbox_stats().telemetry_dropped;
    let mut readings = Vec::new();
    let mut alarm_count = 0;
    while let Some(frame) = dev.poll_transmit().unwrap() {
        match open::<Uplink>(frame, &KEY).unwrap().1 {
            Uplink::Backlog(b) => readings.extend(b.timed().map(|(t, _)| t.0 - BOOT.0)),
            Uplink::DrainReading { at, .. } => readings.push(at.0 - BOOT.0),
            Uplink::AlarmRaised(_) | Uplink::AlarmCleared(_) => alarm_count += 1,
            _ => {}
        }
        dev.handle_puback();
    }
    assert_eq!(alarm_count, 4); // warning and alarm, raised and cleared: none dropped
    assert_eq!(readings.len(), 16);
    assert_eq!(readings.len() as u32 + dropped, 40);
    // What survived is the newest 16, in order.
    assert_eq!(readings, (24..40).map(|i| 300 * i).collect::<Vec<u32>>());
}

/// Seals a downlink for the device as the gateway would.
fn downlink(counter: u32, msg: &Downlink) -> Vec<u8> {
    seal(EUI, counter, msg, &KEY).to_vec()
}

#[test]
fn downlinks_configure_sync_time_and_are_acked_once() {
    let mut dev = boot(Drain::new());
    drain_frames(&mut dev);
    let settings =
        heapless::Vec::from_slice(&[Setting::ReportIntervalS(60), Setting::DrainWarnMm(2_000)])
            .unwrap();
    let config = downlink(5, &Downlink::Config { settings });
    dev.handle_downlink(Instant::from_secs(1), &config).unwrap();
    assert_eq!(dev.config().report_interval_s, 60);
    assert_eq!(dev.config().drain_warn_mm, 2_000);
    // A redelivered copy is not applied again.
    assert!(dev.handle_downlink(Instant::from_secs(2), &config).is_err());
    let sync = downlink(6, &Downlink::TimeSync { now: DeviceTime(70_000_000) });
    dev.handle_downlink(Instant::from_secs(10), &sync).unwrap();
    assert_eq!(dev.time_at(Instant::from_secs(20)), DeviceTime(70_000_010));
    let acks: Vec<DownlinkAck> = drain_frames(&mut dev)
        .into_iter()
        .filter_map(|(_, m)| match m {
            Uplink::DownlinkAck(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        [
            DownlinkAck { counter: 5, outcome: AckOutcome::Applied },
            DownlinkAck { counter: 6, outcome: AckOutcome::Applied },
        ]
    );
}

#[test]
fn unsupported_or_forged_downlinks_change_nothing() {
    let mut dev = boot(Cover::new([0, 0, 1000]));
    let before = *dev.config();
    let settings = heapless::Vec::from_slice(&[Setting::DrainWarnMm(10)]).unwrap();
    dev.handle_downlink(Instant::ZERO, &downlink(1, &Downlink::Config { settings })).unwrap();
    assert_eq!(*dev.config(), before);
    let mut forged = downlink(2, &Downlink::TimeSync { now: DeviceTime(1) });
    forged[14] ^= 1;
    assert!(dev.handle_downlink(Instant::ZERO, &forged).is_err());
    let other = seal(Eui(1), 3, &Downlink::StatusRequest, &KEY).to_vec();
    assert!(dev.handle_downlink(Instant::ZERO, &other).is_err());
    let uplink = seal(EUI, 4, &Uplink::Sos(gridsense_protocol::Sos { at: BOOT, fix: None }), &KEY);
    assert!(dev.handle_downlink(Instant::ZERO, &uplink).is_err());
    assert_eq!(dev.stats().downlinks_rejected, 3);
    let ack = drain_frames(&mut dev).into_iter().find_map(|(_, m)| match m {
        Uplink::DownlinkAck(a) => Some(a),
        _ => None,
    });
    assert_eq!(ack, Some(DownlinkAck { counter: 1, outcome: AckOutcome::Unsupported }));
}

#[test]
fn low_battery_alarms_and_clears_with_hysteresis() {
    let mut dev = boot(Drain::new());
    for (s, mv) in [(0, 3_600), (10, 3_250), (20, 3_350), (30, 3_420)] {
        dev.handle_health(
            Instant::from_secs(s),
            Health { battery_mv: mv, rssi_dbm: -90, temperature_dc: 150 },
        );
    }
    assert_eq!(
        alarms(&drain_frames(&mut dev)),
        [
            ("raised", AlarmKind::LowBattery, BOOT.0 + 10),
            ("cleared", AlarmKind::LowBattery, BOOT.0 + 10)
        ]
    );
}

#[test]
fn a_restarted_device_never_reuses_a_counter() {
    let mut store = RamStore::default();
    let mut window = CounterWindow::new();
    for boot_no in 0..5u64 {
        let mut dev: Dev<Drain> =
            Device::boot(identity(), Drain::new(), store, WallClock::new(BOOT), Instant::ZERO)
                .unwrap();
        for i in 0..(37 * boot_no + 3) {
            dev.handle_input(
                Instant::from_secs(300 * i),
                DrainInput { level_mm: (100 * i % 3000) as u16 },
            );
            for (counter, _) in drain_frames(&mut dev) {
                assert!(
                    matches!(
                        window.accept(counter),
                        gridsense_protocol::CounterVerdict::New { .. }
                    ),
                    "counter {counter} reused after boot {boot_no}"
                );
            }
        }
        // Power loss: only the store survives.
        store = *dev.store();
    }
}

#[test]
fn an_urgent_frame_is_kept_until_the_gateway_confirms_it_and_resent_identical_until_then() {
    let mut dev = boot(Drain::new());
    dev.configure(&[Setting::Shards(4)]);
    dev.handle_input(Instant::ZERO, DrainInput { level_mm: 4_500 });
    let mut sent = Vec::new();
    while let Some(t) = dev.poll_transmit_on().unwrap() {
        sent.push((t.topic.as_str().to_owned(), t.frame.to_vec()));
        dev.handle_puback();
    }
    let shard = gridsense_protocol::topic::shard_of(EUI, 4);
    let lane = format!("gridsense/{shard:02x}/{EUI}/urgent");
    let urgent: Vec<Vec<u8>> =
        sent.iter().filter(|(topic, _)| topic == &lane).map(|(_, f)| f.clone()).collect();
    assert!(!urgent.is_empty(), "the level's warning and alarm on the urgent lane: {sent:?}");
    assert!(
        sent.iter().all(|(topic, f)| {
            let (_, m) = open::<Uplink>(f, &KEY).unwrap();
            topic.ends_with(gridsense_protocol::topic::lane_of(&m).as_str())
        }),
        "every frame on its lane"
    );
    assert_eq!(dev.confirmations().len(), urgent.len(), "kept after their PUBACK");
    let resent = |dev: &mut Dev<Drain>| {
        let mut out = Vec::new();
        while let Some(t) = dev.poll_transmit_on().unwrap() {
            // Readings due meanwhile go on `up`.
            if t.topic.as_str() == lane {
                out.push(t.frame.to_vec());
            }
            dev.handle_puback();
        }
        out
    };
    // No confirmation within the timeout: the same bytes again, on the urgent lane.
    dev.handle_timeout(Instant::from_secs(1));
    assert!(resent(&mut dev).is_empty(), "not before the timeout");
    dev.handle_timeout(Instant::from_secs(12));
    assert_eq!(resent(&mut dev), urgent);
    // Reconnected: once more.
    dev.reconnected();
    assert_eq!(resent(&mut dev), urgent);
    // Confirmed: forgotten, never sent again.
    for (i, f) in urgent.iter().enumerate() {
        let (h, _) = open::<Uplink>(f, &KEY).unwrap();
        let ack = seal(EUI, i as u32, &Downlink::UplinkAck { counter: h.counter }, &KEY);
        dev.handle_downlink(Instant::from_secs(13), &ack).unwrap();
    }
    assert!(dev.confirmations().is_empty());
    let resends = dev.stats().resends;
    dev.handle_timeout(Instant::from_secs(40));
    while dev.poll_transmit_on().unwrap().is_some() {
        dev.handle_puback();
    }
    assert_eq!(dev.stats().resends, resends, "nothing resent after the confirmation");
    let c = dev.confirmations();
    let n = urgent.len() as u32;
    assert_eq!((c.confirmed, c.resent, c.dropped), (n, 2 * n, 0));
}

#[test]
fn other_frames_are_kept_until_a_window_holds_them_and_a_gap_goes_again_identical() {
    let mut dev = boot(Drain::new());
    dev.configure(&[Setting::Shards(4)]);
    let mut sent = Vec::new();
    for i in 0..4u64 {
        let now = Instant::from_secs(i * 10);
        dev.handle_timeout(now);
        dev.handle_input(now, DrainInput { level_mm: 100 + 100 * i as u16 });
        while let Some(t) = dev.poll_transmit_on().unwrap() {
            assert!(t.topic.as_str().ends_with("/up"), "{}", t.topic.as_str());
            let (h, _) = open::<Uplink>(t.frame, &KEY).unwrap();
            sent.push((h.counter, t.frame.to_vec()));
            dev.handle_puback();
        }
    }
    assert!(sent.len() >= 4, "readings and a status: {}", sent.len());
    assert_eq!(dev.telemetry_confirmations().len(), sent.len(), "kept after their PUBACK");
    // The gateway stored all but the second (the broker that acknowledged it died).
    let highest = sent.last().unwrap().0;
    let lost = sent[1].0;
    let seen = sent
        .iter()
        .filter(|(c, _)| *c != lost)
        .fold(0u64, |bits, (c, _)| bits | 1 << (highest - c));
    let window = seal(EUI, 0, &Downlink::UplinkWindow { highest, seen }, &KEY);
    dev.handle_downlink(Instant::from_secs(40), &window).unwrap();
    assert_eq!(dev.telemetry_confirmations().len(), 1, "only the gap is held");
    let resent = |dev: &mut Dev<Drain>| {
        let mut out = Vec::new();
        while let Some(t) = dev.poll_transmit_on().unwrap() {
            out.push((t.topic.as_str().to_owned(), t.frame.to_vec()));
            dev.handle_puback();
        }
        out
    };
    // On the other broker: the identical bytes, on the up lane.
    dev.reconnected();
    let again = resent(&mut dev);
    let shard = gridsense_protocol::topic::shard_of(EUI, 4);
    assert_eq!(again, [(format!("gridsense/{shard:02x}/{EUI}/up"), sent[1].1.clone())]);
    // Without a window: again 60 s after its PUBACK, not before.
    dev.handle_timeout(Instant::from_secs(41));
    dev.handle_timeout(Instant::from_secs(100));
    assert!(resent(&mut dev).iter().all(|(_, f)| f != &sent[1].1), "not before the timeout");
    dev.handle_timeout(Instant::from_secs(101));
    assert!(resent(&mut dev).iter().any(|(_, f)| f == &sent[1].1), "after it");
    // A window that holds it: forgotten.
    let held = highest + 8;
    let window = seal(EUI, 1, &Downlink::UplinkWindow { highest: held, seen: u64::MAX }, &KEY);
    dev.handle_downlink(Instant::from_secs(102), &window).unwrap();
    let c = dev.telemetry_confirmations();
    assert!(c.is_empty(), "{c:?}");
    assert_eq!((c.dropped, c.expired), (0, 0));
}

#[test]
fn a_device_on_version_1s_topic_waits_for_no_confirmation() {
    let mut dev = boot(Drain::new());
    dev.handle_input(Instant::ZERO, DrainInput { level_mm: 4_500 });
    let topics: Vec<String> = std::iter::from_fn(|| {
        let t = dev.poll_transmit_on().unwrap()?.topic.as_str().to_owned();
        dev.handle_puback();
        Some(t)
    })
    .collect();
    assert!(topics.iter().all(|t| t == &format!("gridsense/{EUI}/up")), "{topics:?}");
    assert!(dev.confirmations().is_empty() && dev.telemetry_confirmations().is_empty());
}
