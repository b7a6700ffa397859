//! The drain log's count of open connections: at the drain timeout, each connection still open
//! is counted once.

mod common;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use common::{process::Running, *};
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Opens an HTTP/1.1 connection to `addr` and sends a request the upstream answers after a
/// minute; the task ends when the proxy cuts it.
async fn slow_request(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tokio::spawn(async move {
        let req = Request::get("/slow/60000")
            .header(header::HOST, "test")
            .body(Full::default())
            .unwrap();
        if let Ok(resp) = send.send_request(req).await {
            let _ = resp.into_body().collect().await;
        }
    })
}

#[tokio::test]
async fn the_drain_timeout_log_counts_each_open_connection_once() {
    let (up, seen_requests) = echo_upstream("up").await;
    let yaml = config(
        "          - { name: up, forward: { cluster: up }, timeout: 0 }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    );
    let (proxy, addr, _dir) =
        Running::with_config(&yaml, &["--drain-timeout", "300ms", "--drain-delay", "0"]);
    let open = 2;
    let mut clients = Vec::new();
    for _ in 0..open {
        clients.push(slow_request(addr).await);
    }
    eventually(
        Duration::from_secs(5),
        "the upstream has both requests",
        || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n == open }
        },
    )
    .await;

    proxy.terminate();
    let line = proxy.wait_for("drain timeout reached");
    assert!(
        line.contains(&format!("open={open}")),
        "{open} connections were open: {line}"
    );
    drop(clients);
}
