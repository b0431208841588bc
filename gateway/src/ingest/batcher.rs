//! The ingest shell's policy, as plain state (time passed in, ms on any monotonic origin), so
//! it is tested in virtual time while the shell only waits, reads and commits:
//!
//! - [`Batcher`]: when a batch closes — at `batch_max` messages, `batch_max_ms` after its
//!   first one, or at once when something urgent is in it (a case, an update, an SOS: those
//!   are committed and delivered without waiting for the batch to fill) — and which messages
//!   it holds for acknowledgement, in arrival order, until its commit is durable. A commit
//!   that fails keeps them held: nothing of a batch is acknowledged before all of it is.
//!   A closed batch is *sealed* while it commits, and the next one opens at once: the next
//!   batch is decided while the last one is written (two in flight at most, the shell awaits
//!   the older commit before it starts the next), and acknowledgements leave batch by batch in
//!   arrival order.
//! - [`CommitRetry`]: how long to wait before committing a held batch again after a failure
//!   that may pass (a full disk): a second, doubling to five.
//! - [`Every`]: the periodic work — looking for operators' requests and registry changes,
//!   pruning embedded telemetry.

use std::collections::VecDeque;

/// Why a batch closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// It holds `batch_max` messages.
    Full,
    /// Something in it is urgent.
    Urgent,
    /// `batch_max_ms` passed since its first message.
    Waited,
}

/// What to do after a message was handled into the open batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Take more messages, but commit by this time at the latest.
    TakeMoreUntil(i64),
    /// Commit now.
    Commit(Close),
}

/// The batching and acknowledgement policy; `T` is what an acknowledgement needs (the MQTT
/// message).
#[derive(Debug)]
pub struct Batcher<T> {
    max: usize,
    max_wait_ms: i64,
    /// When the open batch's first message arrived.
    opened_ms: Option<i64>,
    /// Messages handled and not yet acknowledged, in arrival order: the sealed batches'
    /// (committing, or held while a commit is retried), then the open batch's.
    held: VecDeque<T>,
    /// How many of `held` each sealed batch has, oldest first.
    sealed: VecDeque<usize>,
    /// How many of `held` the open batch has (the last ones).
    open: usize,
}

impl<T> Batcher<T> {
    /// Batches of at most `max` messages, waiting at most `max_wait_ms` for them.
    pub fn new(max: usize, max_wait_ms: u64) -> Self {
        Batcher {
            max: max.max(1),
            max_wait_ms: i64::try_from(max_wait_ms).unwrap_or(i64::MAX),
            opened_ms: None,
            held: VecDeque::with_capacity(max.max(1)),
            sealed: VecDeque::with_capacity(2),
            open: 0,
        }
    }

    /// A message was handled into the batch at `now_ms` (`urgent`: the batch now holds
    /// something that must not wait). It is held for acknowledgement.
    pub fn handled(&mut self, now_ms: i64, message: T, urgent: bool) -> Next {
        let opened = *self.opened_ms.get_or_insert(now_ms);
        self.held.push_back(message);
        self.open += 1;
        if self.open >= self.max {
            Next::Commit(Close::Full)
        } else if urgent {
            Next::Commit(Close::Urgent)
        } else {
            let until = opened.saturating_add(self.max_wait_ms);
            if now_ms >= until { Next::Commit(Close::Waited) } else { Next::TakeMoreUntil(until) }
        }
    }

    /// When the open batch must close at the latest (none while it is empty).
    pub fn deadline(&self) -> Option<i64> {
        self.opened_ms.map(|o| o.saturating_add(self.max_wait_ms))
    }

    /// Messages held for acknowledgement (sealed and open batches).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Messages in the open batch.
    pub const fn open(&self) -> usize {
        self.open
    }

    /// Batches sealed and not yet durable.
    pub fn sealed(&self) -> usize {
        self.sealed.len()
    }

    /// The open batch closed and goes to its commit; the next message opens a new batch.
    pub fn seal(&mut self) {
        self.sealed.push_back(self.open);
        self.open = 0;
        self.opened_ms = None;
    }

    /// Every message held is given up (the store refused a batch: what was decided after it
    /// rests on it too): none is acknowledged, the broker sends them again. Returns how many.
    pub fn discard_all(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        self.sealed.clear();
        self.open = 0;
        self.opened_ms = None;
        n
    }

    /// The oldest sealed batch is durable: its messages, to acknowledge in the order they
    /// arrived (none when nothing is sealed).
    pub fn committed(&mut self) -> std::collections::vec_deque::Drain<'_, T> {
        let n = self.sealed.pop_front().unwrap_or(0);
        self.held.drain(..n)
    }
}

/// The wait before committing a held batch again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRetry {
    failures: u32,
}

impl Default for CommitRetry {
    fn default() -> Self {
        Self::new()
    }
}

