//! Access logs: one JSON line per request and per TCP connection, with the documented fields; a
//! writer that cannot keep up drops (and counts) lines instead of slowing requests.

mod common;

use std::{path::Path, time::Duration};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect()
}

#[tokio::test]
async fn http_and_tcp_lines_are_json_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (up, _) = echo_upstream("up").await;
    let echo = tcp_echo_upstream().await;
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // Listeners are keyed by configured address, so the second one binds another loopback IP.
    let yaml = format!(
        r#"
listeners:
  - {{ name: a1, address: "127.0.0.1:0", access_log: "{log}" }}
  - {{ name: a1-tcp, address: "127.0.0.2:0", protocol: tcp, cluster: a1-echo, access_log: "{log}" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: dead, match: {{ path: {{ prefix: /dead }} }}, forward: {{ cluster: a1-dead }} }}
          - {{ name: api, forward: {{ cluster: a1-up }} }}
clusters:
  - {{ name: a1-up, endpoints: ["{up}"] }}
  - {{ name: a1-dead, endpoints: ["{dead}"] }}
  - {{ name: a1-echo, endpoints: ["{echo}"] }}
"#,
        log = log.display()
    );
    let (proxy, addr) = start_named(&yaml, "a1").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = Request::post(format!("http://{addr}/items/7?q=secret"))
        .header("host", "shop.example")
        .header("x-request-id", "req-1")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let (resp, body) = send(&h1_client(), req).await;
    assert_eq!(resp.status(), 200);
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/dead")).await;
    assert_eq!(resp.status(), 503);

    let tcp_addr = proxy.listener_addr("a1-tcp").await.unwrap();
    let mut s = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = s.read_to_end(&mut Vec::new()).await;
    drop(s);

    eventually(Duration::from_secs(5), "three access log lines", || async {
        read_lines(&log).len() == 3
    })
    .await;
    let lines = read_lines(&log);
    let http: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "http").collect();
    let ok = http
        .iter()
        .find(|l| l["status"] == 200)
        .expect("the 200 line");
    assert_eq!(ok["listener"], "a1");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["authority"], "shop.example");
    assert_eq!(ok["path"], "/items/7");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["route"], "api");
    assert_eq!(ok["cluster"], "a1-up");
    assert_eq!(ok["upstream"], up.to_string());
    assert_eq!(ok["bytes_sent"], body.len() as u64);
    assert_eq!(ok["retries"], 0);
    assert_eq!(ok["error"], Value::Null);
    assert_eq!(ok["request_id"], "req-1");
    assert_eq!(ok["trace_id"], trace);
    assert!(ok["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));

    let failed = http
        .iter()
        .find(|l| l["status"] == 503)
        .expect("the 503 line");
    assert_eq!(failed["error"], "connect-failure");
    assert_eq!(failed["upstream"], dead.to_string());
    assert_eq!(
        failed["trace_id"].as_str().unwrap().len(),
        32,
        "a new trace was started"
    );
    assert_eq!(
        failed["request_id"].as_str().unwrap().len(),
        36,
        "a generated UUID"
    );

    let tcp = lines
        .iter()
        .find(|l| l["kind"] == "tcp")
        .expect("the TCP line");
    assert_eq!(tcp["listener"], "a1-tcp");
    assert_eq!(tcp["cluster"], "a1-echo");
    assert_eq!(tcp["upstream"], echo.to_string());
    assert_eq!(tcp["bytes_sent"], 4);
    assert_eq!(tcp["bytes_received"], 4);
    assert_eq!(tcp["error"], Value::Null);
}

/// The access log is a FIFO nobody reads yet: the writer blocks opening it, its queue fills, and
/// requests must still be answered promptly while the overflow is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_drops_lines_instead_of_blocking_requests() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stalled.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let yaml = format!(
        r#"
listeners:
  - {{ name: a2, address: "127.0.0.1:0", access_log: "{}" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: fast, direct_response: {{ status: 200, body: ok }} }}
clusters: []
"#,
        fifo.display()
    );
    let dropped = || {
        let m = parse_exposition(&trellis_proxy::telemetry::render(None, false));
        metric(
            &m,
            "trellis_access_log_lines_total",
            &[("outcome", "dropped")],
        )
        .unwrap_or(0.0)
    };
    let before = dropped();
    let (_proxy, addr) = start_named(&yaml, "a2").await;
    let total = 2 * trellis_proxy::telemetry::access_log::CHANNEL_CAPACITY;
    let client = h1_client();
    let url = format!("http://{addr}/");
    let flood = async {
        let workers = (0..16).map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                for _ in 0..total / 16 {
                    assert_eq!(get(&client, &url).await.0.status(), 200);
                }
            })
        });
        for w in futures_util::future::join_all(workers).await {
            w.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("requests are not held up by the access log");
    let lost = dropped() - before;
    assert!(
        lost >= (total - trellis_proxy::telemetry::access_log::CHANNEL_CAPACITY) as f64,
        "dropped {lost} of {total}"
    );

    // Unblock the writer: what it had queued comes out as JSON lines.
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let f = std::io::BufReader::new(std::fs::File::open(&fifo).unwrap());
        f.lines().take(10).map(|l| l.unwrap()).collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("queued lines arrive")
        .unwrap();
    for l in lines {
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["listener"], "a2");
        assert_eq!(v["status"], 200);
    }
}
