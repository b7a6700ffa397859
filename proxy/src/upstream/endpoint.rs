//! One endpoint of a cluster at run time: its connection pool and the state balancers and health
//! checking read. The state outlives config updates: a new cluster built for the same address
//! takes the old state over, so an update never resets ejections or load figures.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
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
    ewma: Mutex<Ewma>,
    /// Verdict of active health checking; true when the cluster has no health check.
    pub(super) healthy: AtomicBool,
    pub(super) check_passes: AtomicU32,
    pub(super) check_failures: AtomicU32,
    /// Milliseconds since [`clock_origin`] until which the endpoint is ejected (0: not ejected).
    pub(super) ejected_until_ms: AtomicU64,
    pub(super) ejections: AtomicU32,
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_gateway: AtomicU32,
}

#[derive(Debug)]
struct Ewma {
    /// Estimated latency, in nanoseconds.
    cost_ns: f64,
    stamp: Instant,
    observed: bool,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            active: AtomicU32::new(0),
            ewma: Mutex::new(Ewma {
                cost_ns: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
                observed: false,
            }),
            healthy: AtomicBool::new(true),
            check_passes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
        }
    }
}

/// A process-wide origin so instants fit in an atomic as milliseconds.
pub fn now_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    // +1 so that 0 keeps meaning "never ejected".
    Instant::now().saturating_duration_since(origin).as_millis() as u64 + 1
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
        InFlight {
            state: self.clone(),
            started: Instant::now(),
        }
    }

    /// Peak-EWMA cost: estimated latency × (requests in flight + 1).
    pub fn ewma_cost(&self, decay: Duration) -> f64 {
        let ewma = self.ewma.lock().unwrap_or_else(PoisonError::into_inner);
        // Without fresh observations the estimate decays towards the default, so an endpoint
        // that was slow once is tried again eventually.
        let cost = if ewma.observed {
            let age = ewma.stamp.elapsed().as_nanos() as f64;
            let w = (-age / decay.as_nanos() as f64).exp();
            ewma.cost_ns * w + DEFAULT_RTT.as_nanos() as f64 * (1.0 - w)
        } else {
            ewma.cost_ns
        };
        cost * (f64::from(self.active()) + 1.0)
    }

    fn observe_rtt(&self, rtt: Duration, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let mut ewma = self.ewma.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if !ewma.observed || rtt > ewma.cost_ns {
            // Peak: a slower observation takes effect at once.
            ewma.cost_ns = rtt;
        } else {
            let age = now.saturating_duration_since(ewma.stamp).as_nanos() as f64;
            let w = (-age / decay.as_nanos() as f64).exp();
            ewma.cost_ns = ewma.cost_ns * w + rtt * (1.0 - w);
        }
        ewma.stamp = now;
        ewma.observed = true;
    }
}

/// A request or connection in flight on an endpoint.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
    started: Instant,
}

impl InFlight {
    /// Records the time to the response head for latency-aware balancing.
    pub fn record_rtt(&self, decay: Duration) {
        self.state.observe_rtt(self.started.elapsed(), decay);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}
