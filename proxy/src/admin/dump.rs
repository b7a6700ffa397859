//! The JSON behind `/config_dump` and `/clusters`. The typed config stays free of serde (it is
//! plain data for the proxy); this is its one outward rendering, with secrets redacted.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::config::{
    Compiled,
    model::{
        AccessLog, Action, CaSource, CertificateSource, ClientCertificateMode, Cluster,
        DomainMatch, HeaderEdits, Listener, ListenerKind, PathMatch, PathRewrite, RouteConfig,
        ServerTls, SubjectAltName, TlsVersion, UnknownServerName, UpstreamProtocol, UpstreamTls,
        UpstreamTrust, ValueMatch,
    },
};

/// Field names whose values never leave the process.
const SECRET_FIELDS: &[&str] = &["private_key", "key_pem", "password", "secret", "token"];

/// The configuration in force, with its version.
pub fn config_dump(compiled: &Compiled) -> Value {
    let c = &compiled.config;
    let mut v = json!({
        "version": compiled.version,
        "listeners": c.listeners.iter().map(listener).collect::<Vec<_>>(),
        "route_configs": c.route_configs.iter().map(route_config).collect::<Vec<_>>(),
        "clusters": c.clusters.iter().map(cluster).collect::<Vec<_>>(),
    });
    redact(&mut v);
    v
}

