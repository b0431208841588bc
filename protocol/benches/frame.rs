//! Encode (seal) and decode + verify + counter check, per message kind.
//!
//! `cargo bench -p gridsense-protocol --bench frame`

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gridsense_protocol::{
    CounterWindow, DeviceKey, Eui, MAX_FRAME_LEN, Message, RawFrame, Uplink, examples, seal_into,
};

fn key() -> DeviceKey {
    DeviceKey::from_bytes(*b"gridsense-bench!")
}

fn encode(c: &mut Criterion) {
    let key = key();
    let mut group = c.benchmark_group("seal");
    group.throughput(Throughput::Elements(1));
    for msg in examples::uplinks() {
        let mut buf = [0u8; MAX_FRAME_LEN];
        group.bench_function(msg.kind_name(), |b| {
            b.iter(|| {
                let frame =
                    seal_into(Eui(0x3205), black_box(48_213), black_box(&msg), &key, &mut buf);
                black_box(frame.map(<[u8]>::len))
            });
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let key = key();
    let mut window = CounterWindow::new();
    window.accept(48_000);
    let mut group = c.benchmark_group("open_and_check");
    group.throughput(Throughput::Elements(1));
    for msg in examples::uplinks() {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let Ok(frame) = seal_into(Eui(0x3205), 48_213, &msg, &key, &mut buf) else {
            continue;
        };
        let frame = frame.to_vec();
        group.bench_function(msg.kind_name(), |b| {
            b.iter(|| {
                let raw = RawFrame::parse(black_box(&frame)).ok()?;
                let verified = raw.verify(&key).ok()?;
                let msg = verified.decode::<Uplink>().ok()?;
                let verdict = window.check(verified.header().counter);
                Some((black_box(msg), verdict))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
