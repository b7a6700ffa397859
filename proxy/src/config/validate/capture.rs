//! A `capture` listener: its direction, its table of services and what unknown destinations get.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use super::{Validator, file};
use crate::config::model::{
    AppProtocol, Capture, CaptureDirection, CapturedService, InboundMtls, UnknownDestination,
};

impl Validator {
    pub(super) fn capture(
        &mut self,
        path: &str,
        l: &file::Listener,
        route_configs: &HashSet<&str>,
        clusters: &HashSet<&str>,
        idle_timeout: Duration,
    ) -> Option<Capture> {
        let direction = match l.direction.as_deref() {
            None | Some("outbound") => CaptureDirection::Outbound,
            Some("inbound") => CaptureDirection::Inbound,
            Some(other) => {
                self.error(
                    format!("{path}.direction"),
                    format!("{other:?} is not one of outbound, inbound"),
                );
                CaptureDirection::Outbound
            }
        };
        let unknown_destination = match l.unknown_destination.as_deref() {
            None | Some("allow") => UnknownDestination::Allow,
            Some("block") => UnknownDestination::Block,
            Some(other) => {
                self.error(
                    format!("{path}.unknown_destination"),
                    format!("{other:?} is not one of allow, block"),
                );
                UnknownDestination::Allow
            }
        };
        let mtls = match l.mtls.as_deref() {
            None | Some("permissive") => InboundMtls::Permissive,
            Some("strict") => InboundMtls::Strict,
            Some(other) => {
                self.error(
                    format!("{path}.mtls"),
                    format!("{other:?} is not one of strict, permissive"),
                );
                InboundMtls::Permissive
            }
        };
        let detection_timeout = self.duration(
            &format!("{path}.detection_timeout"),
            l.detection_timeout.as_deref(),
            Capture::DEFAULT_DETECTION_TIMEOUT,
        );
        if detection_timeout.is_zero() {
            self.error(
                format!("{path}.detection_timeout"),
                "must be more than 0 (declare a port's protocol tcp to skip detection)",
            );
        }
        let mut seen: HashMap<(Option<IpAddr>, u16), usize> = HashMap::new();
        let services: Vec<CapturedService> = l
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let p = format!("{path}.services[{i}]");
                let service = self.captured_service(&p, s, route_configs, clusters)?;
                if let Some(first) = seen.insert((service.ip, service.port), i) {
                    self.error(
                        format!("{p}.port"),
                        format!(
                            "{} is listed twice (first at services[{first}])",
                            destination(&service)
                        ),
                    );
                }
                Some(service)
            })
            .collect();
        Some(Capture {
            direction,
            services: services.into(),
            unknown_destination,
            detection_timeout,
            idle_timeout,
            mtls,
        })
    }

    fn captured_service(
        &mut self,
        path: &str,
        s: &file::CapturedService,
        route_configs: &HashSet<&str>,
        clusters: &HashSet<&str>,
    ) -> Option<CapturedService> {
        let before = self.errors.len();
        let ip = match s.ip.as_str() {
            "" => None,
            text => match text.parse::<IpAddr>() {
                Ok(ip) => Some(ip.to_canonical()),
                Err(_) => {
                    self.error(
                        format!("{path}.ip"),
                        format!("{text:?} is not an IP address (leave it empty for any)"),
                    );
                    None
                }
            },
        };
        let port = match u16::try_from(s.port) {
            Ok(p) if p != 0 => p,
            _ => {
                self.error(
                    format!("{path}.port"),
                    format!("{} is not a port (1-65535)", s.port),
                );
                0
            }
        };
        if s.cluster.is_empty() {
            self.error(format!("{path}.cluster"), "must not be empty");
        } else {
            self.cluster_ref(&format!("{path}.cluster"), &s.cluster, clusters);
        }
        let protocol = match s.protocol.as_deref() {
            None => AppProtocol::Detect,
            Some(name) => AppProtocol::from_name(name).unwrap_or_else(|| {
                self.error(
                    format!("{path}.protocol"),
                    format!("{name:?} is not one of detect, http, http2, tcp, tls"),
                );
                AppProtocol::Detect
            }),
        };
        let route_config = match s.route_config.as_deref() {
            None => None,
            Some(rc) if matches!(protocol, AppProtocol::Tcp | AppProtocol::Tls) => {
                self.error(
                    format!("{path}.route_config"),
                    format!(
                        "does not apply to protocol {:?}: its bytes are not HTTP",
                        protocol.name()
                    ),
                );
                Some(Arc::from(rc))
            }
            Some(rc) if route_configs.contains(rc) => Some(Arc::from(rc)),
            Some(rc) => {
                self.error(
                    format!("{path}.route_config"),
                    format!("route config {rc:?} is not defined"),
                );
                None
            }
        };
        (self.errors.len() == before).then(|| CapturedService {
            ip,
            port,
            cluster: s.cluster.as_str().into(),
            protocol,
            route_config,
        })
    }
}

