//! A cluster's circuit breakers and retry budget. The counts live as long as the cluster's name
//! (they carry over across config updates); the limits are those of the config in force.

use std::{
    pin::pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

use super::endpoint::now_ms;
use crate::config::model::{CircuitBreakers, RetryBudget};

/// Seconds of history a budget can look back on (the largest `window` accepted).
const BUDGET_SLOTS: usize = 60;

#[derive(Debug)]
pub struct Breakers {
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
    max_connections: AtomicU32,
    max_pending: AtomicU32,
    max_requests: AtomicU32,
    max_retries: AtomicU32,
    /// A connection closed or went idle while requests wait for one.
    freed: Notify,
    /// Whether a retry budget is configured: without one, [`deposit`](Self::deposit) does
    /// nothing.
    budget_on: AtomicBool,
    /// Original requests per second, for the budget: slot `second % BUDGET_SLOTS` holds the
    /// second it counts (high 32 bits) and the count (low 32). Atomic, so counting the request
    /// on every request's path takes no lock.
    budget_requests: [AtomicU64; BUDGET_SLOTS],
    /// Settings and retries spent: only a retry takes this lock.
    budget: Mutex<Budget>,
}

/// Which limit turned a request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Pending,
    Requests,
    Retries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Pending => "max_pending_requests",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }
}

impl Breakers {
    pub fn new(limits: &CircuitBreakers, budget: Option<RetryBudget>) -> Arc<Self> {
        let b = Arc::new(Breakers {
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            max_connections: AtomicU32::new(0),
            max_pending: AtomicU32::new(0),
            max_requests: AtomicU32::new(0),
            max_retries: AtomicU32::new(0),
            freed: Notify::new(),
            budget_on: AtomicBool::new(false),
            budget_requests: [const { AtomicU64::new(0) }; BUDGET_SLOTS],
            budget: Mutex::new(Budget::default()),
        });
        b.configure(limits, budget);
        b
    }

    /// Takes the limits of a new config; counts are kept.
    pub fn configure(&self, limits: &CircuitBreakers, budget: Option<RetryBudget>) {
        self.max_connections
            .store(limits.max_connections, Ordering::Relaxed);
        self.max_pending
            .store(limits.max_pending_requests, Ordering::Relaxed);
        self.max_requests
            .store(limits.max_requests, Ordering::Relaxed);
        self.max_retries
            .store(limits.max_retries, Ordering::Relaxed);
        self.budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .settings = budget;
        self.budget_on.store(budget.is_some(), Ordering::Relaxed);
        // Waiters re-check against the new limits.
        self.freed.notify_waiters();
    }

    /// Counts a request as active until the guard drops; `None` beyond `max_requests`.
    pub fn try_request(self: &Arc<Self>) -> Option<ActiveRequest> {
        take(&self.requests, &self.max_requests).then(|| ActiveRequest(self.clone()))
    }

    /// Counts a retry as active until the guard drops; `None` beyond `max_retries`.
    pub fn try_retry(self: &Arc<Self>) -> Option<ActiveRetry> {
        take(&self.retries, &self.max_retries).then(|| ActiveRetry(self.clone()))
    }

    /// A slot for a new upstream connection. Beyond `max_connections` the request waits (as one
    /// of at most `max_pending_requests`) until a connection closes, or until `idle` says a
    /// pooled connection is free to use instead (`Ok(None)`).
    pub async fn connection(
        self: &Arc<Self>,
        mut idle: impl FnMut() -> bool,
    ) -> Result<Option<ConnectionSlot>, Limit> {
        if take(&self.connections, &self.max_connections) {
            return Ok(Some(ConnectionSlot(self.clone())));
        }
        if !take(&self.pending, &self.max_pending) {
            return Err(Limit::Pending);
        }
        let _pending = Pending(self);
        loop {
            let mut freed = pin!(self.freed.notified());
            freed.as_mut().enable();
            if take(&self.connections, &self.max_connections) {
                return Ok(Some(ConnectionSlot(self.clone())));
            }
            if idle() {
                return Ok(None);
            }
            freed.await;
        }
    }

