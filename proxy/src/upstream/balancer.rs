//! Endpoint selection. Each policy is built once per config; a pick looks only at endpoints that
//! are available (healthy and not ejected) unless the cluster is in panic mode, and in the common
//! case (the first choice is available) costs no scan of the endpoint list.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::{
    endpoint::Endpoint,
    hash::{Maglev, Ring},
};
use crate::config::model::LbPolicy;

/// Longest round-robin schedule we precompute; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub enum Balancer {
    RoundRobin {
        schedule: Box<[u32]>,
        position: Arc<AtomicUsize>,
    },
    Random {
        cumulative: Box<[u64]>,
    },
    LeastRequest {
        cumulative: Box<[u64]>,
    },
    PeakEwma {
        cumulative: Box<[u64]>,
        decay: Duration,
    },
    RingHash(Ring),
    Maglev(Maglev),
}

impl Balancer {
    /// `previous` is the balancer this one replaces: the round-robin rotation and the ring's
    /// density carry over, so an update neither restarts the rotation nor reshuffles keys.
    pub fn build(policy: &LbPolicy, endpoints: &[Endpoint], previous: Option<&Balancer>) -> Self {
        let position = previous.and_then(Balancer::position).unwrap_or_default();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let cumulative = || -> Box<[u64]> {
            let mut total = 0;
            weights
                .iter()
                .map(|&w| {
                    total += u64::from(w);
                    total
                })
                .collect()
        };
        let pairs = || -> Vec<_> { endpoints.iter().map(|e| (e.address, e.weight)).collect() };
        match policy {
            LbPolicy::RoundRobin => Balancer::RoundRobin {
                schedule: smooth_schedule(&weights).into(),
                position,
            },
            LbPolicy::Random => Balancer::Random {
                cumulative: cumulative(),
            },
            LbPolicy::LeastRequest => Balancer::LeastRequest {
                cumulative: cumulative(),
            },
            LbPolicy::PeakEwma { decay } => Balancer::PeakEwma {
                cumulative: cumulative(),
                decay: *decay,
            },
            LbPolicy::RingHash { min_ring_size, .. } => {
                let density = match previous {
                    Some(Balancer::RingHash(r)) => Some(r.per_weight()),
                    _ => None,
                };
                Balancer::RingHash(Ring::build(&pairs(), *min_ring_size, density))
            }
            LbPolicy::Maglev { table_size, .. } => {
                Balancer::Maglev(Maglev::build(&pairs(), *table_size))
            }
        }
    }

    pub fn position(&self) -> Option<Arc<AtomicUsize>> {
        match self {
            Balancer::RoundRobin { position, .. } => Some(position.clone()),
            _ => None,
        }
    }

    /// The latency decay, for policies that measure latency.
    pub fn ewma_decay(&self) -> Option<Duration> {
        match self {
            Balancer::PeakEwma { decay, .. } => Some(*decay),
            _ => None,
        }
    }

    /// Picks an endpoint index among those `ok` accepts. `hash` is the request's key for the
    /// consistent-hash policies (a random pick without one).
    pub fn pick(
        &self,
        endpoints: &[Endpoint],
        hash: Option<u64>,
        ok: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        match self {
            Balancer::RoundRobin { schedule, position } => {
                let len = schedule.len();
                let start = position.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|i| schedule[(start + i) % len] as usize)
                    .find(|&i| ok(i))
            }
            Balancer::Random { cumulative } => weighted_random(cumulative, ok),
            Balancer::LeastRequest { cumulative } => p2c(cumulative, ok, |i| {
                f64::from(endpoints[i].state.active()) / f64::from(endpoints[i].weight)
            }),
            Balancer::PeakEwma { cumulative, decay } => p2c(cumulative, ok, |i| {
                endpoints[i].state.ewma_cost(*decay) / f64::from(endpoints[i].weight)
            }),
            Balancer::RingHash(ring) => match hash {
                Some(h) => ring.walk(h).find(|&i| ok(i)),
                None => weighted_random(&uniform(endpoints.len()), ok),
            },
            Balancer::Maglev(table) => match hash {
                Some(h) => table.walk(h).find(|&i| ok(i)),
                None => weighted_random(&uniform(endpoints.len()), ok),
            },
        }
    }
}

fn uniform(n: usize) -> Box<[u64]> {
    (1..=n as u64).collect()
}

