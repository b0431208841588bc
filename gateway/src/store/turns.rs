//! Turns at writing one SQLite file, first come, first served, among this process's
//! connections to it.
//!
//! SQLite lets one connection write at a time, and a connection that finds the file locked
//! sleeps and retries ([`super::wait_for_lock`]). Under load the ingest task commits batch after
//! batch, and the lock is free only for the moment between two of them: a delivery worker
//! retrying every millisecond could then miss that moment again and again, and an alarm's case
//! waited seconds for its one `UPDATE` (measured: alarm → board p99 6,954 ms at 30,000
//! frames/s offered, with the case decided within 72 ms). A ticket queue makes the writers of
//! the process take turns in the order they asked: a writer waits for at most the writes
//! queued ahead of it. Other processes (the CLI) still meet the busy handler.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock, Weak},
};

/// The queue of one file's writers.
#[derive(Debug, Default)]
pub struct WriteTurns {
    /// (next ticket to hand out, ticket whose turn it is).
    tickets: Mutex<(u64, u64)>,
    turn: Condvar,
}

/// A writer's turn: held while it writes; the next in line goes when it is dropped.
#[derive(Debug)]
pub struct Turn(Arc<WriteTurns>);

impl WriteTurns {
    /// The queue shared by every connection of this process to `path` (made on first use;
    /// gone when no connection holds it).
    pub fn of(path: &Path) -> Arc<WriteTurns> {
        static FILES: OnceLock<Mutex<HashMap<PathBuf, Weak<WriteTurns>>>> = OnceLock::new();
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let files = FILES.get_or_init(Mutex::default);
        let mut files = files.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        files.retain(|_, w| w.strong_count() > 0);
        if let Some(turns) = files.get(&key).and_then(Weak::upgrade) {
            return turns;
        }
        let turns = Arc::new(WriteTurns::default());
        files.insert(key, Arc::downgrade(&turns));
        turns
    }

    /// Waits for this writer's turn, after every writer that asked before it.
    pub fn wait(self: &Arc<Self>) -> Turn {
        let mut t = self.tickets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = t.0;
        t.0 = t.0.wrapping_add(1);
        while t.1 != mine {
            t = self.turn.wait(t).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Turn(self.clone())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut t = self.0.tickets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        t.1 = t.1.wrapping_add(1);
        drop(t);
        self.0.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    // Test code: a panic is how a failure is reported.
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::sync::mpsc;

    use super::*;

    #[test]
    fn writers_take_turns_in_the_order_they_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let turns = WriteTurns::of(&path);
        assert!(Arc::ptr_eq(&turns, &WriteTurns::of(&path)), "one queue per file");
        let first = turns.wait();
        let (tx, rx) = mpsc::channel();
        let mut waiting = Vec::new();
        for n in 0..3 {
            let (queue, tx) = (turns.clone(), tx.clone());
            waiting.push(std::thread::spawn(move || {
                let _turn = queue.wait();
                tx.send(n).unwrap();
            }));
            // The next one asks only once this one holds its ticket.
            while turns.tickets.lock().unwrap().0 < n + 2 {
                std::thread::yield_now();
            }
        }
        assert!(rx.try_recv().is_err(), "nobody writes during another's turn");
        drop(first);
        for w in waiting {
            w.join().unwrap();
        }
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0, 1, 2]);
    }
}
