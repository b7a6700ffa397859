//! A TCP listener in front of two endpoints, one of them down (a bound socket that does not
//! listen, so connects are refused): a failed connect is tried again on the other endpoint, every
//! client connection gets through, and the failures are counted in
//! `trellis_upstream_errors_total`.

mod common;

use std::time::Duration;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// One round trip through the proxy; the echo upstream sends back what it got.
async fn echo_once(addr: std::net::SocketAddr, i: usize) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let msg = format!("hello {i}");
    s.write_all(msg.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == msg.as_bytes() => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {:?}", String::from_utf8_lossy(&buf))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no echo within 5s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_tried_on_another_endpoint() {
    let up = tcp_echo_upstream().await;
    // Bound, never listening: the port stays ours and every connect to it is refused.
    let down = TcpSocket::new_v4().unwrap();
    down.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let down_addr = down.local_addr().unwrap();
    for lb in ["random", "round_robin", "least_request", "peak_ewma"] {
        let yaml = format!(
            "listeners:\n  - {{ name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: db }}\n\
             clusters:\n  - {{ name: db, lb: {{ policy: {lb} }}, endpoints: [\"{down_addr}\", \"{up}\"] }}\n"
        );
        let (proxy, addr) = start_proxy(&yaml).await;
        let (admin, _) = start_admin(&proxy).await;
        let n = 40;
        let results = futures_util::future::join_all((0..n).map(|i| echo_once(addr, i))).await;
        let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        assert!(
            failed.is_empty(),
            "lb {lb}: {} of {n} connections failed: {failed:?}",
            failed.len()
        );
        let m = scrape(admin).await;
        let refused = metric(
            &m,
            "trellis_upstream_errors_total",
            &[("cluster", "db"), ("reason", "connect-failure")],
        )
        .unwrap_or(0.0);
        assert!(
            refused >= 1.0,
            "lb {lb}: refused connects are counted as upstream errors, got {refused}"
        );
        drop(proxy);
    }
    drop(down);
}
