//! Clusters: endpoints, balancing, active health checks and outlier detection.

mod tls;

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use http::HeaderName;

use super::{super::bootstrap as file, super::model::*, Validator};

use super::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_EWMA_DECAY, DEFAULT_PANIC_THRESHOLD,
    DEFAULT_UPSTREAM_IDLE_TIMEOUT,
};

impl Validator {
    /// A cluster checked on its own: a `secret:` it names cannot be found.
    pub(super) fn cluster(&mut self, path: &str, c: &file::Cluster) -> Option<Cluster> {
        self.cluster_in(path, c, None)
    }

    /// A cluster of `file`, whose `secrets:` its `tls:` may name and whose listeners may send
    /// to it.
    pub(super) fn cluster_in(
        &mut self,
        path: &str,
        c: &file::Cluster,
        file: Option<&file::File>,
    ) -> Option<Cluster> {
        let before = self.errors.len();
        let name = self.name(path, &c.name);
        let protocol = match c.protocol.as_str() {
            "http1" => UpstreamProtocol::Http1,
            "http2" => UpstreamProtocol::Http2,
            other => {
                self.error(
                    format!("{path}.protocol"),
                    format!("unknown protocol {other:?} (expected \"http1\" or \"http2\")"),
                );
                UpstreamProtocol::Http1
            }
        };
        let connect_timeout = self.duration(
            &format!("{path}.connect_timeout"),
            c.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        );
        if connect_timeout.is_zero() {
            self.error(format!("{path}.connect_timeout"), "must be more than 0");
        }
        let mut seen = HashSet::new();
        let endpoints: Vec<Endpoint> = c
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let p = format!("{path}.endpoints[{i}]");
                let (text, weight, identity) = match e {
                    file::Endpoint::Address(a) => (a, 1, None),
                    file::Endpoint::Weighted {
                        address,
                        weight,
                        identity,
                    } => (address, *weight, identity.as_deref()),
                };
                let identity = match identity.filter(|i| !i.is_empty()) {
                    None => None,
                    Some(text) => match crate::identity::SpiffeId::parse(text) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            self.error(format!("{p}.identity"), e.to_string());
                            return None;
                        }
                    },
                };
                let Ok(address) = text.parse::<SocketAddr>() else {
                    self.error(p, format!("{text:?} is not an IP:port socket address"));
                    return None;
                };
                if weight == 0 {
                    self.error(format!("{p}.weight"), "must be at least 1");
                    return None;
                }
                if !seen.insert(address) {
                    self.error(p, format!("{address} is listed twice"));
                    return None;
                }
                Some(Endpoint {
                    address,
                    weight,
                    identity,
                })
            })
            .collect();
        let lb = self.lb(&format!("{path}.lb"), &c.lb);
        let health_check = c
            .health_check
            .as_ref()
            .and_then(|h| self.health_check(&format!("{path}.health_check"), h));
        let outlier_detection = self.outlier_detection(
            &format!("{path}.outlier_detection"),
            c.outlier_detection.as_ref(),
        );
        let panic_threshold_percent = c.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD);
        if panic_threshold_percent > 100 {
            self.error(
                format!("{path}.panic_threshold"),
                "is a percentage: 0 to 100",
            );
        }
        let idle_timeout = self.duration(
            &format!("{path}.idle_timeout"),
            c.idle_timeout.as_deref(),
            DEFAULT_UPSTREAM_IDLE_TIMEOUT,
        );
        if idle_timeout.is_zero() {
            self.error(format!("{path}.idle_timeout"), "must be more than 0");
        }
        let circuit_breakers = self.circuit_breakers(
            &format!("{path}.circuit_breakers"),
            c.circuit_breakers.as_ref(),
        );
        let retry_budget =
            self.retry_budget(&format!("{path}.retry_budget"), c.retry_budget.as_ref());
        let tls = c
            .tls
            .as_ref()
            .and_then(|t| self.upstream_tls(&format!("{path}.tls"), t, protocol, file));
        if let (Some(_), Some(file)) = (&c.tls, file) {
            self.no_tcp_listener_to(&format!("{path}.tls"), &c.name, file);
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Cluster {
            name,
            protocol,
            connect_timeout,
            endpoints: endpoints.into(),
            lb: lb?,
            health_check,
            outlier_detection,
            panic_threshold_percent,
            idle_timeout,
            circuit_breakers,
            retry_budget,
            tls,
        })
    }

    pub(super) fn lb(&mut self, path: &str, lb: &file::Lb) -> Option<LbPolicy> {
        let policy = lb.policy.as_deref().unwrap_or("peak_ewma");
        let hashing = matches!(policy, "ring_hash" | "maglev");
        if lb.hash_key.is_some() && !hashing {
            self.error(
                format!("{path}.hash_key"),
                format!("does not apply to {policy}"),
            );
        }
        if lb.min_ring_size.is_some() && policy != "ring_hash" {
            self.error(
                format!("{path}.min_ring_size"),
                format!("does not apply to {policy}"),
            );
        }
        if lb.table_size.is_some() && policy != "maglev" {
            self.error(
                format!("{path}.table_size"),
                format!("does not apply to {policy}"),
            );
        }
        if lb.decay.is_some() && policy != "peak_ewma" {
            self.error(
                format!("{path}.decay"),
                format!("does not apply to {policy}"),
            );
        }
        let key = if hashing {
            match &lb.hash_key {
                None => {
                    self.error(
                        format!("{path}.hash_key"),
                        format!("{policy} needs a hash_key"),
                    );
                    None
                }
                Some(k) => self.hash_key(&format!("{path}.hash_key"), k),
            }
        } else {
            None
        };
        match policy {
            "round_robin" => Some(LbPolicy::RoundRobin),
            "random" => Some(LbPolicy::Random),
            "least_request" => Some(LbPolicy::LeastRequest),
            "peak_ewma" => {
                let decay = self.duration(
                    &format!("{path}.decay"),
                    lb.decay.as_deref(),
                    DEFAULT_EWMA_DECAY,
                );
                if decay.is_zero() {
                    self.error(format!("{path}.decay"), "must be more than 0");
                }
                Some(LbPolicy::PeakEwma { decay })
            }
            "ring_hash" => {
                let min_ring_size = lb.min_ring_size.unwrap_or(1024);
                if !(1..=8_388_608).contains(&min_ring_size) {
                    self.error(format!("{path}.min_ring_size"), "must be 1 to 8388608");
                }
                Some(LbPolicy::RingHash {
                    key: key?,
                    min_ring_size,
                })
            }
            "maglev" => {
                let table_size = lb.table_size.unwrap_or(65537);
                if !is_prime(table_size) || table_size > 5_000_011 {
                    self.error(
                        format!("{path}.table_size"),
                        format!("{table_size} is not a prime number up to 5000011"),
                    );
                }
                Some(LbPolicy::Maglev {
                    key: key?,
                    table_size,
                })
            }
            other => {
                self.error(
                    format!("{path}.policy"),
                    format!(
                        "unknown policy {other:?} (expected round_robin, random, least_request, peak_ewma, ring_hash or maglev)"
                    ),
                );
                None
            }
        }
    }

    pub(super) fn hash_key(&mut self, path: &str, k: &file::HashKey) -> Option<HashKey> {
        match (&k.header, &k.cookie, k.source_ip) {
            (Some(h), None, None) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => Some(HashKey::Header(n)),
                Err(_) => {
                    self.error(
                        format!("{path}.header"),
                        format!("{h:?} is not a header name"),
                    );
                    None
                }
            },
            (None, Some(c), None) if !c.is_empty() => Some(HashKey::Cookie(c.as_str().into())),
            (None, None, Some(true)) => Some(HashKey::SourceIp),
            _ => {
                self.error(
                    path,
                    "give exactly one of \"header\", \"cookie\" and \"source_ip: true\"",
                );
                None
            }
        }
    }

    pub(super) fn health_check(
        &mut self,
        path: &str,
        h: &file::HealthCheck,
    ) -> Option<HealthCheck> {
        let before = self.errors.len();
        let kind = match (&h.tcp, &h.http, &h.grpc) {
            (Some(_), None, None) => Some(HealthCheckKind::Tcp),
            (None, Some(http), None) => {
                self.absolute_path(&format!("{path}.http.path"), &http.path);
                let mut ranges = Vec::new();
                for (i, r) in http.expected_statuses.iter().enumerate() {
                    let p = format!("{path}.http.expected_statuses[{i}]");
                    let range = match r {
                        file::StatusRange::One(s) => Some((*s, *s)),
                        file::StatusRange::Range(t) => t
                            .split_once('-')
                            .and_then(|(a, b)| {
                                Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
                            })
                            .or_else(|| t.trim().parse().ok().map(|s| (s, s))),
                    };
                    match range {
                        Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => {
                            ranges.push((a, b))
                        }
                        _ => self.error(p, "is not a status code or a range like \"200-399\""),
                    }
                }
                if ranges.is_empty() {
                    ranges.push((200, 299));
                }
                Some(HealthCheckKind::Http {
                    path: http.path.as_str().into(),
                    host: http.host.as_deref().map(Arc::from),
                    expected_statuses: ranges.into(),
                })
            }
            (None, None, Some(g)) => Some(HealthCheckKind::Grpc {
                service: g.service.as_str().into(),
            }),
            _ => {
                self.error(path, "give exactly one of \"tcp\", \"http\" and \"grpc\"");
                None
            }
        };
        let interval = self.duration(
            &format!("{path}.interval"),
            h.interval.as_deref(),
            Duration::from_secs(5),
        );
        let timeout = self.duration(
            &format!("{path}.timeout"),
            h.timeout.as_deref(),
            Duration::from_secs(1),
        );
        let jitter = self.duration(
            &format!("{path}.jitter"),
            h.jitter.as_deref(),
            interval / 10,
        );
        if interval.is_zero() {
            self.error(format!("{path}.interval"), "must be more than 0");
        }
        if timeout.is_zero() {
            self.error(format!("{path}.timeout"), "must be more than 0");
        }
        let healthy_threshold = h.healthy_threshold.unwrap_or(1);
        let unhealthy_threshold = h.unhealthy_threshold.unwrap_or(3);
        if healthy_threshold == 0 {
            self.error(format!("{path}.healthy_threshold"), "must be at least 1");
        }
        if unhealthy_threshold == 0 {
            self.error(format!("{path}.unhealthy_threshold"), "must be at least 1");
        }
        if self.errors.len() != before {
            return None;
        }
        Some(HealthCheck {
            kind: kind?,
            interval,
            timeout,
            healthy_threshold,
            unhealthy_threshold,
            jitter,
        })
    }

    /// Outlier detection is on by default, as failure accrual is in Linkerd.
    pub(super) fn outlier_detection(
        &mut self,
        path: &str,
        o: Option<&file::OutlierDetection>,
    ) -> Option<OutlierDetection> {
        let defaults = OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        };
        let Some(o) = o else {
            return Some(defaults);
        };
        if !o.enabled {
            return None;
        }
        let base_ejection_time = self.duration(
            &format!("{path}.base_ejection_time"),
            o.base_ejection_time.as_deref(),
            defaults.base_ejection_time,
        );
        let max_ejection_time = self.duration(
            &format!("{path}.max_ejection_time"),
            o.max_ejection_time.as_deref(),
            defaults.max_ejection_time.max(base_ejection_time),
        );
        if max_ejection_time < base_ejection_time {
            self.error(
                format!("{path}.max_ejection_time"),
                "must not be less than base_ejection_time",
            );
        }
        let max_ejection_percent = o
            .max_ejection_percent
            .unwrap_or(defaults.max_ejection_percent);
        if max_ejection_percent > 100 {
            self.error(
                format!("{path}.max_ejection_percent"),
                "is a percentage: 0 to 100",
            );
        }
        let nonzero = |n: Option<u32>, default: Option<u32>| match n {
            Some(0) => None,
            Some(n) => Some(n),
            None => default,
        };
        Some(OutlierDetection {
            consecutive_5xx: nonzero(o.consecutive_5xx, defaults.consecutive_5xx),
            consecutive_gateway_errors: nonzero(o.consecutive_gateway_errors, None),
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent,
        })
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d.saturating_mul(*d) <= n)
            .all(|d| !n.is_multiple_of(d))
}