fn draw(cumulative: &[u64]) -> usize {
    let total = cumulative[cumulative.len() - 1];
    let r = fastrand::u64(0..total.max(1));
    cumulative.partition_point(|&c| c <= r)
}

fn weighted_random(cumulative: &[u64], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    // A few draws find an available endpoint almost always; then fall back to a scan.
    for _ in 0..4 {
        let i = draw(cumulative);
        if ok(i) {
            return Some(i);
        }
    }
    let candidates: Vec<usize> = (0..cumulative.len()).filter(|&i| ok(i)).collect();
    (!candidates.is_empty()).then(|| candidates[fastrand::usize(..candidates.len())])
}

/// Power of two choices: two weighted random draws, keep the one with the lower load.
fn p2c(
    cumulative: &[u64],
    ok: &dyn Fn(usize) -> bool,
    load: impl Fn(usize) -> f64,
) -> Option<usize> {
    let a = weighted_random(cumulative, ok)?;
    if cumulative.len() == 1 {
        return Some(a);
    }
    let mut b = a;
    for _ in 0..4 {
        b = draw(cumulative);
        if b != a && ok(b) {
            break;
        }
    }
    if b == a || !ok(b) {
        return Some(a);
    }
    Some(if load(b) < load(a) { b } else { a })
}

/// nginx's smooth weighted round robin: each step every endpoint gains its weight, the richest is
/// picked and pays the total. Weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    // Scale large sums down, keeping every endpoint at least weight 1.
    let weights: Vec<i64> = if total > MAX_SCHEDULE {
        weights
            .iter()
            .map(|&w| ((u64::from(w) * MAX_SCHEDULE / total).max(1)) as i64)
            .collect()
    } else {
        weights.iter().map(|&w| i64::from(w)).collect()
    };
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("weights is not empty");
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{endpoint::EndpointState, pool::EndpointPool};

    fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let address = std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
                Endpoint {
                    address,
                    weight,
                    pool: Arc::new(EndpointPool::new(
                        address,
                        crate::upstream::PoolSettings {
                            protocol: crate::config::model::UpstreamProtocol::Http1,
                            connect_timeout: Duration::from_secs(1),
                            idle_timeout: Duration::from_secs(60),
                            tls: None,
                            mesh: None,
                        },
                        crate::upstream::Breakers::new(
                            &crate::config::validate::resilience::default_circuit_breakers(),
                            None,
                        ),
                    )),
                    state: Arc::new(EndpointState::default()),
                }
            })
            .collect()
    }

    fn counts(b: &Balancer, eps: &[Endpoint], n: usize, ok: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; eps.len()];
        for _ in 0..n {
            c[b.pick(eps, None, ok).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_spreads_heavy_endpoint() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert!(smooth_schedule(&[]).is_empty());
        let s = smooth_schedule(&[1_000_000, 1]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 1);
        assert!(s.contains(&1), "a small weight still gets picked");
    }

    #[test]
    fn round_robin_is_exact_and_skips_unavailable() {
        let eps = endpoints(&[3, 1, 2]);
        let b = Balancer::build(&LbPolicy::RoundRobin, &eps, None);
        assert_eq!(counts(&b, &eps, 600, &|_| true), vec![300, 100, 200]);
        assert_eq!(counts(&b, &eps, 600, &|i| i != 0), vec![0, 200, 400]);
    }

    #[test]
    fn random_follows_weights() {
        let eps = endpoints(&[1, 3]);
        let b = Balancer::build(&LbPolicy::Random, &eps, None);
        let c = counts(&b, &eps, 4000, &|_| true);
        assert!((2800..3200).contains(&c[1]), "{c:?}");
        assert_eq!(counts(&b, &eps, 100, &|i| i == 0), vec![100, 0]);
    }

    #[test]
    fn least_request_avoids_busy_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        let _busy: Vec<_> = (0..10).map(|_| eps[0].state.start()).collect();
        let b = Balancer::build(&LbPolicy::LeastRequest, &eps, None);
        let c = counts(&b, &eps, 3000, &|_| true);
        // P2C picks endpoint 0 only when both draws land on it, which it never keeps.
        assert!(c[0] < 400, "{c:?}");
    }

    #[test]
    fn nothing_available_means_no_pick() {
        let eps = endpoints(&[1, 1]);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
            LbPolicy::PeakEwma {
                decay: Duration::from_secs(10),
            },
        ] {
            let b = Balancer::build(&policy, &eps, None);
            assert_eq!(b.pick(&eps, None, &|_| false), None, "{policy:?}");
        }
    }
}
