//! A cluster's circuit breakers and retry budget. The counts live as long as the cluster's name
//! (they carry over across config updates); the limits are those of the config in force.

use std::{
    pin::pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
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
        let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        if b.settings.is_some() {
            let slot = b.advance(now_ms() / 1000);
            b.requests[slot] += 1;
        }
    }

    /// Whether the budget has room for one more retry (and spends it). Without a budget, yes.
    pub fn withdraw(&self) -> bool {
        let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(settings) = b.settings else {
            return true;
        };
        let slot = b.advance(now_ms() / 1000);
        let window = (settings.window.as_secs() as usize).clamp(1, BUDGET_SLOTS);
        let slots = (0..window).map(|back| (slot + BUDGET_SLOTS - back) % BUDGET_SLOTS);
        let (requests, retries) = slots.fold((0u64, 0u64), |(q, r), i| {
            (q + u64::from(b.requests[i]), r + u64::from(b.retries[i]))
        });
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

/// Requests and retries per second over the last [`BUDGET_SLOTS`] seconds.
#[derive(Debug)]
struct Budget {
    settings: Option<RetryBudget>,
    /// The second that `requests[second % BUDGET_SLOTS]` counts.
    second: u64,
    requests: [u32; BUDGET_SLOTS],
    retries: [u32; BUDGET_SLOTS],
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            settings: None,
            second: 0,
            requests: [0; BUDGET_SLOTS],
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
                self.requests[i] = 0;
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
        b.requests[s] = 7;
        let later = b.advance(100 + BUDGET_SLOTS as u64);
        assert_eq!(later, s, "same slot a full window later");
        assert_eq!(b.requests[later], 0, "and cleared");
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
