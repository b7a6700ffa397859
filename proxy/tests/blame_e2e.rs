//! Blame: a request whose body the client breaks (malformed chunked framing, a disconnect
//! mid-upload) is the client's fault. It must not count against the upstream endpoint, so a
//! stranger cannot get a healthy endpoint ejected by outlier detection.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test]
async fn broken_request_bodies_do_not_eject_a_healthy_endpoint() {
    let (up, _) = echo_upstream("up").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: all, forward: {{ cluster: c }} }}
clusters:
  - name: c
    outlier_detection: {{ consecutive_5xx: 3, base_ejection_time: 30s }}
    endpoints: ["{up}"]
"#
    );
    let (proxy, addr) = start_named(&yaml, "main").await;
    let (admin, _) = start_admin(&proxy).await;
    for i in 0..12 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = "POST /upload HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n";
        // Alternate a malformed chunk size with a client that leaves mid-upload.
        let rest = if i % 2 == 0 {
            "5\r\nhello\r\nzz\r\n"
        } else {
            "100\r\nonly-part"
        };
        s.write_all(format!("{head}{rest}").as_bytes())
            .await
            .unwrap();
        if i % 2 == 1 {
            s.shutdown().await.unwrap();
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the proxy answers or closes");
    }
    let v: Value = {
        let (resp, body) = get(&h1_client(), &format!("http://{admin}/clusters")).await;
        assert_eq!(resp.status(), 200);
        serde_json::from_slice(&body).unwrap()
    };
    let cluster = &v["clusters"][0];
    assert_eq!(cluster["ejections_total"], 0, "{cluster:#}");
    assert_eq!(cluster["endpoints"][0]["ejected"], false, "{cluster:#}");
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/after")).await;
    assert_eq!(resp.status(), 200);
    let m = scrape(admin).await;
    for reason in ["upstream-reset", "upstream-protocol-error"] {
        assert_eq!(
            metric(
                &m,
                "trellis_upstream_errors_total",
                &[("cluster", "c"), ("reason", reason)]
            )
            .unwrap_or(0.0),
            0.0,
            "{reason}"
        );
    }
}
