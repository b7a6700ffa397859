//! Discovery resources → the bootstrap file's types, so resources from the control plane go
//! through exactly the validation the bootstrap file does (one config model, one validator).
//! Only what the bootstrap types cannot express fails here.

use trellis_proto::discovery::v1 as api;

use crate::config::bootstrap as file;

#[derive(Debug, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct ConvertError {
    pub resource: String,
    pub message: String,
}

fn ms(v: u64) -> Option<String> {
    (v != 0).then(|| format!("{v}ms"))
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// 0 means "the proxy's default" on the wire, which is `None` in the file.
fn nonzero(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

pub fn listener(l: &api::Listener) -> Result<file::Listener, ConvertError> {
    use api::listener::Kind;
    let mut out = file::Listener {
        tls: None,
        mtls: None,
        name: l.name.clone(),
        address: l.address.clone(),
        protocol: String::new(),
        route_config: None,
        cluster: None,
        sni: Vec::new(),
        default_cluster: None,
        idle_timeout: None,
        header_read_timeout: None,
        max_connection_age: None,
        access_log: None,
        rate_limit: None,
        path_normalization: None,
        // Unset stays unset (the model's default); 0 reaches the validator, which names it.
        max_connections: l.max_connections,
        direction: None,
        services: Vec::new(),
        unknown_destination: None,
        detection_timeout: None,
    };
    match &l.kind {
        Some(Kind::Http(h)) => {
            out.protocol = "http".into();
            out.route_config = Some(h.route_config.clone());
            out.idle_timeout = ms(h.idle_timeout_ms);
            out.header_read_timeout = ms(h.header_read_timeout_ms);
            out.max_connection_age = ms(h.max_connection_age_ms);
            let slashes = match api::EscapedSlashes::try_from(h.escaped_slashes) {
                Ok(api::EscapedSlashes::Reject) => None,
                Ok(api::EscapedSlashes::Redirect) => Some("redirect"),
                Ok(api::EscapedSlashes::UnescapeAndForward) => Some("unescape_and_forward"),
                Ok(api::EscapedSlashes::KeepUnchanged) => Some("keep_unchanged"),
                // An action this proxy does not know: refused by the validator, by name.
                Err(_) => Some("unknown"),
            };
            out.path_normalization = slashes.map(|s| file::PathNormalization {
                escaped_slashes: Some(s.into()),
            });
            out.tls = h.tls.as_ref().map(listener_tls);
        }
        Some(Kind::Tcp(t)) => {
            out.protocol = "tcp".into();
            out.cluster = Some(t.cluster.clone());
            out.idle_timeout = ms(t.idle_timeout_ms);
            out.rate_limit = t.rate_limit.as_ref().map(rate_limit);
            out.tls = t.tls.as_ref().map(listener_tls);
        }
        Some(Kind::TlsPassthrough(s)) => {
            out.protocol = "tls_passthrough".into();
            out.sni = s
                .routes
                .iter()
                .map(|r| file::SniRoute {
                    server_names: r.server_names.clone(),
                    cluster: r.cluster.clone(),
                })
                .collect();
            out.default_cluster = nonempty(&s.default_cluster);
            out.idle_timeout = ms(s.idle_timeout_ms);
            out.rate_limit = s.rate_limit.as_ref().map(rate_limit);
        }
        Some(Kind::Capture(c)) => {
            out.protocol = "capture".into();
            // A value this proxy does not know reaches the validator, which names it.
            out.direction = Some(match api::CaptureDirection::try_from(c.direction) {
                Ok(api::CaptureDirection::Outbound) => "outbound".into(),
                Ok(api::CaptureDirection::Inbound) => "inbound".into(),
                Err(_) => format!("unknown ({})", c.direction),
            });
            out.unknown_destination = Some(
                match api::UnknownDestination::try_from(c.unknown_destination) {
                    Ok(api::UnknownDestination::Allow) => "allow".into(),
                    Ok(api::UnknownDestination::Block) => "block".into(),
                    Err(_) => format!("unknown ({})", c.unknown_destination),
                },
            );
            out.detection_timeout = ms(c.detection_timeout_ms);
            out.idle_timeout = ms(c.idle_timeout_ms);
            out.mtls = Some(match api::InboundMtls::try_from(c.mtls) {
                Ok(api::InboundMtls::Permissive) => "permissive".into(),
                Ok(api::InboundMtls::Strict) => "strict".into(),
                Err(_) => format!("unknown ({})", c.mtls),
            });
            out.services = c
                .services
                .iter()
                .map(|s| file::CapturedService {
                    ip: s.ip.clone(),
                    port: s.port,
                    cluster: s.cluster.clone(),
                    protocol: Some(match api::AppProtocol::try_from(s.protocol) {
                        Ok(api::AppProtocol::Detect) => "detect".into(),
                        Ok(api::AppProtocol::Http) => "http".into(),
                        Ok(api::AppProtocol::Http2) => "http2".into(),
                        Ok(api::AppProtocol::Tcp) => "tcp".into(),
                        Ok(api::AppProtocol::Tls) => "tls".into(),
                        Err(_) => format!("unknown ({})", s.protocol),
                    }),
                    route_config: nonempty(&s.route_config),
                })
                .collect();
        }
        None => {
            return Err(ConvertError {
                resource: format!("listener {:?}", l.name),
                message: "kind: one of http, tcp, tls_passthrough and capture must be set".into(),
            });
        }
    }
    Ok(out)
}

/// A certificate named by Secret resource: the discovery API has no files.
fn by_secret(name: &str) -> file::CertificateSource {
    file::CertificateSource {
        cert_file: None,
        key_file: None,
        secret: Some(name.to_owned()),
    }
}

/// Listener TLS. An enum value this proxy does not know becomes `"unknown"`, which the validator
/// refuses by field, as it does for a bootstrap file.
fn listener_tls(t: &api::ListenerTls) -> file::ListenerTls {
    file::ListenerTls {
        certificates: t
            .certificates
            .iter()
            .map(|c| file::ServerCertificate {
                server_names: c.server_names.clone(),
                source: by_secret(&c.secret),
            })
            .collect(),
        unknown_server_name: match api::UnknownServerName::try_from(t.unknown_server_name) {
            Ok(api::UnknownServerName::Default) => None,
            Ok(api::UnknownServerName::Refuse) => Some("refuse".into()),
            Err(_) => Some("unknown".into()),
        },
        alpn: t.alpn.as_ref().map(|a| a.protocols.clone()),
        min_version: match api::TlsVersion::try_from(t.min_version) {
            Ok(api::TlsVersion::Unspecified) => None,
            Ok(api::TlsVersion::Tls12) => Some("1.2".into()),
            Ok(api::TlsVersion::Tls13) => Some("1.3".into()),
            Err(_) => Some("unknown".into()),
        },
        client_certificate: t
            .client_certificate
            .as_ref()
            .map(|c| file::ClientCertificate {
                mode: match api::ClientCertificateMode::try_from(c.mode) {
                    Ok(api::ClientCertificateMode::Unspecified) => None,
                    Ok(api::ClientCertificateMode::Require) => Some("require".into()),
                    Ok(api::ClientCertificateMode::Optional) => Some("optional".into()),
                    Err(_) => Some("unknown".into()),
                },
                ca_file: None,
                ca_secret: nonempty(&c.ca_secret),
            }),
    }
}

fn cluster_tls(t: &api::UpstreamTls) -> file::ClusterTls {
    file::ClusterTls {
        sni: nonempty(&t.sni),
        ca_file: None,
        ca_secret: nonempty(&t.ca_secret),
        client_certificate: nonempty(&t.client_certificate_secret).map(|s| by_secret(&s)),
        subject_alt_names: t.subject_alt_names.clone(),
        verify_subject_alt_names: t
            .verify_subject_alt_names
            .iter()
            .map(|n| {
                use api::subject_alt_name::Kind;
                match &n.kind {
                    Some(Kind::Hostname(h)) => file::SubjectAltName {
                        hostname: Some(h.clone()),
                        uri: None,
                    },
                    Some(Kind::Uri(u)) => file::SubjectAltName {
                        hostname: None,
                        uri: Some(u.clone()),
                    },
                    // Refused by validation ("give hostname or uri").
                    None => file::SubjectAltName::default(),
                }
            })
            .collect(),
    }
}

/// A Secret resource as a bootstrap file's `secrets:` entry; empty fields are absent.
pub fn secret(s: &api::Secret) -> file::Secret {
    file::Secret {
        name: s.name.clone(),
        certificate_chain: nonempty(&s.certificate_chain),
        private_key: (!s.private_key.is_empty())
            .then(|| crate::tls::material::SecretString::new(s.private_key.clone())),
        ca_bundle: nonempty(&s.ca_bundle),
    }
}

/// The Secret resources a listener names (certificates, client CA), in order.
pub fn listener_secrets(l: &api::Listener) -> Vec<&str> {
    use api::listener::Kind;
    let tls = match &l.kind {
        Some(Kind::Http(h)) => h.tls.as_ref(),
        Some(Kind::Tcp(t)) => t.tls.as_ref(),
        _ => None,
    };
    let Some(tls) = tls else {
        return Vec::new();
    };
    tls.certificates
        .iter()
        .map(|c| c.secret.as_str())
        .chain(tls.client_certificate.iter().map(|c| c.ca_secret.as_str()))
        .filter(|s| !s.is_empty())
        .collect()
}

/// The Secret resources a cluster names (CA bundle, client certificate).
pub fn cluster_secrets(c: &api::Cluster) -> Vec<&str> {
    c.tls
        .iter()
        .flat_map(|t| [t.ca_secret.as_str(), t.client_certificate_secret.as_str()])
        .filter(|s| !s.is_empty())
        .collect()
}

pub fn route_config(rc: &api::RouteConfiguration) -> Result<file::RouteConfig, ConvertError> {
    let virtual_hosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(vi, vh)| {
            let at = |field: String, message| ConvertError {
                resource: format!("route config {:?}: virtual_hosts[{vi}]{field}", rc.name),
                message,
            };
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .map(|(ri, r)| route(r).map_err(|m| at(format!(".routes[{ri}]"), m)))
                .collect::<Result<_, _>>()?;
            Ok(file::VirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.clone(),
                routes,
                retry: vh
                    .retry
                    .as_ref()
                    .map(retry)
                    .transpose()
                    .map_err(|m| at(String::new(), m))?,
                rate_limit: vh.rate_limit.as_ref().map(rate_limit),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(file::RouteConfig {
        name: rc.name.clone(),
        virtual_hosts,
    })
}

fn route(r: &api::Route) -> Result<file::Route, String> {
    use api::route::Action;
    let m = r.r#match.clone().unwrap_or_default();
    let path = m.path.as_ref().map(|p| {
        use api::route_match::Path;
        let mut pm = file::PathMatch {
            exact: None,
            prefix: None,
            template: None,
            regex: None,
        };
        match p {
            Path::Exact(v) => pm.exact = Some(v.clone()),
            Path::Prefix(v) => pm.prefix = Some(v.clone()),
            Path::Template(v) => pm.template = Some(v.clone()),
            Path::Regex(v) => pm.regex = Some(v.clone()),
        }
        pm
    });
    let value = |name: &str, v: &Option<api::ValueMatch>| {
        use api::value_match::Kind;
        let mut out = file::ValueMatch {
            name: name.to_owned(),
            exact: None,
            regex: None,
            present: None,
        };
        match v.as_ref().and_then(|v| v.kind.as_ref()) {
            Some(Kind::Exact(e)) => out.exact = Some(e.clone()),
            Some(Kind::Regex(e)) => out.regex = Some(e.clone()),
            Some(Kind::Present(p)) => out.present = Some(*p),
            None => {}
        }
        out
    };
    let matcher = file::RouteMatch {
        path,
        headers: m.headers.iter().map(|h| value(&h.name, &h.value)).collect(),
        query: m.query.iter().map(|q| value(&q.name, &q.value)).collect(),
        method: nonempty(&m.method),
    };
    let (mut forward, mut redirect, mut direct_response) = (None, None, None);
    match &r.action {
        Some(Action::Forward(f)) => {
            forward = Some(file::Forward {
                cluster: None,
                clusters: f
                    .clusters
                    .iter()
                    .map(|w| file::WeightedCluster {
                        name: w.cluster.clone(),
                        weight: w.weight,
                    })
                    .collect(),
            })
        }
        Some(Action::Redirect(rd)) => {
            use api::redirect_action::Path;
            redirect = Some(file::Redirect {
                scheme: nonempty(&rd.scheme),
                host: nonempty(&rd.host),
                port: match rd.port {
                    0 => None,
                    p => Some(
                        u16::try_from(p)
                            .map_err(|_| format!("redirect.port: {p} is not a port"))?,
                    ),
                },
                path: match &rd.path {
                    Some(Path::FullPath(p)) => Some(p.clone()),
                    _ => None,
                },
                prefix: match &rd.path {
                    Some(Path::Prefix(p)) => Some(p.clone()),
                    _ => None,
                },
                status: match rd.status {
                    0 => 302,
                    s => u16::try_from(s).unwrap_or(u16::MAX),
                },
            })
        }
        Some(Action::DirectResponse(d)) => {
            direct_response = Some(file::DirectResponse {
                status: u16::try_from(d.status).unwrap_or(u16::MAX),
                body: String::from_utf8(d.body.to_vec())
                    .map_err(|_| "direct_response.body: not UTF-8 text".to_owned())?,
            })
        }
        None => {
            return Err("action: one of forward, redirect and direct_response must be set".into());
        }
    }
    let f = r.filters.clone().unwrap_or_default();
    let edits = |e: &Option<api::HeaderEdits>| {
        let e = e.clone().unwrap_or_default();
        let pairs = |v: &[api::Header]| {
            v.iter()
                .map(|h| file::Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect()
        };
        file::HeaderEdits {
            add: pairs(&e.add),
            set: pairs(&e.set),
            remove: e.remove.clone(),
        }
    };
    let rewrite = f.rewrite.as_ref().map(|rw| {
        use api::rewrite::Path;
        file::Rewrite {
            path: match &rw.path {
                Some(Path::FullPath(p)) => Some(p.clone()),
                _ => None,
            },
            prefix: match &rw.path {
                Some(Path::Prefix(p)) => Some(p.clone()),
                _ => None,
            },
            host: nonempty(&rw.host),
        }
    });
    Ok(file::Route {
        name: nonempty(&r.name),
        matcher,
        forward,
        redirect,
        direct_response,
        filters: file::Filters {
            request_headers: edits(&f.request_headers),
            response_headers: edits(&f.response_headers),
            rewrite,
        },
        timeout: r
            .timeout_ms
            .map(|t| if t == 0 { "0".into() } else { format!("{t}ms") }),
        retry: r.retry.as_ref().map(retry).transpose()?,
        rate_limit: r.rate_limit.as_ref().map(rate_limit),
        // Empty means the default (WebSocket): the wire cannot tell an empty list from none.
        upgrades: (!r.upgrades.is_empty()).then(|| r.upgrades.clone()),
    })
}

/// Unset and zero fields stay `None`, so the validator applies the same defaults as for the file.
/// Values are passed on unchecked (the validator names the field); only what the file's types
/// cannot hold fails here.
fn retry(r: &api::RetryPolicy) -> Result<file::Retry, String> {
    let status_codes = r
        .codes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            u16::try_from(c)
                .map_err(|_| format!("retry.codes[{i}]: {c} is not an HTTP status (100 to 599)"))
        })
        .collect::<Result<_, _>>()?;
    let (base, max) = (ms(r.backoff_ms), ms(r.backoff_max_ms));
    Ok(file::Retry {
        attempts: r.attempts,
        // Empty means the default conditions: the wire cannot tell an empty list from none.
        retry_on: (!r.retry_on.is_empty()).then(|| r.retry_on.clone()),
        status_codes,
        per_try_timeout: ms(r.per_try_timeout_ms),
        backoff: (base.is_some() || max.is_some()).then_some(file::Backoff { base, max }),
        retry_non_idempotent: r.retry_non_idempotent,
        replay_buffer: r.replay_buffer_bytes.map(|b| b.to_string()),
    })
}

fn rate_limit(t: &api::TokenBucket) -> file::RateLimit {
    file::RateLimit {
        // 0 goes on to the validator, which refuses an empty bucket by name.
        max_tokens: t.max_tokens,
        tokens_per_fill: nonzero(t.tokens_per_fill),
        fill_interval: ms(t.fill_interval_ms),
    }
}

/// A cluster with the endpoints of its load assignment (none yet: an empty list).
pub fn cluster(c: &api::Cluster, endpoints: Option<&api::ClusterLoadAssignment>) -> file::Cluster {
    use api::{hash_key, health_check, lb_policy};
    let protocol = match api::UpstreamProtocol::try_from(c.protocol) {
        Ok(api::UpstreamProtocol::Http2) => "http2",
        Ok(api::UpstreamProtocol::Http1) | Ok(api::UpstreamProtocol::Unspecified) => "http1",
        Err(_) => "unknown",
    };
    let mut lb = file::Lb::default();
    let key = |k: &Option<api::HashKey>| {
        k.as_ref().and_then(|k| k.kind.as_ref()).map(|k| match k {
            hash_key::Kind::Header(h) => file::HashKey {
                header: Some(h.clone()),
                cookie: None,
                source_ip: None,
            },
            hash_key::Kind::Cookie(c) => file::HashKey {
                header: None,
                cookie: Some(c.clone()),
                source_ip: None,
            },
            hash_key::Kind::SourceIp(_) => file::HashKey {
                header: None,
                cookie: None,
                source_ip: Some(true),
            },
        })
    };
    // Unset means the default a bootstrap file has (see cluster.proto): the validator decides.
    lb.policy = match c.lb.as_ref().and_then(|l| l.kind.as_ref()) {
        None => None,
        Some(kind) => Some(
            match kind {
                lb_policy::Kind::RoundRobin(_) => "round_robin",
                lb_policy::Kind::Random(_) => "random",
                lb_policy::Kind::LeastRequest(_) => "least_request",
                lb_policy::Kind::PeakEwma(p) => {
                    lb.decay = ms(p.decay_ms);
                    "peak_ewma"
                }
                lb_policy::Kind::RingHash(r) => {
                    lb.hash_key = key(&r.key);
                    lb.min_ring_size = (r.min_ring_size != 0).then_some(r.min_ring_size);
                    "ring_hash"
                }
                lb_policy::Kind::Maglev(m) => {
                    lb.hash_key = key(&m.key);
                    lb.table_size = (m.table_size != 0).then_some(m.table_size);
                    "maglev"
                }
            }
            .to_owned(),
        ),
    };
    let health_check = c.health_check.as_ref().map(|h| file::HealthCheck {
        tcp: matches!(h.kind, Some(health_check::Kind::Tcp(_))).then(file::TcpCheck::default),
        http: match &h.kind {
            Some(health_check::Kind::Http(http)) => Some(file::HttpCheck {
                path: http.path.clone(),
                host: nonempty(&http.host),
                expected_statuses: http
                    .expected_statuses
                    .iter()
                    .map(|r| file::StatusRange::Range(format!("{}-{}", r.start, r.end)))
                    .collect(),
            }),
            _ => None,
        },
        grpc: match &h.kind {
            Some(health_check::Kind::Grpc(g)) => Some(file::GrpcCheck {
                service: g.service.clone(),
            }),
            _ => None,
        },
        interval: ms(h.interval_ms),
        timeout: ms(h.timeout_ms),
        healthy_threshold: (h.healthy_threshold != 0).then_some(h.healthy_threshold),
        unhealthy_threshold: (h.unhealthy_threshold != 0).then_some(h.unhealthy_threshold),
        jitter: ms(h.jitter_ms),
    });
    // Unset means the defaults a bootstrap file has (see cluster.proto): the validator decides.
    let outlier_detection = c.outlier_detection.as_ref().map(|o| match o.disabled {
        true => file::OutlierDetection {
            enabled: false,
            consecutive_5xx: None,
            consecutive_gateway_errors: None,
            base_ejection_time: None,
            max_ejection_time: None,
            max_ejection_percent: None,
        },
        // An absent threshold disables that trigger.
        false => file::OutlierDetection {
            enabled: true,
            consecutive_5xx: Some(o.consecutive_5xx.unwrap_or(0)),
            consecutive_gateway_errors: Some(o.consecutive_gateway_errors.unwrap_or(0)),
            base_ejection_time: ms(o.base_ejection_time_ms),
            max_ejection_time: ms(o.max_ejection_time_ms),
            max_ejection_percent: Some(o.max_ejection_percent.min(255) as u8),
        },
    });
    let endpoints = endpoints
        .map(|cla| {
            cla.endpoints
                .iter()
                .filter(|e| e.health != api::EndpointHealth::Terminating as i32)
                .map(|e| file::Endpoint::Weighted {
                    address: e.address.clone(),
                    weight: e.weight.max(1),
                    identity: nonempty(&e.identity),
                })
                .collect()
        })
        .unwrap_or_default();
    file::Cluster {
        tls: c.tls.as_ref().map(cluster_tls),
        name: c.name.clone(),
        protocol: protocol.into(),
        connect_timeout: ms(c.connect_timeout_ms),
        endpoints,
        lb,
        health_check,
        outlier_detection,
        panic_threshold: c.panic_threshold_percent.map(|p| p.min(255) as u8),
        idle_timeout: ms(c.idle_timeout_ms),
        circuit_breakers: c.circuit_breakers.as_ref().map(|b| file::CircuitBreakers {
            max_connections: nonzero(b.max_connections),
            max_pending_requests: nonzero(b.max_pending_requests),
            max_requests: nonzero(b.max_requests),
            max_retries: nonzero(b.max_retries),
        }),
        // Unset stays unset: the proxy's default budget, which is on.
        retry_budget: c.retry_budget.as_ref().map(|b| file::RetryBudget {
            enabled: b.enabled.unwrap_or(true),
            percent: b.percent,
            min_retries_per_second: b.min_retries_per_second,
            window: ms(b.window_ms),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{
        model::{self, RetryOn, TokenBucket},
        validate::{self, resilience},
    };

    fn http_listener(h: api::HttpListener) -> api::Listener {
        api::Listener {
            name: "http".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Http(h)),
            max_connections: None,
        }
    }

    fn tcp_listener(rate_limit: Option<api::TokenBucket>) -> api::Listener {
        api::Listener {
            max_connections: None,
            name: "tcp".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Tcp(api::TcpProxy {
                cluster: "c".into(),
                idle_timeout_ms: 0,
                rate_limit,
                tls: None,
            })),
        }
    }

    fn forward_route(name: &str) -> api::Route {
        api::Route {
            name: name.into(),
            action: Some(api::route::Action::Forward(api::ForwardAction {
                clusters: vec![api::WeightedCluster {
                    cluster: "c".into(),
                    weight: 1,
                }],
            })),
            ..Default::default()
        }
    }

    fn route_configuration(vh: api::VirtualHost) -> api::RouteConfiguration {
        api::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                ..vh
            }],
        }
    }

    fn cluster_named(name: &str) -> api::Cluster {
        api::Cluster {
            name: name.into(),
            ..Default::default()
        }
    }

    /// What the xDS client does with what it holds: convert, then the bootstrap file's validator.
    fn validated(
        listeners: &[api::Listener],
        rc: &api::RouteConfiguration,
        clusters: &[api::Cluster],
    ) -> Result<model::Config, validate::ConfigErrors> {
        validate::validate(file::File {
            listeners: listeners.iter().map(|l| listener(l).unwrap()).collect(),
            route_configs: vec![route_config(rc).unwrap()],
            clusters: clusters.iter().map(|c| cluster(c, None)).collect(),
            xds: None,
            secrets: Vec::new(),
            drain_delay: None,
        })
    }

    fn route<'a>(config: &'a model::Config, name: &str) -> &'a model::Route {
        config.route_configs[0].virtual_hosts[0]
            .routes
            .iter()
            .find(|r| &*r.name == name)
            .unwrap()
    }

    fn find_cluster<'a>(config: &'a model::Config, name: &str) -> &'a model::Cluster {
        config.clusters.iter().find(|c| &*c.name == name).unwrap()
    }

    fn listener_named<'a>(config: &'a model::Config, name: &str) -> &'a model::Listener {
        config.listeners.iter().find(|l| &*l.name == name).unwrap()
    }

    #[test]
    fn policies_on_the_wire_reach_the_validated_config() {
        let rc = route_configuration(api::VirtualHost {
            routes: vec![
                api::Route {
                    timeout_ms: Some(3_000),
                    retry: Some(api::RetryPolicy {
                        attempts: Some(4),
                        backoff_ms: 10,
                        codes: vec![503, 429],
                        retry_on: vec!["5xx".into(), "reset".into()],
                        per_try_timeout_ms: 250,
                        backoff_max_ms: 1_000,
                        retry_non_idempotent: true,
                        replay_buffer_bytes: Some(0),
                    }),
                    rate_limit: Some(api::TokenBucket {
                        max_tokens: 10,
                        tokens_per_fill: 5,
                        fill_interval_ms: 200,
                    }),
                    ..forward_route("own")
                },
                forward_route("inherits"),
            ],
            retry: Some(api::RetryPolicy {
                attempts: Some(1),
                replay_buffer_bytes: Some(1 << 20),
                ..Default::default()
            }),
            rate_limit: Some(api::TokenBucket {
                max_tokens: 50,
                ..Default::default()
            }),
            ..Default::default()
        });
        let clusters = [
            api::Cluster {
                idle_timeout_ms: 30_000,
                circuit_breakers: Some(api::CircuitBreakers {
                    max_connections: 10,
                    max_retries: 3,
                    ..Default::default()
                }),
                retry_budget: Some(api::RetryBudget {
                    enabled: None,
                    percent: Some(0.0),
                    min_retries_per_second: Some(0),
                    window_ms: 5_000,
                }),
                ..cluster_named("c")
            },
            api::Cluster {
                retry_budget: Some(api::RetryBudget {
                    enabled: Some(false),
                    ..Default::default()
                }),
                ..cluster_named("no-budget")
            },
        ];
        let listeners = [
            http_listener(api::HttpListener {
                route_config: "rc".into(),
                idle_timeout_ms: 120_000,
                header_read_timeout_ms: 5_000,
                max_connection_age_ms: 600_000,
                escaped_slashes: api::EscapedSlashes::KeepUnchanged as i32,
                tls: None,
            }),
            tcp_listener(Some(api::TokenBucket {
                max_tokens: 100,
                tokens_per_fill: 0,
                fill_interval_ms: 0,
            })),
        ];
        let config = validated(&listeners, &rc, &clusters).unwrap();

        let own = route(&config, "own");
        assert_eq!(own.timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            own.retry,
            model::RetryPolicy {
                attempts: 4,
                retry_on: RetryOn::FIVE_XX.union(RetryOn::RESET),
                status_codes: [503, 429].into(),
                per_try_timeout: Some(Duration::from_millis(250)),
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_secs(1),
                retry_non_idempotent: true,
                replay_buffer: 0,
            }
        );
        assert_eq!(
            own.rate_limit,
            Some(TokenBucket {
                max_tokens: 10,
                tokens_per_fill: 5,
                fill_interval: Duration::from_millis(200),
            })
        );
        // A route without a policy takes its virtual host's; fields the host left out are the
        // proxy's defaults.
        let inherits = route(&config, "inherits");
        assert_eq!(
            inherits.retry,
            model::RetryPolicy {
                attempts: 1,
                replay_buffer: 1 << 20,
                ..resilience::default_retry_policy()
            }
        );
        assert_eq!(inherits.rate_limit, None);
        assert_eq!(
            config.route_configs[0].virtual_hosts[0].rate_limit,
            Some(TokenBucket {
                max_tokens: 50,
                tokens_per_fill: 50,
                fill_interval: Duration::from_secs(1),
            })
        );

        let c = find_cluster(&config, "c");
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(
            c.circuit_breakers,
            model::CircuitBreakers {
                max_connections: 10,
                max_retries: 3,
                ..resilience::default_circuit_breakers()
            }
        );
        assert_eq!(
            c.retry_budget,
            Some(model::RetryBudget {
                ratio: 0.0,
                min_retries_per_second: 0,
                window: Duration::from_secs(5),
            })
        );
        assert_eq!(find_cluster(&config, "no-budget").retry_budget, None);

        match &listener_named(&config, "http").kind {
            model::ListenerKind::Http { connection, .. } => assert_eq!(
                *connection,
                model::HttpConnection {
                    idle_timeout: Duration::from_secs(120),
                    header_read_timeout: Duration::from_secs(5),
                    max_connection_age: Some(Duration::from_secs(600)),
                    escaped_slashes: model::EscapedSlashes::KeepUnchanged,
                }
            ),
            other => panic!("not an HTTP listener: {other:?}"),
        }
        assert_eq!(
            listener_named(&config, "tcp").rate_limit,
            Some(TokenBucket {
                max_tokens: 100,
                tokens_per_fill: 100,
                fill_interval: Duration::from_secs(1),
            })
        );
    }

    #[test]
    fn unset_fields_mean_the_proxys_defaults() {
        let rc = route_configuration(api::VirtualHost {
            routes: vec![
                api::Route {
                    retry: Some(api::RetryPolicy::default()),
                    ..forward_route("empty-policy")
                },
                api::Route {
                    retry: Some(api::RetryPolicy {
                        attempts: Some(0),
                        ..Default::default()
                    }),
                    ..forward_route("no-retries")
                },
                forward_route("no-policy"),
            ],
            ..Default::default()
        });
        let clusters = [
            cluster_named("c"),
            api::Cluster {
                circuit_breakers: Some(api::CircuitBreakers::default()),
                retry_budget: Some(api::RetryBudget::default()),
                ..cluster_named("empty-messages")
            },
        ];
        let listeners = [
            http_listener(api::HttpListener {
                route_config: "rc".into(),
                ..Default::default()
            }),
            tcp_listener(None),
        ];
        let config = validated(&listeners, &rc, &clusters).unwrap();

        let default_policy = resilience::default_retry_policy();
        assert_eq!(route(&config, "empty-policy").retry, default_policy);
        assert_eq!(route(&config, "no-policy").retry, default_policy);
        assert_eq!(
            route(&config, "no-policy").timeout,
            Some(validate::DEFAULT_ROUTE_TIMEOUT)
        );
        assert_eq!(route(&config, "no-retries").retry.attempts, 0);
        assert_eq!(config.route_configs[0].virtual_hosts[0].rate_limit, None);
        for name in ["c", "empty-messages"] {
            let c = find_cluster(&config, name);
            assert_eq!(c.idle_timeout, validate::DEFAULT_UPSTREAM_IDLE_TIMEOUT);
            assert_eq!(c.circuit_breakers, resilience::default_circuit_breakers());
            // The budget is on unless a control plane turns it off.
            assert_eq!(c.retry_budget, Some(resilience::default_retry_budget()));
        }
        match &listener_named(&config, "http").kind {
            model::ListenerKind::Http { connection, .. } => assert_eq!(
                *connection,
                model::HttpConnection {
                    idle_timeout: validate::DEFAULT_HTTP_IDLE_TIMEOUT,
                    header_read_timeout: validate::DEFAULT_HEADER_READ_TIMEOUT,
                    max_connection_age: None,
                    escaped_slashes: model::EscapedSlashes::Reject,
                }
            ),
            other => panic!("not an HTTP listener: {other:?}"),
        }
        assert_eq!(listener_named(&config, "tcp").rate_limit, None);
    }

    #[test]
    fn connection_limits_and_upgrades_on_the_wire() {
        let rc = route_configuration(api::VirtualHost {
            routes: vec![
                api::Route {
                    upgrades: vec!["h2c".into(), "WebSocket".into()],
                    ..forward_route("both")
                },
                forward_route("default"),
            ],
            ..Default::default()
        });
        let routed = api::HttpListener {
            route_config: "rc".into(),
            ..Default::default()
        };
        let capped = api::Listener {
            max_connections: Some(7),
            ..http_listener(routed.clone())
        };
        let config = validated(&[capped], &rc, &[cluster_named("c")]).unwrap();
        assert_eq!(listener_named(&config, "http").max_connections, 7);
        let names = |r: &model::Route| r.upgrades.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        assert_eq!(names(route(&config, "both")), ["h2c", "websocket"]);
        assert_eq!(names(route(&config, "default")), ["websocket"]);

        let unset = http_listener(routed.clone());
        let config = validated(&[unset], &rc, &[cluster_named("c")]).unwrap();
        assert_eq!(
            listener_named(&config, "http").max_connections,
            model::Listener::DEFAULT_MAX_CONNECTIONS
        );

        let zero = api::Listener {
            max_connections: Some(0),
            ..http_listener(routed.clone())
        };
        let bad = route_configuration(api::VirtualHost {
            routes: vec![api::Route {
                upgrades: vec!["web socket".into()],
                ..forward_route("bad")
            }],
            ..Default::default()
        });
        let text = validated(&[zero], &bad, &[cluster_named("c")])
            .unwrap_err()
            .to_string();
        assert!(text.contains("listeners[0].max_connections"), "{text}");
        assert!(text.contains(".routes[0].upgrades[0]"), "{text}");
        assert!(text.contains("\"web socket\""), "{text}");
    }

    /// The xDS client NACKs with these messages, so each must name the field at fault.
    #[test]
    fn invalid_values_come_back_naming_the_field() {
        let empty_bucket = api::TokenBucket {
            max_tokens: 0,
            ..Default::default()
        };
        let rc = route_configuration(api::VirtualHost {
            routes: vec![api::Route {
                retry: Some(api::RetryPolicy {
                    retry_on: vec!["5xx".into(), "sometimes".into()],
                    ..Default::default()
                }),
                ..forward_route("r")
            }],
            rate_limit: Some(empty_bucket),
            ..Default::default()
        });
        let clusters = [
            cluster_named("c"),
            api::Cluster {
                retry_budget: Some(api::RetryBudget {
                    window_ms: 100,
                    ..Default::default()
                }),
                ..cluster_named("bad-budget")
            },
        ];
        let errors = validated(&[tcp_listener(Some(empty_bucket))], &rc, &clusters)
            .unwrap_err()
            .0;
        let message = |path: &str| {
            errors
                .iter()
                .find(|e| e.path == path)
                .map(|e| e.message.clone())
                .unwrap_or_else(|| panic!("no error at {path}: {errors:#?}"))
        };
        assert!(
            message("route_configs[0].virtual_hosts[0].routes[0].retry.retry_on[1]")
                .contains("unknown condition \"sometimes\"")
        );
        assert_eq!(
            message("route_configs[0].virtual_hosts[0].rate_limit.max_tokens"),
            "must be at least 1"
        );
        assert_eq!(
            message("listeners[0].rate_limit.max_tokens"),
            "must be at least 1"
        );
        assert!(message("clusters[1].retry_budget.window").contains("between 1s and 60s"));
    }

    #[test]
    fn a_status_beyond_u16_fails_conversion_naming_the_field() {
        let rc = route_configuration(api::VirtualHost {
            retry: Some(api::RetryPolicy {
                codes: vec![503, 70_000],
                ..Default::default()
            }),
            routes: vec![forward_route("r")],
            ..Default::default()
        });
        let err = route_config(&rc).unwrap_err().to_string();
        assert_eq!(
            err,
            r#"route config "rc": virtual_hosts[0]: retry.codes[1]: 70000 is not an HTTP status (100 to 599)"#
        );
    }

    /// One set of defaults for both feeds: a cluster, a route configuration, an HTTP listener
    /// and a TCP listener left empty in a bootstrap file and left empty on the wire validate to
    /// equal values.
    #[test]
    fn empty_yaml_and_empty_proto_give_equal_configs() {
        let yaml = r#"
listeners:
  - { name: http, address: "127.0.0.1:0", route_config: rc }
  - { name: tcp, address: "127.0.0.1:0", protocol: tcp, cluster: c }
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - name: r
            forward: { cluster: c }
clusters:
  - { name: c }
"#;
        let from_file = validate::validate(file::parse(yaml).unwrap()).unwrap();
        let rc = route_configuration(api::VirtualHost {
            routes: vec![forward_route("r")],
            ..Default::default()
        });
        let from_wire = validated(
            &[
                http_listener(api::HttpListener {
                    route_config: "rc".into(),
                    ..Default::default()
                }),
                tcp_listener(None),
            ],
            &rc,
            &[cluster_named("c")],
        )
        .unwrap();
        assert_eq!(from_wire.clusters, from_file.clusters);
        assert_eq!(from_wire.route_configs, from_file.route_configs);
        assert_eq!(from_wire.listeners, from_file.listeners);
    }
    #[test]
    fn tls_fields_reach_the_bootstrap_types_by_secret_name() {
        let tls = api::ListenerTls {
            certificates: vec![
                api::ServerCertificate {
                    server_names: vec!["a.example".into(), "*.b.example".into()],
                    secret: "ns/a".into(),
                },
                api::ServerCertificate {
                    server_names: vec![],
                    secret: "ns/default".into(),
                },
            ],
            unknown_server_name: api::UnknownServerName::Refuse as i32,
            alpn: Some(api::AlpnProtocols {
                protocols: vec!["http/1.1".into()],
            }),
            min_version: api::TlsVersion::Tls13 as i32,
            client_certificate: Some(api::ClientCertificateValidation {
                mode: api::ClientCertificateMode::Optional as i32,
                ca_secret: "ns/ca".into(),
            }),
        };
        let l = api::Listener {
            max_connections: None,
            name: "l".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Tcp(api::TcpProxy {
                cluster: "c".into(),
                tls: Some(tls),
                ..Default::default()
            })),
        };
        assert_eq!(listener_secrets(&l), ["ns/a", "ns/default", "ns/ca"]);
        let t = listener(&l).unwrap().tls.expect("tls");
        let certs: Vec<(Vec<String>, Option<String>, Option<String>)> = t
            .certificates
            .iter()
            .map(|c| {
                (
                    c.server_names.clone(),
                    c.source.secret.clone(),
                    c.source.cert_file.clone(),
                )
            })
            .collect();
        assert_eq!(
            certs,
            [
                (
                    vec!["a.example".to_owned(), "*.b.example".to_owned()],
                    Some("ns/a".to_owned()),
                    None
                ),
                (vec![], Some("ns/default".to_owned()), None),
            ]
        );
        assert_eq!(t.unknown_server_name.as_deref(), Some("refuse"));
        assert_eq!(t.alpn, Some(vec!["http/1.1".to_owned()]));
        assert_eq!(t.min_version.as_deref(), Some("1.3"));
        let cc = t.client_certificate.expect("client certificate");
        assert_eq!(
            (cc.mode.as_deref(), cc.ca_secret.as_deref(), cc.ca_file),
            (Some("optional"), Some("ns/ca"), None)
        );

        // Unset enums are the defaults; values this proxy does not know reach the validator.
        let plain = listener_tls(&api::ListenerTls {
            min_version: 42,
            ..Default::default()
        });
        assert_eq!(plain.unknown_server_name, None);
        assert_eq!(plain.alpn, None);
        assert_eq!(plain.min_version.as_deref(), Some("unknown"));

        let c = api::Cluster {
            name: "c".into(),
            tls: Some(api::UpstreamTls {
                sni: "api.internal".into(),
                ca_secret: "configmap/ns/ca".into(),
                client_certificate_secret: "ns/client".into(),
                subject_alt_names: vec!["alt.internal".into()],
                verify_subject_alt_names: vec![
                    api::SubjectAltName {
                        kind: Some(api::subject_alt_name::Kind::Hostname("api.svc".into())),
                    },
                    api::SubjectAltName {
                        kind: Some(api::subject_alt_name::Kind::Uri("spiffe://td/x".into())),
                    },
                ],
            }),
            ..Default::default()
        };
        assert_eq!(cluster_secrets(&c), ["configmap/ns/ca", "ns/client"]);
        let t = cluster(&c, None).tls.expect("tls");
        assert_eq!(t.sni.as_deref(), Some("api.internal"));
        assert_eq!(t.ca_secret.as_deref(), Some("configmap/ns/ca"));
        assert_eq!(
            t.client_certificate.and_then(|s| s.secret).as_deref(),
            Some("ns/client")
        );
        assert_eq!(t.subject_alt_names, ["alt.internal"]);
        assert_eq!(
            t.verify_subject_alt_names
                .iter()
                .map(|n| (n.hostname.as_deref(), n.uri.as_deref()))
                .collect::<Vec<_>>(),
            [(Some("api.svc"), None), (None, Some("spiffe://td/x"))]
        );
        let system_roots = cluster(
            &api::Cluster {
                name: "c".into(),
                tls: Some(api::UpstreamTls::default()),
                ..Default::default()
            },
            None,
        )
        .tls
        .expect("tls");
        assert_eq!((system_roots.sni, system_roots.ca_secret), (None, None));
    }

    #[test]
    fn a_capture_listener_on_the_wire_reaches_the_validated_config() {
        let listener = api::Listener {
            name: "inbound".into(),
            address: "0.0.0.0:15006".into(),
            kind: Some(api::listener::Kind::Capture(api::CaptureListener {
                direction: api::CaptureDirection::Inbound as i32,
                mtls: api::InboundMtls::Permissive as i32,
                services: vec![
                    api::CapturedService {
                        ip: String::new(),
                        port: 8080,
                        cluster: "a".into(),
                        protocol: api::AppProtocol::Http as i32,
                        route_config: "rc".into(),
                    },
                    api::CapturedService {
                        ip: "fd00::1".into(),
                        port: 5432,
                        cluster: "a".into(),
                        protocol: api::AppProtocol::Tcp as i32,
                        route_config: String::new(),
                    },
                ],
                unknown_destination: api::UnknownDestination::Block as i32,
                detection_timeout_ms: 300,
                idle_timeout_ms: 0,
            })),
            max_connections: None,
        };
        let f = file::File {
            listeners: vec![listener_of(&listener)],
            route_configs: vec![
                route_config(&route_configuration(api::VirtualHost {
                    name: "vh".into(),
                    domains: vec!["*".into()],
                    routes: vec![forward_route("a")],
                    ..Default::default()
                }))
                .unwrap(),
            ],
            clusters: vec![
                cluster(&cluster_named("a"), None),
                cluster(&cluster_named("c"), None),
            ],
            ..Default::default()
        };
        let config = validate::validate(f).unwrap();
        let model::ListenerKind::Capture(c) = &config.listeners[0].kind else {
            panic!("{:?}", config.listeners[0].kind);
        };
        assert_eq!(c.direction, model::CaptureDirection::Inbound);
        assert_eq!(c.unknown_destination, model::UnknownDestination::Block);
        assert_eq!(c.detection_timeout, Duration::from_millis(300));
        assert_eq!(c.idle_timeout, Duration::from_secs(3600));
        assert_eq!(
            c.services[..],
            [
                model::CapturedService {
                    ip: None,
                    port: 8080,
                    cluster: "a".into(),
                    protocol: model::AppProtocol::Http,
                    route_config: Some("rc".into()),
                },
                model::CapturedService {
                    ip: Some("fd00::1".parse().unwrap()),
                    port: 5432,
                    cluster: "a".into(),
                    protocol: model::AppProtocol::Tcp,
                    route_config: None,
                },
            ]
        );

        // Values this proxy does not know are refused by the validator, naming the field.
        let mut odd = listener.clone();
        if let Some(api::listener::Kind::Capture(c)) = &mut odd.kind {
            c.direction = 7;
            c.services[0].protocol = 9;
        }
        let err = validate::check_listener(&listener_of(&odd))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("direction: \"unknown (7)\" is not one of"),
            "{err}"
        );
        assert!(
            err.contains("services[0].protocol: \"unknown (9)\" is not one of"),
            "{err}"
        );
    }

    #[test]
    fn endpoint_identities_and_inbound_mtls_on_the_wire_reach_the_model() {
        let cla = |identity: &str| api::ClusterLoadAssignment {
            cluster_name: "a".into(),
            endpoints: vec![
                api::Endpoint {
                    address: "10.0.0.1:8080".into(),
                    weight: 1,
                    health: api::EndpointHealth::Ready as i32,
                    identity: identity.into(),
                },
                api::Endpoint {
                    address: "10.0.0.2:8080".into(),
                    weight: 1,
                    health: api::EndpointHealth::Ready as i32,
                    identity: String::new(),
                },
            ],
        };
        let checked = validate::check_cluster(&cluster(
            &cluster_named("a"),
            Some(&cla("spiffe://cluster.local/ns/shop/sa/b")),
        ))
        .unwrap();
        assert_eq!(
            checked.endpoints[0].identity,
            Some(crate::identity::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/b").unwrap())
        );
        assert_eq!(checked.endpoints[1].identity, None, "empty: not meshed");
        let err = crate::config::xds::check::endpoints("a", &cla("spiffe://Cluster/x"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("endpoints[0].identity"), "{err}");
        assert!(err.contains("spiffe://Cluster/x"), "{err}");

        let inbound = |mtls: api::InboundMtls| api::Listener {
            name: "inbound".into(),
            address: "0.0.0.0:15006".into(),
            kind: Some(api::listener::Kind::Capture(api::CaptureListener {
                direction: api::CaptureDirection::Inbound as i32,
                mtls: mtls as i32,
                ..Default::default()
            })),
            max_connections: None,
        };
        for (wire, want) in [
            (api::InboundMtls::Strict, model::InboundMtls::Strict),
            (api::InboundMtls::Permissive, model::InboundMtls::Permissive),
        ] {
            let checked = validate::check_listener(&listener_of(&inbound(wire))).unwrap();
            let model::ListenerKind::Capture(c) = &checked.kind else {
                panic!("{:?}", checked.kind);
            };
            assert_eq!(c.mtls, want);
        }
        let mut odd = inbound(api::InboundMtls::Strict);
        if let Some(api::listener::Kind::Capture(c)) = &mut odd.kind {
            c.mtls = 5;
        }
        let err = validate::check_listener(&listener_of(&odd))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mtls: \"unknown (5)\" is not one of"), "{err}");
    }

    fn listener_of(l: &api::Listener) -> file::Listener {
        super::listener(l).unwrap()
    }
}
