//! One endpoint of a cluster at run time: its connection pool and the state balancers and health
//! checking read. The state outlives config updates: a new cluster built for the same address
//! takes the old state over, so an update never resets ejections or load figures.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::pool::EndpointPool;

/// Latency assumed for an endpoint before its first response (Linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);

#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub pool: Arc<EndpointPool>,
    pub state: Arc<EndpointState>,
}

#[derive(Debug)]
pub struct EndpointState {
    /// Requests (HTTP) or connections (TCP) in flight.
    active: AtomicU32,
    ewma: Ewma,
    /// Verdict of active health checking; true when the cluster has no health check.
    pub(super) healthy: AtomicBool,
    pub(super) check_passes: AtomicU32,
    pub(super) check_failures: AtomicU32,
    /// Milliseconds since [`clock_origin`] until which the endpoint is ejected (0: not ejected).
    pub(super) ejected_until_ms: AtomicU64,
    pub(super) ejections: AtomicU32,
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_gateway: AtomicU32,
    /// Requests sent that have had no response head yet.
    awaiting: AtomicU32,
    /// Milliseconds since [`now_ms`] since which the endpoint has owed an answer and given
    /// none (0: nothing awaited). Moved forward by every response head, so it is the start of
    /// the oldest request still waiting, or of the last answer if that is later.
    waiting_since_ms: AtomicU64,
    /// When a stall was last acted upon, so an endpoint that cannot be ejected is not rescanned
    /// on every pick.
    pub(super) stall_checked_ms: AtomicU64,
}

/// An endpoint counts as stalled when it has given no answer for this many times its latency
/// estimate...
const STALL_LATENCIES: f64 = 10.0;
/// ...and for at least this long, so that fast endpoints are not judged on a hiccup.
pub const STALL_MIN_MS: u64 = 1000;
/// A single unanswered request (a long poll, a tunnel) is no sign of a hang; a hung endpoint
/// under load collects many.
const STALL_MIN_AWAITING: u32 = 2;

/// The latency estimate, in atomics so that picks and observations take no lock.
#[derive(Debug)]
struct Ewma {
    /// Estimated latency in nanoseconds, as `f64` bits. Only ever replaced by compare-and-swap
    /// against the value the update was computed from, so concurrent observations are applied
    /// one after the other, as under a lock.
    cost_ns: AtomicU64,
    /// When `cost_ns` was last observed, in nanoseconds of [`now_ns`]; 0: never.
    stamp_ns: AtomicU64,
}

impl Ewma {
    fn cost(&self) -> f64 {
        f64::from_bits(self.cost_ns.load(Ordering::Acquire))
    }
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            active: AtomicU32::new(0),
            ewma: Ewma {
                cost_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
                stamp_ns: AtomicU64::new(0),
            },
            healthy: AtomicBool::new(true),
            check_passes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            awaiting: AtomicU32::new(0),
            waiting_since_ms: AtomicU64::new(0),
            stall_checked_ms: AtomicU64::new(0),
        }
    }
}

/// A process-wide origin so instants fit in an atomic as milliseconds.
pub fn now_ms() -> u64 {
    // +1 so that 0 keeps meaning "never ejected".
    since_origin().as_millis() as u64 + 1
}

/// Like [`now_ms`], in nanoseconds (+1, so that 0 can mean "never").
fn now_ns() -> u64 {
    since_origin().as_nanos() as u64 + 1
}

fn since_origin() -> Duration {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(origin)
}

impl EndpointState {
    /// Whether new traffic may go here: passing health checks and not ejected.
    pub fn available(&self, now_ms: u64) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// How many times outlier detection has ejected this endpoint.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request or connection in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        // Start the stall clock unless it runs already. Racing with the last answer may leave it
        // at 0 for a moment; the next request starts it again.
        let _ = self.waiting_since_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        InFlight {
            state: self.clone(),
            started: Instant::now(),
            answered: AtomicBool::new(false),
        }
    }

    /// Requests sent that have had no response head yet.
    pub fn awaiting(&self) -> u32 {
        self.awaiting.load(Ordering::Relaxed)
    }

    /// How long the endpoint has owed an answer without giving any, in milliseconds (0 when
    /// nothing is awaited).
    pub fn stalled_for_ms(&self, now_ms: u64) -> u64 {
        match self.waiting_since_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => now_ms.saturating_sub(since),
        }
    }

    /// Whether the endpoint looks hung: several requests wait on it and it has answered none for
    /// far longer than its latency estimate. No response means peak-EWMA learns nothing and
    /// outlier detection sees no failure, so this is what notices a process that stopped
    /// answering with its sockets open. The cheap atomic test comes first; the estimate is read
    /// only for an endpoint already silent for [`STALL_MIN_MS`].
    pub fn is_stalled(&self, now_ms: u64) -> bool {
        let silent = self.stalled_for_ms(now_ms);
        if silent <= STALL_MIN_MS || self.awaiting() < STALL_MIN_AWAITING {
            return false;
        }
        let latency_ms = self.latency_estimate().as_secs_f64() * 1000.0;
        silent as f64 > latency_ms * STALL_LATENCIES
    }

    /// The latest latency estimate, undecayed: an endpoint known to be slow keeps a long
    /// allowance while it stays silent.
    fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(self.ewma.cost() as u64)
    }

    /// A request stopped waiting: with an answer (progress: the stall clock restarts) or
    /// without one (given up: the clock keeps running unless nothing is left waiting).
    fn stop_waiting(&self, answered: bool) {
        if self.awaiting.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.waiting_since_ms.store(0, Ordering::Relaxed);
        } else if answered {
            self.waiting_since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Peak-EWMA cost: estimated latency × (requests in flight + 1).
    pub fn ewma_cost(&self, decay: Duration) -> f64 {
        // The stamp first: an observation stores its cost before its stamp, so a cost read
        // after a stamp is at least as new (at worst it decays from a slightly older stamp).
        let stamp = self.ewma.stamp_ns.load(Ordering::Acquire);
        let cost_ns = self.ewma.cost();
        // Without fresh observations the estimate decays towards the default, so an endpoint
        // that was slow once is tried again eventually.
        let cost = if stamp != 0 {
            let age = now_ns().saturating_sub(stamp) as f64;
            let w = (-age / decay.as_nanos() as f64).exp();
            cost_ns * w + DEFAULT_RTT.as_nanos() as f64 * (1.0 - w)
        } else {
            cost_ns
        };
        cost * (f64::from(self.active()) + 1.0)
    }

    fn observe_rtt(&self, rtt: Duration, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = now_ns();
        let ewma = &self.ewma;
        let mut current = ewma.cost_ns.load(Ordering::Acquire);
        loop {
            let stamp = ewma.stamp_ns.load(Ordering::Acquire);
            let cost_ns = f64::from_bits(current);
            let next = if stamp == 0 || rtt > cost_ns {
                // Peak: a slower observation takes effect at once.
                rtt
            } else {
                let age = now.saturating_sub(stamp) as f64;
                let w = (-age / decay.as_nanos() as f64).exp();
                cost_ns * w + rtt * (1.0 - w)
            };
            match ewma.cost_ns.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        // Never moved back by an observation that started earlier but finished later.
        ewma.stamp_ns.fetch_max(now, Ordering::AcqRel);
    }
}

/// A request or connection in flight on an endpoint.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
    started: Instant,
    /// Whether the response head arrived (the request no longer counts as awaited).
    answered: AtomicBool,
}

