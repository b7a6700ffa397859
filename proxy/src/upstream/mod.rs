//! Upstream clusters at run time: endpoints with their pools and state, the balancer, passive
//! health (outlier ejection) and the panic threshold.

pub mod balancer;
pub mod breaker;
pub mod endpoint;
pub mod hash;
pub mod health;
pub mod pool;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    config::model::{self, HashKey, HealthCheck, OutlierDetection},
    identity::mtls::MeshTls,
    telemetry::ClusterMetrics,
    tls::client::ClientTls,
};

pub use balancer::Balancer;
pub use breaker::Breakers;
pub use endpoint::{Endpoint, EndpointState, InFlight};
pub use pool::{EndpointPool, MeshTarget, PoolSettings, UpstreamError};

/// Counters of a cluster; they survive config updates (kept by cluster name).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub connections_total: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Picks made while too few endpoints were available, across all endpoints.
    pub panic_picks: AtomicU64,
    pub ejections_total: AtomicU64,
}

/// A cluster ready to take requests or connections. Built at config-compile time.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    /// What it was built from; an update whose model is equal reuses this cluster as is.
    pub model: model::Cluster,
    pub protocol: model::UpstreamProtocol,
    pub connect_timeout: Duration,
    pub endpoints: Box<[Endpoint]>,
    pub health_check: Option<HealthCheck>,
    pub hash_key: Option<HashKey>,
    /// TLS to the endpoints, for requests and health checks; `None`: plain TCP.
    pub tls: Option<Arc<ClientTls>>,
    pub stats: Arc<ClusterStats>,
    /// Metric handles; like `stats`, carried over by cluster name.
    pub metrics: Arc<ClusterMetrics>,
    /// Circuit breaker counts and the retry budget; carried over by cluster name.
    pub breakers: Arc<Breakers>,
    balancer: Balancer,
    outlier: Option<OutlierDetection>,
    panic_threshold_percent: u8,
    /// `(valid_until_ms << 1) | in_panic`.
    panic_cache: AtomicU64,
}

/// How long a panic-mode verdict is reused; ejections expire lazily, so they take up to this long
/// to count.
const PANIC_CACHE_MS: u64 = 100;

/// Latency decay for clusters whose balancer does not set one (Linkerd's peak-EWMA default).
const DEFAULT_LATENCY_DECAY: Duration = Duration::from_secs(10);

/// How often a stalled endpoint is considered for ejection.
const STALL_CHECK_MS: u64 = 250;

/// How a request or connection went, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A response with this 5xx status.
    ServerError(u16),
    /// Refused, timed out or reset before a response: counts as a gateway error.
    ConnectFailure,
}

