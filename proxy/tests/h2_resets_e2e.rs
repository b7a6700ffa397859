//! HTTP/2 rapid reset after dispatch: a client that opens streams, lets them reach the upstream
//! and resets them, batch after batch, gets GOAWAY instead of costing the upstream without end.

mod common;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use common::*;
use http::Request;
use tokio::{net::TcpStream, time::Instant};

const BATCH: usize = 150;
const MAX_BATCHES: usize = 20;

#[tokio::test]
async fn a_client_resetting_dispatched_streams_gets_goaway() {
    let (up, count) = echo_upstream("up").await;
    let yaml = config(
        "          - { name: all, forward: { cluster: up } }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    );
    // Counters made with the `metrics` macros reach `/metrics` through the global recorder.
    trellis_proxy::telemetry::install_global_recorder();
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    let (batches, goaway) = reset_batches(addr, &count).await;
    let reached = count.load(Ordering::SeqCst);
    assert!(
        goaway,
        "no GOAWAY after {batches} batches of {BATCH} reset streams ({reached} reached the upstream)"
    );
    assert!(
        reached <= 2 * BATCH,
        "{reached} requests reached the upstream before the connection was closed"
    );

    let closes = metric(
        &scrape(admin).await,
        "trellis_http2_premature_reset_closes_total",
        &[],
    );
    assert!(closes >= Some(1.0), "closes counted: {closes:?}");

    // A well-behaved client on another connection is served as usual.
    let (resp, _) = get(&h2_client(), &format!("http://{addr}/fine")).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_client_that_resets_a_few_streams_is_not_closed() {
    let (up, count) = echo_upstream("up").await;
    let yaml = config(
        "          - { name: all, forward: { cluster: up } }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    );
    let (_proxy, addr) = start_proxy(&yaml).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // 300 streams: every third is reset after it reached the upstream, the rest are answered.
    for i in 0..300 {
        let path = if i % 3 == 0 { "/slow/5000" } else { "/ok" };
        let before = count.load(Ordering::SeqCst);
        let req = Request::get(format!("http://test{path}")).body(()).unwrap();
        client = client.ready().await.expect("connection still open");
        let (resp, mut stream) = client.send_request(req, true).unwrap();
        if i % 3 == 0 {
            eventually(
                Duration::from_secs(5),
                "the stream reaches the upstream",
                || {
                    let count = count.clone();
                    async move { count.load(Ordering::SeqCst) > before }
                },
            )
            .await;
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .expect("answered within 10 s")
                .expect("answered");
            assert_eq!(resp.status(), 200);
        }
    }
    assert!(!conn.is_finished(), "the connection stays open");
}

/// Opens batches of streams to a slow upstream path, waits until each batch has reached the
/// upstream, and resets them all. Returns the batches sent and whether the proxy said GOAWAY.
async fn reset_batches(
    addr: SocketAddr,
    count: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (usize, bool) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client;
    for batch in 0..MAX_BATCHES {
        let before = count.load(Ordering::SeqCst);
        let mut streams = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let ready = match client.ready().await {
                Ok(ready) => ready,
                Err(_) => return (batch, true),
            };
            client = ready;
            let req = Request::get("http://test/slow/5000").body(()).unwrap();
            match client.send_request(req, true) {
                Ok((resp, stream)) => streams.push((resp, stream)),
                Err(e) if e.is_go_away() => return (batch, true),
                Err(e) => panic!("send_request: {e}"),
            }
        }
        // Let the batch reach the upstream; streams answered locally (the connection closing)
        // never do, so the wait is bounded and the check below decides.
        let deadline = Instant::now() + Duration::from_secs(5);
        while count.load(Ordering::SeqCst) < before + BATCH && Instant::now() < deadline {
            if conn.is_finished() {
                return (batch + 1, true);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (_, stream) in &mut streams {
            stream.send_reset(h2::Reason::CANCEL);
        }
        if conn.is_finished() {
            return (batch + 1, true);
        }
    }
    // The last resets may still be on their way: give the GOAWAY a bounded moment to arrive.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .is_ok();
    (MAX_BATCHES, closed)
}
