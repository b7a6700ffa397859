//! `GET /metrics` on the controller's admin endpoint: the status report as Prometheus gauges, so
//! the same dashboards that watch the proxies can see which of them are behind.

use std::fmt::Write;

use crate::status::{StatusReport, TypeStatus};

/// A per-proxy, per-type gauge: name, help, and how to read it from the status.
type PerType = (&'static str, &'static str, fn(&TypeStatus) -> u64);

/// Renders the Prometheus text exposition format (version 0.0.4).
pub fn render(report: &StatusReport, ready: bool) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    family(
        &mut out,
        "trellis_control_ready",
        "1 once the first scan of the manifests is done.",
    );
    let _ = writeln!(out, "trellis_control_ready {}", u8::from(ready));

    family(
        &mut out,
        "trellis_control_source_errors",
        "Manifest files currently rejected (serving their last good content).",
    );
    let _ = writeln!(
        out,
        "trellis_control_source_errors {}",
        report.source_errors.len()
    );

    family(
        &mut out,
        "trellis_control_object_problems",
        "Parts of objects the controller cannot use, by kind and reason (no series: none).",
    );
    let mut problems = std::collections::BTreeMap::<(&str, &str), usize>::new();
    for d in report
        .problems
        .iter()
        .chain(report.proxies.iter().flat_map(|p| &p.problems))
    {
        *problems.entry((&d.kind, &d.reason)).or_default() += 1;
    }
    for ((kind, reason), n) in problems {
        let _ = writeln!(
            out,
            "trellis_control_object_problems{{kind=\"{}\",reason=\"{}\"}} {n}",
            escape(kind),
            escape(reason)
        );
    }

    family(
        &mut out,
        "trellis_control_connected_proxies",
        "Proxies with an open discovery stream.",
    );
    let mut by_role = std::collections::BTreeMap::<&str, usize>::new();
    for p in &report.proxies {
        *by_role.entry(p.role.as_str()).or_default() += 1;
    }
    for (role, n) in by_role {
        let _ = writeln!(
            out,
            "trellis_control_connected_proxies{{role=\"{}\"}} {n}",
            escape(role)
        );
    }

    let per_type: [PerType; 6] = [
        (
            "trellis_control_acked_resources",
            "Resources the proxy has ACKed.",
            |t| t.acked.len() as u64,
        ),
        (
            "trellis_control_pending_resources",
            "Resources sent and not yet ACKed.",
            |t| t.pending as u64,
        ),
        (
            "trellis_control_held_back_resources",
            "Changes waiting for the ordering rules.",
            |t| t.held_back as u64,
        ),
        (
            "trellis_control_nacked",
            "1 when the proxy's last answer for the type was a NACK.",
            |t| u64::from(t.nacked),
        ),
        (
            "trellis_control_refused_resources",
            "Resources the proxy refused and has not taken a later version of.",
            |t| t.refused.len() as u64,
        ),
        (
            "trellis_control_stale_requests_ignored",
            "Requests ignored for a stale nonce.",
            |t| t.stale_ignored,
        ),
    ];
    for (name, help, value) in per_type {
        family(&mut out, name, help);
        for p in &report.proxies {
            for (type_name, t) in &p.types {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{}\",type=\"{}\"}} {}",
                    escape(&p.node_id),
                    escape(type_name),
                    value(t)
                );
            }
        }
    }
    identity(&mut out);
    out
}

/// The CA's counters (zeros when the controller runs no CA).
fn identity(out: &mut String) {
    let (issued, refused) = crate::identity::metrics::snapshot();
    let _ = writeln!(
        out,
        "# HELP trellis_control_identity_issued_total Workload certificates issued.\n\
         # TYPE trellis_control_identity_issued_total counter\n\
         trellis_control_identity_issued_total {issued}"
    );
    let _ = writeln!(
        out,
        "# HELP trellis_control_identity_refused_total Certificate requests refused, by reason: \
         unauthenticated, permission_denied, invalid_request, unavailable.\n\
         # TYPE trellis_control_identity_refused_total counter"
    );
    for (reason, n) in refused {
        let _ = writeln!(
            out,
            "trellis_control_identity_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Nack, ProxyStatus};

    #[test]
    fn renders_proxies_and_their_lag() {
        let mut types = std::collections::BTreeMap::new();
        types.insert(
            "routes".to_owned(),
            TypeStatus {
                pending: 2,
                nacked: true,
                last_nack: Some(Nack {
                    nonce: "7".into(),
                    message: "bad".into(),
                    at_unix_ms: 0,
                }),
                ..Default::default()
            },
        );
        let report = StatusReport {
            proxies: vec![ProxyStatus {
                node_id: "gw\"1".into(),
                role: "gateway".into(),
                types,
                ..Default::default()
            }],
            source_errors: vec![],
            problems: vec![
                crate::diagnostics::Diagnostic::failed(
                    "HTTPRoute",
                    "shop",
                    "r",
                    None,
                    "ResolvedRefs",
                    "BackendNotFound",
                    String::new(),
                );
                2
            ],
        };
        let text = render(&report, true);
        assert!(text.contains("trellis_control_ready 1\n"), "{text}");
        assert!(text.contains("trellis_control_connected_proxies{role=\"gateway\"} 1\n"));
        assert!(
            text.contains(
                "trellis_control_pending_resources{node=\"gw\\\"1\",type=\"routes\"} 2\n"
            )
        );
        assert!(text.contains("trellis_control_nacked{node=\"gw\\\"1\",type=\"routes\"} 1\n"));
        assert!(text.contains(
            "trellis_control_object_problems{kind=\"HTTPRoute\",reason=\"BackendNotFound\"} 2\n"
        ));
        assert!(text.contains("# TYPE trellis_control_identity_issued_total counter\n"));
        assert!(
            text.contains("trellis_control_identity_refused_total{reason=\"permission_denied\"} ")
        );
    }
}
