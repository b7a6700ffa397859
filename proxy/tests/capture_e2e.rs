//! Capture listeners on loopback. A connection made straight to a capture listener has no NAT
//! entry, so its original destination is the listener's own address (as in Envoy): a service
//! table listing `127.0.0.1:<the listener's port>` makes a plain client reach that entry's
//! cluster through protocol detection, as a redirected one would.

mod common;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use trellis_proxy::{Proxy, config::validate};

/// Speaks first with a banner, then echoes: a server-speaks-first protocol (SMTP, MySQL).
async fn banner_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 banner\n").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Capture listeners, each on 127.0.0.1:0, by name → (its service entry's YAML fields without
/// ip and port, or `None` for no entry, and its own settings).
struct Setup {
    listeners: Vec<(&'static str, Option<&'static str>, String)>,
    clusters: String,
    route_configs: &'static str,
}

impl Setup {
    /// The YAML, with each listener's entry pointing at its own bound port once known.
    fn yaml(&self, ports: &HashMap<&str, u16>) -> String {
        let mut out = String::from("listeners:\n");
        for (name, entry, settings) in &self.listeners {
            out.push_str(&format!(
                "  - name: {name}\n    address: 127.0.0.1:0\n    protocol: capture\n{settings}"
            ));
            if let (Some(entry), Some(port)) = (entry, ports.get(name)) {
                out.push_str(&format!(
                    "    services:\n      - {{ ip: 127.0.0.1, port: {port}, {entry} }}\n"
                ));
            }
        }
        format!(
            "{out}route_configs:\n{}\nclusters:\n{}\n",
            self.route_configs, self.clusters
        )
    }

    /// Binds every listener, then lists each one's own address in its table (the sockets of
    /// port-0 listeners are kept across updates).
    async fn start(&self) -> (Arc<Proxy>, HashMap<&'static str, SocketAddr>) {
        let proxy = Proxy::new();
        let first = validate::from_yaml(&self.yaml(&HashMap::new()))
            .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        proxy.apply(first).await.expect("config applies");
        let mut addrs = HashMap::new();
        let mut ports = HashMap::new();
        for (name, _, _) in &self.listeners {
            let addr = proxy.listener_addr(name).await.expect("listener bound");
            addrs.insert(*name, addr);
            ports.insert(*name, addr.port());
        }
        let second = validate::from_yaml(&self.yaml(&ports))
            .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        proxy
            .apply(second)
            .await
            .expect("config with tables applies");
        for (name, addr) in &addrs {
            assert_eq!(
                proxy.listener_addr(name).await,
                Some(*addr),
                "{name} kept its socket"
            );
        }
        (proxy, addrs)
    }
}

