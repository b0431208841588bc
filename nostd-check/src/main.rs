//! Uses the no_std crates the way firmware does: seal a frame and open it again.
#![no_std]
#![no_main]

use core::panic::PanicInfo;

use gridsense_protocol::{CounterWindow, DeviceKey, Eui, Uplink, examples, open, seal};

/// The entry point a board's runtime would call.
#[unsafe(no_mangle)]
pub extern "C" fn gridsense_nostd_check() -> bool {
    let key = DeviceKey::from_bytes([7; 16]);
    let mut window = CounterWindow::new();
    examples::uplinks().iter().enumerate().all(|(counter, msg)| {
        let counter = counter as u32;
        let frame = seal(Eui(1), counter, msg, &key);
        matches!(open::<Uplink>(&frame, &key), Ok((_, ref back)) if back == msg)
            && matches!(window.accept(counter), gridsense_protocol::CounterVerdict::New { .. })
    })
}

/// Runs a drainage sensor through a storm step and sends what it queued.
#[unsafe(no_mangle)]
pub extern "C" fn gridsense_nostd_device() -> u32 {
    use gridsense_firmware::{
        Device, Identity, Instant, WallClock,
        counter::RamStore,
        drain::{Drain, DrainInput},
    };
    use gridsense_protocol::{DeviceTime, FirmwareVersion, ResetCause};
    let id = Identity {
        eui: Eui(2),
        key: DeviceKey::from_bytes([1; 16]),
        firmware: FirmwareVersion { major: 1, minor: 0, patch: 0 },
        reset_cause: ResetCause::PowerOn,
    };
    let boot = Device::<_, _, 8, 32>::boot(
        id,
        Drain::new(),
        RamStore::default(),
        WallClock::new(DeviceTime(0)),
        Instant::ZERO,
    );
    // RAM storage cannot fail.
    let mut dev = match boot {
        Ok(dev) => dev,
        Err(never) => match never {},
    };
    dev.handle_input(Instant::ZERO, DrainInput { level_mm: 4_200 });
    dev.handle_timeout(Instant::ZERO);
    let mut sent = 0;
    while let Ok(Some(_frame)) = dev.poll_transmit() {
        dev.handle_puback();
        sent += 1;
    }
    sent
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}