impl InFlight {
    /// Records the time to the response head for latency-aware balancing and stall detection.
    pub fn record_rtt(&self, decay: Duration) {
        self.state.observe_rtt(self.started.elapsed(), decay);
        self.answered();
    }

    /// The response head arrived (or a tunnel was established): the endpoint answers. A request
    /// that ends without this call counts as unanswered until it ends.
    pub fn answered(&self) {
        if !self.answered.swap(true, Ordering::Relaxed) {
            self.state.stop_waiting(true);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
        if !*self.answered.get_mut() {
            self.state.stop_waiting(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_with_requests_waiting_is_a_stall() {
        let s = Arc::new(EndpointState::default());
        let now = now_ms();
        let first = s.start();
        assert!(
            !s.is_stalled(now + 60_000),
            "one unanswered request (a long poll, a tunnel) is no hang"
        );
        let second = s.start();
        assert_eq!(s.awaiting(), 2);
        assert!(!s.is_stalled(now + STALL_MIN_MS), "not before the minimum");
        assert!(s.is_stalled(now + STALL_MIN_MS + 50));

        // An answer is progress: the clock restarts from it.
        second.record_rtt(Duration::from_secs(10));
        assert_eq!(s.awaiting(), 1);
        let third = s.start();
        assert!(!s.is_stalled(now_ms() + STALL_MIN_MS / 2));

        // Giving up on a request is no progress; nothing left waiting stops the clock.
        drop(first);
        drop(third);
        assert_eq!(s.awaiting(), 0);
        assert_eq!(s.stalled_for_ms(now + 60_000), 0);
        assert_eq!(
            s.active(),
            1,
            "the answered request is in flight until its body ends"
        );
        drop(second);
        assert_eq!(s.active(), 0);
    }

    #[test]
    fn observations_from_many_threads_all_count() {
        // Each thread's observations grow, so the estimate must end at (about) the slowest of
        // all: an update lost to a race would leave it at a faster one.
        let s = Arc::new(EndpointState::default());
        // A decay long enough that blending is negligible even if a loaded machine spreads the
        // observations over a second (weight about age / decay): only lost updates show.
        let decay = Duration::from_secs(100_000);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..2_000u64 {
                        s.observe_rtt(Duration::from_micros(40_000 + i * 4 + t), decay);
                    }
                });
            }
        });
        let slowest = Duration::from_micros(40_000 + 1_999 * 4 + 3).as_nanos() as f64;
        let estimate = s.latency_estimate().as_nanos() as f64;
        assert!(
            (estimate - slowest).abs() < 1_000.0,
            "{estimate} vs {slowest}"
        );
        assert!(s.ewma.stamp_ns.load(Ordering::Relaxed) != 0);
    }

    #[test]
    fn a_faster_observation_blends_and_the_estimate_decays() {
        let s = EndpointState::default();
        let decay = Duration::from_secs(10);
        assert_eq!(s.latency_estimate(), DEFAULT_RTT, "before any observation");
        assert_eq!(s.ewma_cost(decay), DEFAULT_RTT.as_nanos() as f64);
        s.observe_rtt(Duration::from_millis(100), decay);
        assert_eq!(
            s.latency_estimate(),
            Duration::from_millis(100),
            "a peak at once"
        );
        s.observe_rtt(Duration::from_millis(1), decay);
        let blended = s.latency_estimate();
        assert!(
            blended > Duration::from_millis(99),
            "right after, the old estimate dominates: {blended:?}"
        );
        let cost = s.ewma_cost(decay);
        assert!(cost < 100e6 && cost > DEFAULT_RTT.as_nanos() as f64);
    }

    #[test]
    fn a_slow_endpoint_gets_ten_times_its_latency() {
        let s = Arc::new(EndpointState::default());
        s.observe_rtt(Duration::from_millis(500), Duration::from_secs(10));
        let now = now_ms();
        let _waiting = [s.start(), s.start()];
        assert!(!s.is_stalled(now + 4_000), "within 10 × 500 ms");
        assert!(s.is_stalled(now + 5_100));
    }
}