fn ports_of(addrs: &HashMap<&'static str, SocketAddr>) -> HashMap<&'static str, u16> {
    addrs.iter().map(|(k, a)| (*k, a.port())).collect()
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("bytes within 5s")
        .expect("read");
    buf
}

fn detection(samples: &[Sample], listener: &str, protocol: &str, reason: &str) -> f64 {
    metric(
        samples,
        "trellis_protocol_detection_total",
        &[
            ("listener", listener),
            ("protocol", protocol),
            ("reason", reason),
        ],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn detected_protocols_reach_the_entrys_cluster() {
    let (web, _) = echo_upstream("web").await;
    let echo = tcp_echo_upstream().await;
    let banner = banner_server().await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let log = format!("    access_log: {:?}\n", log_path.display().to_string());
    let setup = Setup {
        listeners: vec![
            (
                "web-detect",
                Some("cluster: web"),
                format!("    detection_timeout: 5s\n{log}"),
            ),
            (
                "web-routed",
                Some("cluster: web, protocol: http, route_config: rc"),
                String::new(),
            ),
            (
                "echo-detect",
                Some("cluster: echo"),
                format!("    detection_timeout: 5s\n{log}"),
            ),
            (
                "echo-declared",
                Some("cluster: echo, protocol: tcp"),
                "    detection_timeout: 5s\n".into(),
            ),
            (
                "banner-detect",
                Some("cluster: banner"),
                "    detection_timeout: 200ms\n".into(),
            ),
        ],
        clusters: format!(
            "  - {{ name: web, endpoints: [\"{web}\"] }}\n  - {{ name: echo, endpoints: [\"{echo}\"] }}\n  - {{ name: banner, endpoints: [\"{banner}\"] }}"
        ),
        route_configs: r#"  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - { name: api, match: { path: { prefix: /api } }, forward: { cluster: web } }
          - { name: other, direct_response: { status: 404, body: "no route" } }"#,
    };
    let (proxy, addrs) = setup.start().await;
    let (admin, _) = start_admin(&proxy).await;

    // HTTP/1.1, detected: every request to the entry's cluster.
    let at = addrs["web-detect"];
    let (resp, body) = get(&h1_client(), &format!("http://{at}/any/path%2Fkept")).await;
    assert_eq!(resp.status(), 200);
    let s = seen(&body);
    assert_eq!(s.server, "web");
    assert_eq!(
        s.uri, "/any/path%2Fkept",
        "a sidecar forwards paths as sent"
    );
    // HTTP/2 prior knowledge on the same entry.
    let (resp, body) = get(&h2_client(), &format!("http://{at}/h2")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(seen(&body).server, "web");

    // Declared HTTP, routed by the entry's route configuration.
    let at = addrs["web-routed"];
    let (resp, body) = get(&h1_client(), &format!("http://{at}/api/x")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(seen(&body).server, "web");
    let (resp, body) = get(&h1_client(), &format!("http://{at}/elsewhere")).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(&body[..], b"no route");

    // Opaque bytes, detected and declared, to the echo server.
    for name in ["echo-detect", "echo-declared"] {
        let mut s = TcpStream::connect(addrs[name]).await.unwrap();
        s.write_all(b"\x00\x01binary hello").await.unwrap();
        assert_eq!(read_exactly(&mut s, 14).await, b"\x00\x01binary hello");
        s.write_all(b"more").await.unwrap();
        assert_eq!(read_exactly(&mut s, 4).await, b"more", "{name}");
    }

    // Server speaks first: the client waits for the banner, which comes once detection times out.
    let mut s = TcpStream::connect(addrs["banner-detect"]).await.unwrap();
    assert_eq!(read_exactly(&mut s, 11).await, b"220 banner\n");
    s.write_all(b"EHLO x\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut s, 8).await, b"EHLO x\r\n");
    drop(s);

    let samples = scrape(admin).await;
    let expected = [
        ("web-detect", "http1", "detected", 1.0),
        ("web-detect", "http2", "detected", 1.0),
        ("web-detect", "tcp", "detected", 0.0),
        ("web-routed", "http1", "declared", 2.0),
        ("echo-detect", "tcp", "detected", 1.0),
        ("echo-declared", "tcp", "declared", 1.0),
        ("echo-declared", "tcp", "detected", 0.0),
        ("banner-detect", "tcp", "timeout", 1.0),
    ];
    for (listener, protocol, reason, want) in expected {
        assert_eq!(
            detection(&samples, listener, protocol, reason),
            want,
            "{listener} {protocol} {reason}"
        );
    }
    // Requests are counted on the capture listener that took them.
    let on = |listener: &str| -> f64 {
        series(
            &samples,
            "trellis_http_requests_total",
            &[("listener", listener)],
        )
        .iter()
        .map(|(_, v)| v)
        .sum()
    };
    assert_eq!(on("web-detect"), 2.0);
    assert_eq!(on("web-routed"), 2.0);
    assert_eq!(
        metric(
            &samples,
            "trellis_http_requests_total",
            &[
                ("listener", "web-detect"),
                ("vhost", &addrs["web-detect"].to_string()),
                ("route", "web"),
                ("code", "200"),
                ("class", "2xx"),
            ],
        ),
        Some(2.0),
        "an entry without routes names its destination and cluster"
    );

    // Access log lines name the capture listener that took the connection.
    let read_lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    };
    eventually(Duration::from_secs(5), "three access log lines", || async {
        read_lines().len() == 3
    })
    .await;
    let lines = read_lines();
    let http: Vec<_> = lines.iter().filter(|l| l["kind"] == "http").collect();
    assert_eq!(http.len(), 2, "{lines:?}");
    for l in http {
        assert_eq!(l["listener"], "web-detect");
        assert_eq!(l["cluster"], "web");
    }
    let tcp = lines
        .iter()
        .find(|l| l["kind"] == "tcp")
        .expect("the TCP line");
    assert_eq!(tcp["listener"], "echo-detect");
    assert_eq!(tcp["cluster"], "echo");

    // Entries removed: their routes' series go with them, catch-all and routed alike.
    let bare = validate::from_yaml(&setup.yaml(&HashMap::new())).unwrap();
    proxy
        .apply(bare)
        .await
        .expect("config without tables applies");
    let after = scrape(admin).await;
    for listener in ["web-detect", "web-routed"] {
        assert!(
            series(
                &after,
                "trellis_http_requests_total",
                &[("listener", listener)]
            )
            .iter()
            .all(|(labels, _)| labels.iter().any(|(k, v)| k == "route" && v.is_empty())),
            "{listener}: route series left after its entry went"
        );
    }
    proxy
        .apply(validate::from_yaml(&setup.yaml(&ports_of(&addrs))).unwrap())
        .await
        .expect("tables again");

    // /config_dump shows the table.
    let (resp, body) = get(&h1_client(), &format!("http://{admin}/config_dump")).await;
    assert_eq!(resp.status(), 200);
    let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let listener = dump["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "web-routed")
        .expect("listed");
    assert_eq!(listener["protocol"], "capture");
    assert_eq!(listener["direction"], "outbound");
    assert_eq!(listener["unknown_destination"], "allow");
    assert_eq!(listener["detection_timeout_ms"], 1000);
    assert_eq!(
        listener["services"][0],
        serde_json::json!({
            "ip": "127.0.0.1",
            "port": addrs["web-routed"].port(),
            "cluster": "web",
            "protocol": "http",
            "route_config": "rc",
        })
    );
}

#[tokio::test]
async fn unknown_destinations_are_blocked_or_never_looped() {
    let echo = tcp_echo_upstream().await;
    let setup = Setup {
        listeners: vec![
            ("blocking", None, "    unknown_destination: block\n".into()),
            ("allowing", None, "    unknown_destination: allow\n".into()),
            (
                "inbound-allowing",
                None,
                "    direction: inbound\n    unknown_destination: allow\n".into(),
            ),
        ],
        clusters: format!("  - {{ name: echo, endpoints: [\"{echo}\"] }}"),
        route_configs: "  []",
    };
    let (proxy, addrs) = setup.start().await;
    let (admin, _) = start_admin(&proxy).await;

    // Not in the table: blocked, closed without a byte.
    let (got, closed) = raw_exchange(addrs["blocking"], b"hello", Duration::from_secs(5)).await;
    assert!(closed, "closed at once");
    assert!(got.is_empty());
    // Allowed, but the destination is the listener itself (no NAT entry): passing it through
    // would connect to itself for ever, so it is refused, in both directions.
    for name in ["allowing", "inbound-allowing"] {
        let (got, closed) = raw_exchange(addrs[name], b"hello", Duration::from_secs(5)).await;
        assert!(closed && got.is_empty(), "{name}");
    }

    let samples = scrape(admin).await;
    let unknown = |listener: &str, action: &str| {
        metric(
            &samples,
            "trellis_capture_unknown_destination_total",
            &[("listener", listener), ("action", action)],
        )
    };
    assert_eq!(unknown("blocking", "block"), Some(1.0));
    assert_eq!(unknown("allowing", "allow"), Some(0.0));
    let loops = |listener: &str| {
        metric(
            &samples,
            "trellis_listener_connections_refused_total",
            &[("listener", listener), ("reason", "loop")],
        )
    };
    assert_eq!(loops("allowing"), Some(1.0));
    assert_eq!(loops("inbound-allowing"), Some(1.0));
    assert_eq!(loops("blocking"), Some(0.0));
}