    /// A slot for a connection that cannot be shared (HTTP/2, upgrades): waits like
    /// [`connection`](Self::connection) but only for a slot.
    pub async fn connection_slot(self: &Arc<Self>) -> Result<ConnectionSlot, Limit> {
        match self.connection(|| false).await {
            Ok(Some(slot)) => Ok(slot),
            // `idle` never says yes, so this does not happen; count it as waiting too long.
            Ok(None) => Err(Limit::Pending),
            Err(limit) => Err(limit),
        }
    }

    /// A pooled connection went idle: a waiting request may be able to use it.
    pub fn connection_idle(&self) {
        if self.pending.load(Ordering::Relaxed) > 0 {
            self.freed.notify_waiters();
        }
    }

    pub fn open_connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn active_requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn pending_requests(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn active_retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Counts an original request towards the retry budget.
    pub fn deposit(&self) {
        if self.budget_on.load(Ordering::Relaxed) {
            self.deposit_at(budget_second());
        }
    }

    fn deposit_at(&self, second: u32) {
        let slot = &self.budget_requests[second as usize % BUDGET_SLOTS];
        // A slot still holding an older second starts over at 1. One holding a later second
        // (another thread moved on a whole window while this one was between its clock read
        // and here) keeps its count: this request is outside every window that slot serves.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            let (at, n) = unpack(v);
            match at.cmp(&second) {
                std::cmp::Ordering::Equal => Some(pack(second, n.saturating_add(1))),
                std::cmp::Ordering::Less => Some(pack(second, 1)),
                std::cmp::Ordering::Greater => None,
            }
        });
    }

    /// Whether the budget has room for one more retry (and spends it). Without a budget, yes.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(budget_second())
    }

    fn withdraw_at(&self, second: u32) -> bool {
        let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(settings) = b.settings else {
            return true;
        };
        let slot = b.advance(u64::from(second));
        let window = (settings.window.as_secs() as usize).clamp(1, BUDGET_SLOTS);
        let slots = (0..window).map(|back| (slot + BUDGET_SLOTS - back) % BUDGET_SLOTS);
        let retries: u64 = slots.map(|i| u64::from(b.retries[i])).sum();
        let requests: u64 = (0..window as u32)
            .filter_map(|back| second.checked_sub(back))
            .map(|s| {
                let (at, n) =
                    unpack(self.budget_requests[s as usize % BUDGET_SLOTS].load(Ordering::Relaxed));
                if at == s { u64::from(n) } else { 0 }
            })
            .sum();
        let allowed = f64::from(settings.min_retries_per_second) * window as f64
            + settings.ratio * requests as f64;
        if (retries as f64) < allowed.floor() {
            b.retries[slot] += 1;
            true
        } else {
            false
        }
    }
}

/// The budget's clock: whole seconds since the process's clock origin (a u32 lasts 136 years).
fn budget_second() -> u32 {
    (now_ms() / 1000) as u32
}