impl CommitRetry {
    /// The first wait.
    pub const FIRST_MS: u64 = 1_000;
    /// The longest wait.
    pub const MAX_MS: u64 = 5_000;

    /// No failure yet.
    pub const fn new() -> Self {
        CommitRetry { failures: 0 }
    }

    /// A commit failed (in a way that may pass): how long to wait before the next attempt.
    pub fn failed(&mut self) -> u64 {
        let wait = Self::FIRST_MS.saturating_mul(1 << self.failures.min(8)).min(Self::MAX_MS);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// Failures in a row so far.
    pub const fn failures(&self) -> u32 {
        self.failures
    }
}

/// Periodic work: due every `period_ms`, first at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    period_ms: i64,
    next_ms: Option<i64>,
}

impl Every {
    /// Every `period_ms`.
    pub fn new(period_ms: u64) -> Self {
        Every { period_ms: i64::try_from(period_ms).unwrap_or(i64::MAX), next_ms: None }
    }

    /// Whether it is due at `now_ms`; when it is, the next time is a period on.
    pub fn due(&mut self, now_ms: i64) -> bool {
        if self.next_ms.is_some_and(|next| now_ms < next) {
            return false;
        }
        self.next_ms = Some(now_ms.saturating_add(self.period_ms));
        true
    }

    /// Due at once (a cue to look sooner), then a period on from then.
    pub fn now(&mut self) {
        self.next_ms = None;
    }

    /// When it is next due (`None`: at once).
    pub const fn next(&self) -> Option<i64> {
        self.next_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_closes_when_full_when_urgent_or_when_its_first_message_waited_long_enough() {
        let mut b = Batcher::new(3, 20);
        assert_eq!(b.handled(100, 'a', false), Next::TakeMoreUntil(120));
        assert_eq!(b.handled(105, 'b', false), Next::TakeMoreUntil(120), "the first one's wait");
        assert_eq!(b.handled(110, 'c', false), Next::Commit(Close::Full));
        b.seal();
        assert_eq!(b.committed().collect::<String>(), "abc");
        // A new batch opens with the next message; an urgent one closes it at once.
        assert_eq!(b.handled(200, 'd', false), Next::TakeMoreUntil(220));
        assert_eq!(b.handled(201, 'e', true), Next::Commit(Close::Urgent));
        b.seal();
        assert_eq!(b.committed().collect::<String>(), "de");
        // A message that arrives after the wait is over closes the batch it joins.
        assert_eq!(b.handled(300, 'f', false), Next::TakeMoreUntil(320));
        assert_eq!(b.handled(325, 'g', false), Next::Commit(Close::Waited));
        b.seal();
        assert_eq!(b.committed().count(), 2);
    }

    #[test]
    fn nothing_is_acknowledged_before_the_commit_and_then_in_arrival_order() {
        let mut b = Batcher::new(10, 20);
        for (t, m) in [(0, 1), (1, 2), (2, 3)] {
            b.handled(t, m, false);
        }
        b.seal();
        // The commit fails (a full disk): the batch stays held; retried, it still holds all
        // three, and only its success releases them, in order.
        let mut retry = CommitRetry::new();
        let waits: Vec<u64> = (0..5).map(|_| retry.failed()).collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(b.held(), 3);
        assert_eq!(b.committed().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn the_next_batch_fills_while_the_last_commits_and_acks_leave_batch_by_batch() {
        let mut b = Batcher::new(2, 20);
        b.handled(0, 1, false);
        assert_eq!(b.handled(1, 2, false), Next::Commit(Close::Full));
        b.seal();
        // While [1, 2] commits, the next batch opens with its own wait and its own size.
        assert_eq!(b.handled(5, 3, false), Next::TakeMoreUntil(25), "a new batch's wait");
        assert_eq!((b.open(), b.sealed(), b.held()), (1, 1, 3));
        assert_eq!(b.handled(6, 4, false), Next::Commit(Close::Full), "full at two of its own");
        // Nothing of the open batch leaves with the sealed one.
        assert_eq!(b.committed().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b.committed().count(), 0, "the open batch is not durable");
        b.seal();
        assert_eq!(b.committed().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn periodic_work_is_due_at_once_then_every_period() {
        let mut poll = Every::new(1_000);
        assert!(poll.due(50));
        assert!(!poll.due(1_049));
        assert!(poll.due(1_050));
        assert_eq!(poll.next(), Some(2_050));
        // Late (the task was busy): due once, then a period from then.
        assert!(poll.due(9_000));
        assert!(!poll.due(9_500));
        // Woken (a registry change was announced): due at once, then a period from then.
        poll.now();
        assert!(poll.due(9_600));
        assert!(!poll.due(10_599));
        assert!(poll.due(10_600));
    }
}