/// `10.96.0.10:80`, `[fd00::1]:80` or `*:80`.
fn destination(s: &CapturedService) -> String {
    match s.ip {
        None => format!("*:{}", s.port),
        Some(IpAddr::V4(ip)) => format!("{ip}:{}", s.port),
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", s.port),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use crate::config::{model::ListenerKind, validate::from_yaml};

    use super::*;

    const CLUSTERS: &str = "
route_configs:
  - name: web-routes
    virtual_hosts: [{ name: all, domains: ['*'], routes: [{ forward: { cluster: web } }] }]
clusters:
  - { name: web, endpoints: [127.0.0.1:9001] }
  - { name: db, endpoints: [127.0.0.1:9002] }
";

    fn capture(listener: &str) -> Result<Capture, String> {
        let yaml = format!("listeners:\n{listener}{CLUSTERS}");
        let config = from_yaml(&yaml).map_err(|e| e.to_string())?;
        match &config.listeners[0].kind {
            ListenerKind::Capture(c) => Ok(c.clone()),
            other => panic!("not a capture listener: {other:?}"),
        }
    }

    #[test]
    fn a_capture_listener_with_its_defaults() {
        let c = capture(
            "  - name: outbound
    address: 127.0.0.1:15001
    protocol: capture
    services:
      - { ip: 10.96.0.10, port: 80, cluster: web, protocol: http, route_config: web-routes }
      - { ip: 'fd00::10', port: 5432, cluster: db, protocol: tcp }
      - { port: 8080, cluster: web }
",
        )
        .unwrap();
        assert_eq!(c.direction, CaptureDirection::Outbound);
        assert_eq!(c.unknown_destination, UnknownDestination::Allow);
        assert_eq!(c.detection_timeout, Capture::DEFAULT_DETECTION_TIMEOUT);
        assert_eq!(c.idle_timeout, Duration::from_secs(3600));
        assert_eq!(
            c.services[0],
            CapturedService {
                ip: Some("10.96.0.10".parse().unwrap()),
                port: 80,
                cluster: "web".into(),
                protocol: AppProtocol::Http,
                route_config: Some("web-routes".into()),
            }
        );
        assert_eq!(c.services[1].protocol, AppProtocol::Tcp);
        assert_eq!(c.services[2].ip, None);
        assert_eq!(c.services[2].protocol, AppProtocol::Detect);
    }

    #[test]
    fn settings_are_read() {
        let c = capture(
            "  - name: inbound
    address: 0.0.0.0:15006
    protocol: capture
    direction: inbound
    unknown_destination: block
    detection_timeout: 250ms
    idle_timeout: 30s
",
        )
        .unwrap();
        assert_eq!(c.direction, CaptureDirection::Inbound);
        assert_eq!(c.unknown_destination, UnknownDestination::Block);
        assert_eq!(c.detection_timeout, Duration::from_millis(250));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert!(c.services.is_empty());
        assert_eq!(c.mtls, InboundMtls::Permissive);
    }

    #[test]
    fn inbound_mtls_is_read_and_a_bad_value_named() {
        let listener = |mtls: &str| {
            format!(
                "  - name: inbound
    address: 0.0.0.0:15006
    protocol: capture
    direction: inbound
    mtls: {mtls}
"
            )
        };
        assert_eq!(
            capture(&listener("strict")).unwrap().mtls,
            InboundMtls::Strict
        );
        assert_eq!(
            capture(&listener("permissive")).unwrap().mtls,
            InboundMtls::Permissive
        );
        let err = capture(&listener("sometimes")).unwrap_err();
        assert!(
            err.contains("listeners[0].mtls: \"sometimes\" is not one of strict, permissive"),
            "{err}"
        );
        let err = from_yaml(&format!(
            "listeners:
  - name: web
    address: 127.0.0.1:8080
    route_config: web-routes
    mtls: strict
{CLUSTERS}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listeners[0].mtls: does not apply to a \"http\" listener"),
            "{err}"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let err = capture(
            "  - name: outbound
    address: 127.0.0.1:15001
    protocol: capture
    direction: sideways
    unknown_destination: drop
    detection_timeout: 0s
    route_config: web-routes
    services:
      - { ip: 10.96.0.300, port: 80, cluster: web }
      - { ip: 10.96.0.10, port: 0, cluster: web }
      - { ip: 10.96.0.10, port: 70000, cluster: web }
      - { ip: 10.96.0.10, port: 80, cluster: nowhere }
      - { ip: 10.96.0.10, port: 81, cluster: web, route_config: missing }
      - { ip: 10.96.0.10, port: 82, cluster: web, protocol: smtp }
      - { ip: 10.96.0.10, port: 83, cluster: db, protocol: tcp, route_config: web-routes }
      - { ip: 10.96.0.11, port: 84, cluster: web }
      - { ip: 10.96.0.11, port: 84, cluster: db }
      - { port: 85, cluster: '' }
",
        )
        .unwrap_err();
        let expected = [
            "listeners[0].route_config: does not apply to a \"capture\" listener",
            "listeners[0].direction: \"sideways\" is not one of outbound, inbound",
            "listeners[0].unknown_destination: \"drop\" is not one of allow, block",
            "listeners[0].detection_timeout: must be more than 0",
            "listeners[0].services[0].ip: \"10.96.0.300\" is not an IP address",
            "listeners[0].services[1].port: 0 is not a port (1-65535)",
            "listeners[0].services[2].port: 70000 is not a port (1-65535)",
            "listeners[0].services[3].cluster: cluster \"nowhere\" is not defined",
            "listeners[0].services[4].route_config: route config \"missing\" is not defined",
            "listeners[0].services[5].protocol: \"smtp\" is not one of detect",
            "listeners[0].services[6].route_config: does not apply to protocol \"tcp\"",
            "listeners[0].services[8].port: 10.96.0.11:84 is listed twice (first at services[7])",
            "listeners[0].services[9].cluster: must not be empty",
        ];
        for e in expected {
            assert!(err.contains(e), "missing {e:?} in:\n{err}");
        }
        assert_eq!(err.lines().count(), expected.len(), "{err}");
    }

    #[test]
    fn capture_fields_on_another_listener_are_refused() {
        let err = from_yaml(&format!(
            "listeners:
  - name: web
    address: 127.0.0.1:8080
    route_config: web-routes
    direction: inbound
    services: [{{ port: 80, cluster: web }}]
{CLUSTERS}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listeners[0].direction: does not apply to a \"http\" listener"),
            "{err}"
        );
        assert!(
            err.contains("listeners[0].services: does not apply to a \"http\" listener"),
            "{err}"
        );
    }

    fn table(entries: &[(&str, u16, &str)]) -> Capture {
        Capture {
            direction: CaptureDirection::Outbound,
            services: entries
                .iter()
                .map(|(ip, port, cluster)| CapturedService {
                    ip: (!ip.is_empty()).then(|| ip.parse().unwrap()),
                    port: *port,
                    cluster: (*cluster).into(),
                    protocol: AppProtocol::Detect,
                    route_config: None,
                })
                .collect(),
            unknown_destination: UnknownDestination::Allow,
            detection_timeout: Capture::DEFAULT_DETECTION_TIMEOUT,
            idle_timeout: Duration::from_secs(1),
            mtls: InboundMtls::Permissive,
        }
    }

    #[test]
    fn lookup_takes_the_first_entry_whose_ip_and_port_match() {
        let t = table(&[
            ("10.96.0.10", 80, "exact"),
            ("", 80, "any-ip"),
            ("10.96.0.10", 443, "tls"),
            ("fd00::10", 80, "v6"),
            ("10.96.0.10", 80, "shadowed"),
        ]);
        let cases: [(&str, Option<(usize, &str)>); 7] = [
            ("10.96.0.10:80", Some((0, "exact"))),
            ("10.96.0.11:80", Some((1, "any-ip"))),
            ("10.96.0.10:443", Some((2, "tls"))),
            ("10.96.0.11:443", None),
            ("[fd00::10]:80", Some((1, "any-ip"))),
            ("[::ffff:10.96.0.10]:80", Some((0, "exact"))),
            ("10.96.0.10:8080", None),
        ];
        for (dest, want) in cases {
            let dest: SocketAddr = dest.parse().unwrap();
            let got = t.find(dest).map(|(i, s)| (i, &*s.cluster));
            assert_eq!(got, want, "{dest}");
        }
        let v6_first = table(&[("fd00::10", 80, "v6"), ("", 80, "any-ip")]);
        assert_eq!(
            v6_first
                .find("[fd00::10]:80".parse().unwrap())
                .map(|(i, _)| i),
            Some(0)
        );
    }
}