/// Replaces the value of every secret-looking field, at any depth.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if SECRET_FIELDS.iter().any(|s| k.contains(s)) {
                    *v = Value::String("[redacted]".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn listener(l: &Listener) -> Value {
    let mut v = json!({
        "name": &*l.name,
        "address": l.address.to_string(),
        "access_log": match &l.access_log {
            None => Value::Null,
            Some(AccessLog::Stdout) => "stdout".into(),
            Some(AccessLog::File(p)) => p.display().to_string().into(),
        },
        "max_connections": l.max_connections,
    });
    let kind = match &l.kind {
        ListenerKind::Http {
            route_config, tls, ..
        } => json!({
            "protocol": "http",
            "route_config": &**route_config,
            "tls": tls.as_ref().map(server_tls),
        }),
        ListenerKind::Tcp(t) => json!({
            "protocol": "tcp",
            "cluster": &*t.cluster,
            "idle_timeout_ms": t.idle_timeout.as_millis() as u64,
            "tls": t.tls.as_ref().map(server_tls),
        }),
        ListenerKind::TlsPassthrough(s) => json!({
            "protocol": "tls_passthrough",
            "sni": s.routes.iter().map(|r| json!({
                "server_names": r.server_names.iter().map(domain).collect::<Vec<_>>(),
                "cluster": &*r.cluster,
            })).collect::<Vec<_>>(),
            "default_cluster": s.default_cluster.as_deref(),
            "idle_timeout_ms": s.idle_timeout.as_millis() as u64,
        }),
        ListenerKind::Capture(c) => json!({
            "protocol": "capture",
            "direction": c.direction.name(),
            "services": c.services.iter().map(|s| json!({
                "ip": s.ip.map(|ip| ip.to_string()),
                "port": s.port,
                "cluster": &*s.cluster,
                "protocol": s.protocol.name(),
                "route_config": s.route_config.as_deref(),
            })).collect::<Vec<_>>(),
            "unknown_destination": c.unknown_destination.name(),
            "detection_timeout_ms": c.detection_timeout.as_millis() as u64,
            "idle_timeout_ms": c.idle_timeout.as_millis() as u64,
        }),
    };
    merge(&mut v, kind);
    v
}

/// A listener's TLS: where each certificate and the client CAs come from (file paths or secret
/// names, as values: a key named `secret` would be redacted), never the PEM itself.
fn server_tls(t: &ServerTls) -> Value {
    json!({
        "certificates": t.certificates.iter().map(|c| json!({
            "server_names": c.server_names.iter().map(|n| &**n).collect::<Vec<_>>(),
            "source": match &c.source {
                CertificateSource::Files { cert_file, key_file } => format!(
                    "files {}, {}",
                    cert_file.display(),
                    key_file.display()
                ),
                CertificateSource::Secret(name) => format!("secret {name}"),
            },
        })).collect::<Vec<_>>(),
        "unknown_server_name": match t.unknown_server_name {
            UnknownServerName::Default => "default",
            UnknownServerName::Refuse => "refuse",
        },
        "alpn": t.alpn.iter().map(|a| &**a).collect::<Vec<_>>(),
        "min_version": match t.min_version {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        },
        "client_certificate": t.client_certificate.as_ref().map(|c| json!({
            "mode": match c.mode {
                ClientCertificateMode::Require => "require",
                ClientCertificateMode::Optional => "optional",
            },
            "ca": match &c.ca {
                CaSource::File(path) => format!("file {}", path.display()),
                CaSource::Secret(name) => format!("secret {name}"),
            },
        })),
    })
}

fn route_config(rc: &RouteConfig) -> Value {
    json!({
        "name": &*rc.name,
        "virtual_hosts": rc.virtual_hosts.iter().map(|vh| json!({
            "name": &*vh.name,
            "domains": vh.domains.iter().map(domain).collect::<Vec<_>>(),
            "routes": vh.routes.iter().map(|r| json!({
                "name": &*r.name,
                "match": {
                    "path": match &r.matcher.path {
                        PathMatch::Exact(p) => json!({ "exact": &**p }),
                        PathMatch::Prefix(p) => json!({ "prefix": &**p }),
                        PathMatch::Template(p) => json!({ "template": &**p }),
                        PathMatch::Regex(p) => json!({ "regex": p.0.as_str() }),
                    },
                    "method": r.matcher.method.as_ref().map(|m| m.as_str()),
                    "headers": r.matcher.headers.iter()
                        .map(|h| json!({ "name": h.name.as_str(), "value": value_match(&h.value) }))
                        .collect::<Vec<_>>(),
                    "query": r.matcher.query.iter()
                        .map(|q| json!({ "name": &*q.name, "value": value_match(&q.value) }))
                        .collect::<Vec<_>>(),
                },
                "action": action(&r.action),
                "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
                "upgrades": r.upgrades.iter().map(|u| &**u).collect::<Vec<_>>(),
                "filters": {
                    "request_headers": edits(&r.filters.request_headers),
                    "response_headers": edits(&r.filters.response_headers),
                    "rewrite": r.filters.rewrite.as_ref().map(|rw| json!({
                        "path": rw.path.as_ref().map(rewrite),
                        "host": rw.host.as_ref().and_then(|h| h.to_str().ok()),
                    })),
                },
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn cluster(c: &Cluster) -> Value {
    json!({
        "name": &*c.name,
        "protocol": protocol(c.protocol),
        "connect_timeout_ms": c.connect_timeout.as_millis() as u64,
        "endpoints": c.endpoints.iter()
            .map(|e| json!({ "address": e.address.to_string(), "weight": e.weight }))
            .collect::<Vec<_>>(),
        // These nest several enums; their debug form is exact and stays readable.
        "lb": format!("{:?}", c.lb),
        "health_check": c.health_check.as_ref().map(|h| format!("{h:?}")),
        "outlier_detection": c.outlier_detection.as_ref().map(|o| format!("{o:?}")),
        "panic_threshold_percent": c.panic_threshold_percent,
        "tls": c.tls.as_ref().map(upstream_tls),
    })
}

/// Where the TLS material came from, never the material: the CA bundle is public but long, and
/// the key is shown only as redacted.
fn upstream_tls(t: &UpstreamTls) -> Value {
    json!({
        "sni": t.sni.as_deref(),
        "ca": match &t.trust {
            UpstreamTrust::System => "system",
            UpstreamTrust::Bundle { source, .. } => &**source,
        },
        "client_certificate": t.client_certificate.as_ref().map(|c| json!({
            "source": &*c.source,
            "private_key": "[redacted]",
        })),
        "subject_alt_names": t.subject_alt_names.iter().map(|n| &**n).collect::<Vec<_>>(),
        "verify_subject_alt_names": t.verify_subject_alt_names.iter().map(|n| match n {
            SubjectAltName::Hostname(h) => json!({ "hostname": &**h }),
            SubjectAltName::Uri(u) => json!({ "uri": &**u }),
        }).collect::<Vec<_>>(),
    })
}

/// Every cluster in force with its endpoints' live state.
pub fn clusters(compiled: &Compiled) -> Value {
    let mut clusters: Vec<_> = compiled.clusters.values().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    json!({
        "version": compiled.version,
        "clusters": clusters.iter().map(|c| json!({
            "name": &*c.name,
            "protocol": protocol(c.protocol),
            "panic_picks": c.stats.panic_picks.load(Ordering::Relaxed),
            "ejections_total": c.stats.ejections_total.load(Ordering::Relaxed),
            "circuit_breakers": json!({
                "open_connections": c.breakers.open_connections(),
                "pending_requests": c.breakers.pending_requests(),
                "active_requests": c.breakers.active_requests(),
                "active_retries": c.breakers.active_retries(),
            }),
            "endpoints": c.endpoints.iter().map(|e| json!({
                "address": e.address.to_string(),
                "weight": e.weight,
                "healthy": e.state.is_healthy(),
                "ejected": e.state.is_ejected(),
                "ejections": e.state.ejections(),
                "active_requests": e.state.active(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn protocol(p: UpstreamProtocol) -> &'static str {
    match p {
        UpstreamProtocol::Http1 => "http1",
        UpstreamProtocol::Http2 => "http2",
    }
}

fn domain(d: &DomainMatch) -> String {
    match d {
        DomainMatch::Exact(n) => n.to_string(),
        DomainMatch::Suffix(s) => format!("*{s}"),
        DomainMatch::Any => "*".into(),
    }
}

fn value_match(v: &ValueMatch) -> Value {
    match v {
        ValueMatch::Exact(s) => json!({ "exact": &**s }),
        ValueMatch::Regex(p) => json!({ "regex": p.0.as_str() }),
        ValueMatch::Present => json!({ "present": true }),
        ValueMatch::Absent => json!({ "present": false }),
    }
}

fn rewrite(p: &PathRewrite) -> Value {
    match p {
        PathRewrite::Full(p) => json!({ "path": &**p }),
        PathRewrite::Prefix(p) => json!({ "prefix": &**p }),
    }
}

fn action(a: &Action) -> Value {
    match a {
        Action::Forward(targets) => json!({
            "forward": targets.iter()
                .map(|t| json!({ "cluster": &*t.cluster, "weight": t.weight }))
                .collect::<Vec<_>>(),
        }),
        Action::Redirect(r) => json!({
            "redirect": {
                "scheme": r.scheme.map(|s| s.as_str()),
                "host": r.host.as_deref(),
                "port": r.port,
                "path": r.path.as_ref().map(rewrite),
                "status": r.status.as_u16(),
            }
        }),
        Action::DirectResponse(d) => json!({
            "direct_response": {
                "status": d.status.as_u16(),
                "body_bytes": d.body.len(),
            }
        }),
    }
}

fn edits(e: &HeaderEdits) -> Value {
    let pairs = |list: &[(http::HeaderName, http::HeaderValue)]| {
        list.iter()
            .map(|(n, v)| {
                let value = if sensitive_header(n.as_str()) {
                    "[redacted]"
                } else {
                    v.to_str().unwrap_or("")
                };
                json!({ "name": n.as_str(), "value": value })
            })
            .collect::<Vec<_>>()
    };
    json!({
        "set": pairs(&e.set),
        "add": pairs(&e.add),
        "remove": e.remove.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
    })
}

/// Header names whose configured values are credentials; their values are never dumped.
fn sensitive_header(name: &str) -> bool {
    // Header names are lowercase already (http::HeaderName).
    matches!(
        name,
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || ["token", "secret", "key", "password"]
        .iter()
        .any(|s| name.contains(s))
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let mut v = json!({
            "tls": [{ "cert_pem": "CERT", "private_key": "KEY" }],
            "name": "x",
            "auth": { "token": "t" },
        });
        redact(&mut v);
        assert_eq!(v["tls"][0]["private_key"], "[redacted]");
        assert_eq!(v["tls"][0]["cert_pem"], "CERT");
        assert_eq!(v["auth"]["token"], "[redacted]");
        assert_eq!(v["name"], "x");
    }
}
