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

pub fn listener(l: &api::Listener) -> Result<file::Listener, ConvertError> {
    use api::listener::Kind;
    let mut out = file::Listener {
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
    };
    match &l.kind {
        Some(Kind::Http(h)) => {
            out.protocol = "http".into();
            out.route_config = Some(h.route_config.clone());
        }
        Some(Kind::Tcp(t)) => {
            out.protocol = "tcp".into();
            out.cluster = Some(t.cluster.clone());
            out.idle_timeout = ms(t.idle_timeout_ms);
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
        }
        None => {
            return Err(ConvertError {
                resource: format!("listener {:?}", l.name),
                message: "kind: one of http, tcp and tls_passthrough must be set".into(),
            });
        }
    }
    Ok(out)
}

pub fn route_config(rc: &api::RouteConfiguration) -> Result<file::RouteConfig, ConvertError> {
    let virtual_hosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(vi, vh)| {
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .map(|(ri, r)| {
                    route(r).map_err(|message| ConvertError {
                        resource: format!(
                            "route configuration {:?}: virtual_hosts[{vi}].routes[{ri}]",
                            rc.name
                        ),
                        message,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(file::VirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.clone(),
                routes,
                retry: None,
                rate_limit: None,
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
        retry: r.retry.as_ref().map(retry),
        rate_limit: None,
    })
}

/// An HTTPRoute-style retry: attempts, statuses, backoff; the other fields keep their defaults.
fn retry(r: &api::RetryPolicy) -> file::Retry {
    file::Retry {
        attempts: Some(r.attempts),
        status_codes: r
            .codes
            .iter()
            .map(|c| (*c).min(u32::from(u16::MAX)) as u16)
            .collect(),
        backoff: (r.backoff_ms > 0).then(|| file::Backoff {
            base: Some(format!("{}ms", r.backoff_ms)),
            max: None,
        }),
        ..Default::default()
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
    // Unset means round robin (see cluster.proto).
    lb.policy = Some(
        match c.lb.as_ref().and_then(|l| l.kind.as_ref()) {
            None | Some(lb_policy::Kind::RoundRobin(_)) => "round_robin",
            Some(lb_policy::Kind::Random(_)) => "random",
            Some(lb_policy::Kind::LeastRequest(_)) => "least_request",
            Some(lb_policy::Kind::PeakEwma(p)) => {
                lb.decay = ms(p.decay_ms);
                "peak_ewma"
            }
            Some(lb_policy::Kind::RingHash(r)) => {
                lb.hash_key = key(&r.key);
                lb.min_ring_size = (r.min_ring_size != 0).then_some(r.min_ring_size);
                "ring_hash"
            }
            Some(lb_policy::Kind::Maglev(m)) => {
                lb.hash_key = key(&m.key);
                lb.table_size = (m.table_size != 0).then_some(m.table_size);
                "maglev"
            }
        }
        .to_owned(),
    );
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
    // Unset means no passive health (see cluster.proto); an absent threshold disables it.
    let outlier_detection = Some(match &c.outlier_detection {
        None => file::OutlierDetection {
            enabled: false,
            consecutive_5xx: None,
            consecutive_gateway_errors: None,
            base_ejection_time: None,
            max_ejection_time: None,
            max_ejection_percent: None,
        },
        Some(o) => file::OutlierDetection {
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
                })
                .collect()
        })
        .unwrap_or_default();
    file::Cluster {
        name: c.name.clone(),
        protocol: protocol.into(),
        connect_timeout: ms(c.connect_timeout_ms),
        endpoints,
        lb,
        health_check,
        outlier_detection,
        panic_threshold: Some(c.panic_threshold_percent.min(255) as u8),
        idle_timeout: None,
        circuit_breakers: None,
        retry_budget: None,
    }
}
