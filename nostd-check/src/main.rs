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
    examples::uplinks()
        .iter()
        .enumerate()
        .all(|(counter, msg)| {
            let counter = counter as u32;
            let frame = seal(Eui(1), counter, msg, &key);
            matches!(open::<Uplink>(&frame, &key), Ok((_, ref back)) if back == msg)
                && matches!(
                    window.accept(counter),
                    gridsense_protocol::CounterVerdict::New { .. }
                )
        })
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}
