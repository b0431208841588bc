//! Counter storage that outlives a simulated device: what a board keeps in flash, kept here
//! across a simulated power loss (the device's task is dropped mid-flight, then booted again).

use std::sync::{Arc, Mutex};

use gridsense_firmware::counter::CounterStore;

/// A counter reservation shared between boots of one simulated device.
#[derive(Debug, Clone, Default)]
pub struct SharedStore(Arc<Mutex<Option<u32>>>);

/// The store's lock was poisoned by a panic elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poisoned;

impl CounterStore for SharedStore {
    type Error = Poisoned;

    fn load(&mut self) -> Result<Option<u32>, Poisoned> {
        self.0.lock().map(|v| *v).map_err(|_| Poisoned)
    }

    fn save(&mut self, reservation: u32) -> Result<(), Poisoned> {
        *self.0.lock().map_err(|_| Poisoned)? = Some(reservation);
        Ok(())
    }
}