impl Cluster {
    /// Builds a cluster; with `mesh` (this proxy holds a workload identity) an endpoint that
    /// has an identity is reached over mesh mTLS, unless the cluster originates its own TLS.
    pub fn build(
        config: &model::Cluster,
        previous: Option<&Cluster>,
        mesh: Option<&Arc<MeshTls>>,
    ) -> Cluster {
        let old: HashMap<_, _> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.address, e)).collect())
            .unwrap_or_default();
        let breakers = match previous {
            Some(p) => {
                p.breakers
                    .configure(&config.circuit_breakers, config.retry_budget);
                p.breakers.clone()
            }
            None => Breakers::new(&config.circuit_breakers, config.retry_budget),
        };
        let tls = config.tls.as_ref().map(|t| {
            let tls = ClientTls::build(t, config.protocol);
            if let Some(e) = tls.error() {
                // Validation refuses such settings; kept failing rather than falling back.
                tracing::error!(cluster = %config.name, error = %e, "upstream TLS unusable");
            }
            Arc::new(tls)
        });
        let settings = PoolSettings {
            protocol: config.protocol,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            tls: tls.clone(),
            mesh: None,
        };
        let endpoints: Box<[Endpoint]> = config
            .endpoints
            .iter()
            .map(|e| {
                let prior = old.get(&e.address);
                let settings = match (&e.identity, mesh, &tls) {
                    (Some(expected), Some(mesh), None) => PoolSettings {
                        mesh: Some(MeshTarget {
                            tls: mesh.clone(),
                            expected: expected.clone(),
                        }),
                        ..settings.clone()
                    },
                    _ => settings.clone(),
                };
                let pool = prior
                    .filter(|p| p.pool.same_settings(&settings, &breakers))
                    .map(|p| p.pool.clone())
                    .unwrap_or_else(|| {
                        Arc::new(EndpointPool::new(e.address, settings, breakers.clone()))
                    });
                let state = prior.map(|p| p.state.clone()).unwrap_or_default();
                if config.health_check.is_none() {
                    // Without active checks nothing would ever mark it healthy again.
                    state.healthy.store(true, Ordering::Relaxed);
                }
                Endpoint {
                    address: e.address,
                    weight: e.weight,
                    pool,
                    state,
                }
            })
            .collect();
        let hash_key = match &config.lb {
            model::LbPolicy::RingHash { key, .. } | model::LbPolicy::Maglev { key, .. } => {
                Some(key.clone())
            }
            _ => None,
        };
        Cluster {
            name: config.name.clone(),
            model: config.clone(),
            protocol: config.protocol,
            connect_timeout: config.connect_timeout,
            balancer: Balancer::build(&config.lb, &endpoints, previous.map(|p| &p.balancer)),
            endpoints,
            health_check: config.health_check.clone(),
            hash_key,
            tls,
            stats: previous.map(|p| p.stats.clone()).unwrap_or_default(),
            metrics: previous
                .map(|p| p.metrics.clone())
                .unwrap_or_else(|| Arc::new(ClusterMetrics::new(&config.name))),
            breakers,
            outlier: config.outlier_detection.clone(),
            panic_threshold_percent: config.panic_threshold_percent,
            panic_cache: AtomicU64::new(0),
        }
    }

    /// The endpoint for the next request or connection, or `None` when none can take it.
    ///
    /// Available endpoints (healthy, not ejected) are preferred. When fewer than the panic
    /// threshold's share are available, or none at all, the balancer picks across all of them
    /// instead: sending to a possibly-bad endpoint beats failing everything. A threshold of 0
    /// turns that off.
    pub fn pick(&self, hash: Option<u64>) -> Option<&Endpoint> {
        self.pick_avoiding(hash, &[])
    }

    /// Like [`pick`](Self::pick), but an endpoint in `avoid` (those a request already failed on)
    /// is taken only when no other endpoint can be.
    ///
    /// A stalled endpoint (see [`EndpointState::is_stalled`]) is passed over while any other
    /// can take the request, and outlier detection ejects it; when every candidate looks
    /// stalled, the pick is made as if none did.
    pub fn pick_avoiding(&self, hash: Option<u64>, avoid: &[SocketAddr]) -> Option<&Endpoint> {
        self.pick_at(hash, avoid, endpoint::now_ms())
    }

    /// [`pick_avoiding`](Self::pick_avoiding) at the time `now` (milliseconds of
    /// [`endpoint::now_ms`]).
    fn pick_at(&self, hash: Option<u64>, avoid: &[SocketAddr], now: u64) -> Option<&Endpoint> {
        let stalled_seen = std::cell::Cell::new(None);
        let responsive = |i: usize| {
            let stalled = self.endpoints[i].state.is_stalled(now);
            if stalled && stalled_seen.get().is_none() {
                stalled_seen.set(Some(i));
            }
            !stalled
        };
        let picked = self.pick_among(hash, avoid, now, &responsive);
        if let Some(i) = stalled_seen.get() {
            self.stalled(&self.endpoints[i], now);
        }
        match picked {
            Some(e) => Some(e),
            None => self.pick_among(hash, avoid, now, &|_| true),
        }
    }

    /// One round of [`pick_avoiding`](Self::pick_avoiding) among the endpoints `also` accepts;
    /// `None` only when `also` rejected every candidate it was asked about, or nothing can be
    /// picked at all.
    fn pick_among(
        &self,
        hash: Option<u64>,
        avoid: &[SocketAddr],
        now: u64,
        also: &dyn Fn(usize) -> bool,
    ) -> Option<&Endpoint> {
        if !avoid.is_empty() {
            let fresh = |i: usize| {
                let e = &self.endpoints[i];
                e.state.available(now) && !avoid.contains(&e.address) && also(i)
            };
            if let Some(i) = self.balancer.pick(&self.endpoints, hash, &fresh) {
                return Some(&self.endpoints[i]);
            }
        }
        if !self.in_panic(now) {
            let available = |i: usize| self.endpoints[i].state.available(now) && also(i);
            if let Some(i) = self.balancer.pick(&self.endpoints, hash, &available) {
                return Some(&self.endpoints[i]);
            }
            if self.panic_threshold_percent == 0 {
                return None;
            }
        }
        let i = self.balancer.pick(&self.endpoints, hash, also)?;
        self.stats.panic_picks.fetch_add(1, Ordering::Relaxed);
        Some(&self.endpoints[i])
    }

    /// Whether too few endpoints are available. Counting is O(endpoints), so the answer is
    /// cached for [`PANIC_CACHE_MS`]; health changes clear the cache.
    fn in_panic(&self, now: u64) -> bool {
        if self.panic_threshold_percent == 0 || self.endpoints.is_empty() {
            return false;
        }
        let cached = self.panic_cache.load(Ordering::Relaxed);
        if cached >> 1 > now {
            return cached & 1 == 1;
        }
        let available = self
            .endpoints
            .iter()
            .filter(|e| e.state.available(now))
            .count();
        let panic =
            available * 100 < self.endpoints.len() * usize::from(self.panic_threshold_percent);
        self.panic_cache.store(
            ((now + PANIC_CACHE_MS) << 1) | u64::from(panic),
            Ordering::Relaxed,
        );
        panic
    }

    /// Call after an endpoint's health changed.
    pub fn health_changed(&self) {
        self.panic_cache.store(0, Ordering::Relaxed);
    }

    /// The latency decay for recording response times: the balancer's, or a default for
    /// policies that do not balance on latency, since stall detection reads the estimate (and
    /// needs each response head recorded) whatever the policy.
    pub fn ewma_decay(&self) -> Option<Duration> {
        Some(self.balancer.ewma_decay().unwrap_or(DEFAULT_LATENCY_DECAY))
    }

    /// Whether a try waiting on `endpoint` should move to another: the endpoint looks hung (see
    /// [`EndpointState::is_stalled`]), or was ejected and has stayed silent since (the last try
    /// still waiting on it no longer makes it look stalled), while some peer is not stalled and
    /// may take requests. When every endpoint is silent the slowness is the workload's, and
    /// tries keep waiting.
    pub fn stalled_while_peers_answer(&self, endpoint: &Endpoint) -> bool {
        let now = endpoint::now_ms();
        let s = &endpoint.state;
        let hung =
            s.is_stalled(now) || (s.is_ejected() && s.stalled_for_ms(now) > endpoint::STALL_MIN_MS);
        hung && self.endpoints.iter().any(|e| {
            e.address != endpoint.address && !e.state.is_stalled(now) && e.state.available(now)
        })
    }

    /// A stalled endpoint counts as failing for outlier detection: its silence stands for the
    /// run of failures that timing out would eventually report, ejecting it within about a
    /// second instead of after the route timeout. Not when its peers are stalled too (then the
    /// slowness is the workload's), and at most every [`STALL_CHECK_MS`] per endpoint.
    fn stalled(&self, endpoint: &Endpoint, now: u64) {
        let Some(od) = &self.outlier else {
            return;
        };
        let s = &endpoint.state;
        let checked = s.stall_checked_ms.load(Ordering::Relaxed);
        if checked + STALL_CHECK_MS > now
            || s.stall_checked_ms
                .compare_exchange(checked, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let peer_responsive = self
            .endpoints
            .iter()
            .any(|e| e.address != endpoint.address && !e.state.is_stalled(now));
        if peer_responsive {
            tracing::warn!(
                cluster = %self.name,
                endpoint = %endpoint.address,
                silent_ms = s.stalled_for_ms(now),
                awaiting = s.awaiting(),
                "endpoint stalled: no response to requests in flight"
            );
            self.eject(endpoint, od);
        }
    }

    /// Feeds passive health: consecutive failures eject an endpoint for a while.
    pub fn record(&self, endpoint: &Endpoint, outcome: Outcome) {
        let Some(od) = &self.outlier else {
            return;
        };
        let s = &endpoint.state;
        let (fivexx, gateway) = match outcome {
            Outcome::Success => {
                s.consecutive_5xx.store(0, Ordering::Relaxed);
                s.consecutive_gateway.store(0, Ordering::Relaxed);
                return;
            }
            Outcome::ServerError(code) => (true, matches!(code, 502..=504)),
            Outcome::ConnectFailure => (true, true),
        };
        let n5 = if fivexx {
            s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            s.consecutive_5xx.swap(0, Ordering::Relaxed);
            0
        };
        let ng = if gateway {
            s.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            s.consecutive_gateway.swap(0, Ordering::Relaxed);
            0
        };
        let trip = od.consecutive_5xx.is_some_and(|t| n5 >= t)
            || od.consecutive_gateway_errors.is_some_and(|t| ng >= t);
        if trip {
            self.eject(endpoint, od);
        }
    }

    fn eject(&self, endpoint: &Endpoint, od: &OutlierDetection) {
        let now = endpoint::now_ms();
        let s = &endpoint.state;
        if s.ejected_until_ms.load(Ordering::Relaxed) > now {
            return;
        }
        // At least one endpoint may always be ejected, whatever the percentage (as in Envoy).
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.state.ejected_until_ms.load(Ordering::Relaxed) > now)
            .count();
        let allowed = (self.endpoints.len() * usize::from(od.max_ejection_percent) / 100).max(1);
        if ejected >= allowed {
            return;
        }
        let times = s.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = od
            .base_ejection_time
            .saturating_mul(times)
            .min(od.max_ejection_time);
        s.ejected_until_ms
            .store(now + duration.as_millis() as u64, Ordering::Relaxed);
        s.consecutive_5xx.store(0, Ordering::Relaxed);
        s.consecutive_gateway.store(0, Ordering::Relaxed);
        self.stats.ejections_total.fetch_add(1, Ordering::Relaxed);
        self.health_changed();
        tracing::warn!(cluster = %self.name, endpoint = %endpoint.address, ?duration, "endpoint ejected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(lb: &str) -> Cluster {
        cluster_with(lb, "")
    }

    fn cluster_with(lb: &str, extra: &str) -> Cluster {
        let yaml = format!(
            "clusters:\n  - name: up\n    lb: {{ policy: {lb} }}\n    endpoints: \
             [\"127.0.0.1:1001\", \"127.0.0.1:1002\", \"127.0.0.1:1003\"]\n{extra}"
        );
        let config = crate::config::validate::from_yaml(&yaml).expect("valid");
        Cluster::build(&config.clusters[0], None, None)
    }

    /// Leaves two requests unanswered on `e`; they look stalled to picks at [`later`].
    fn stall(e: &Endpoint) -> Vec<InFlight> {
        vec![e.state.start(), e.state.start()]
    }

    /// Ten seconds from now, in the clock of [`endpoint::now_ms`].
    fn later() -> u64 {
        endpoint::now_ms() + 10_000
    }

    #[test]
    fn a_stalled_endpoint_is_skipped_and_ejected_but_never_all() {
        for lb in ["peak_ewma", "round_robin", "least_request", "random"] {
            let c = cluster(lb);
            let _held = stall(&c.endpoints[0]);
            for _ in 0..300 {
                let e = c.pick_at(None, &[], later()).expect("a pick");
                assert_ne!(e.address, c.endpoints[0].address, "{lb}");
            }
            assert!(c.endpoints[0].state.is_ejected(), "{lb}: ejected");
            assert_eq!(c.stats.ejections_total.load(Ordering::Relaxed), 1, "{lb}");

            // Every endpoint silent: the slowness is the workload's; pick as before, eject none.
            let c = cluster(lb);
            let _held: Vec<_> = c.endpoints.iter().flat_map(stall).collect();
            let mut picked = std::collections::HashSet::new();
            for _ in 0..300 {
                picked.insert(
                    c.pick(None)
                        .expect("a pick even when all look stalled")
                        .address,
                );
            }
            assert_eq!(picked.len(), 3, "{lb}: {picked:?}");
            assert_eq!(c.stats.ejections_total.load(Ordering::Relaxed), 0, "{lb}");

            // Without outlier detection it is still passed over, though never ejected.
            let c = cluster_with(lb, "    outlier_detection: { enabled: false }\n");
            let _held = stall(&c.endpoints[0]);
            for _ in 0..300 {
                let e = c.pick_at(None, &[], later()).expect("a pick");
                assert_ne!(e.address, c.endpoints[0].address, "{lb}");
            }
            assert!(!c.endpoints[0].state.is_ejected(), "{lb}");
        }
    }
}