fn pack(second: u32, count: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(count)
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

fn take(count: &AtomicU32, max: &AtomicU32) -> bool {
    let max = max.load(Ordering::Relaxed);
    count
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

#[derive(Debug)]
pub struct ActiveRequest(Arc<Breakers>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct ActiveRetry(Arc<Breakers>);

impl Drop for ActiveRetry {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open upstream connection; the slot frees when the connection's task ends.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Breakers>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

struct Pending<'a>(&'a Breakers);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Retries per second over the last [`BUDGET_SLOTS`] seconds (the requests are counted in
/// [`Breakers::budget_requests`]).
#[derive(Debug)]
struct Budget {
    settings: Option<RetryBudget>,
    /// The second that `retries[second % BUDGET_SLOTS]` counts.
    second: u64,
    retries: [u32; BUDGET_SLOTS],
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            settings: None,
            second: 0,
            retries: [0; BUDGET_SLOTS],
        }
    }
}

impl Budget {
    /// Moves to `second`, clearing the slots of the seconds passed; returns its slot.
    fn advance(&mut self, second: u64) -> usize {
        if second > self.second {
            let passed = (second - self.second).min(BUDGET_SLOTS as u64);
            for s in 1..=passed {
                let i = ((self.second + s) % BUDGET_SLOTS as u64) as usize;
                self.retries[i] = 0;
            }
            self.second = second;
        }
        (self.second % BUDGET_SLOTS as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(n: u32) -> CircuitBreakers {
        CircuitBreakers {
            max_connections: n,
            max_pending_requests: n,
            max_requests: n,
            max_retries: n,
        }
    }

    #[test]
    fn budget_allows_ratio_plus_minimum() {
        let b = Breakers::new(
            &limits(10),
            Some(RetryBudget {
                ratio: 0.2,
                min_retries_per_second: 0,
                window: Duration::from_secs(10),
            }),
        );
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);

        let with_minimum = Breakers::new(
            &limits(10),
            Some(RetryBudget {
                ratio: 0.0,
                min_retries_per_second: 1,
                window: Duration::from_secs(5),
            }),
        );
        assert_eq!((0..100).filter(|_| with_minimum.withdraw()).count(), 5);
        let unlimited = Breakers::new(&limits(10), None);
        assert!((0..100).all(|_| unlimited.withdraw()));
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let mut b = Budget::default();
        let s = b.advance(100);
        b.retries[s] = 7;
        let later = b.advance(100 + BUDGET_SLOTS as u64);
        assert_eq!(later, s, "same slot a full window later");
        assert_eq!(b.retries[later], 0, "and cleared");
    }

    fn budget(ratio: f64) -> Arc<Breakers> {
        Breakers::new(
            &limits(10),
            Some(RetryBudget {
                ratio,
                min_retries_per_second: 0,
                window: Duration::from_secs(10),
            }),
        )
    }

    #[test]
    fn requests_counted_from_many_threads_are_all_counted() {
        let b = budget(0.5);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| (0..10_000).for_each(|_| b.deposit_at(1_000)));
            }
        });
        let granted = (0..30_000).filter(|_| b.withdraw_at(1_000)).count();
        assert_eq!(granted, 20_000, "half of 40,000 requests, none lost");
    }

    #[test]
    fn request_counts_leave_the_window() {
        let b = budget(1.0);
        (0..10).for_each(|_| b.deposit_at(1_000));
        assert!(b.withdraw_at(1_009), "still inside the 10 s window");
        assert!(!b.withdraw_at(1_010), "a second later, out of it");
        // Same slot a whole ring later: the old count is replaced, not added to.
        b.deposit_at(1_000 + BUDGET_SLOTS as u32);
        assert!(b.withdraw_at(1_000 + BUDGET_SLOTS as u32));
        assert!(!b.withdraw_at(1_000 + BUDGET_SLOTS as u32));
        // A request counted late for a second whose slot has moved on is dropped, and leaves
        // the newer count alone.
        b.deposit_at(1_000);
        let (at, n) = unpack(b.budget_requests[1_000 % BUDGET_SLOTS].load(Ordering::Relaxed));
        assert_eq!((at, n), (1_000 + BUDGET_SLOTS as u32, 1));
    }

    #[test]
    fn request_and_retry_limits() {
        let b = Breakers::new(&limits(2), None);
        let one = b.try_request().unwrap();
        let _two = b.try_request().unwrap();
        assert!(b.try_request().is_none());
        drop(one);
        assert!(b.try_request().is_some());
        let _r1 = b.try_retry().unwrap();
        let _r2 = b.try_retry().unwrap();
        assert!(b.try_retry().is_none());
    }

    #[tokio::test]
    async fn connections_wait_then_overflow() {
        let b = Breakers::new(&limits(1), None);
        let slot = b.connection(|| false).await.unwrap().unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.connection(|| false).await }
        });
        // Wait for the first waiter to be pending, then a second one overflows.
        while b.pending.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.connection(|| false).await.unwrap_err(), Limit::Pending);
        drop(slot);
        let second = waiter.await.unwrap().unwrap();
        assert!(second.is_some());
        assert_eq!(b.open_connections(), 1);
    }
}
