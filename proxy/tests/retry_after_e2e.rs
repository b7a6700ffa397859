//! A `Retry-After` longer than the route's `backoff.max` is not retried, and
//! `trellis_retries_total` says so, as it does for every retry the policy wanted and did not get.

mod common;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::atomic::AtomicUsize};

use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

/// Answers every request 503 with `Retry-After: {seconds}`.
async fn unavailable_upstream(seconds: u32) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<Incoming>| {
                    c.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"busy")));
                        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        resp.headers_mut()
                            .insert("retry-after", seconds.to_string().parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_retry_after_beyond_backoff_max_is_counted_as_not_retried() {
    let (up, count) = unavailable_upstream(5).await;
    let yaml = config(
        "          - { name: up, forward: { cluster: ra }, retry: { attempts: 2, retry_on: [5xx], backoff: { base: 10ms, max: 100ms } } }",
        &format!("  - {{ name: ra, endpoints: [\"{up}\"] }}"),
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers()["retry-after"],
        "5",
        "the upstream's answer stands"
    );
    assert_eq!(count.load(Ordering::SeqCst), 1, "not retried");
    let m = scrape(admin).await;
    let c = ("cluster", "ra");
    assert_eq!(
        metric(
            &m,
            "trellis_retries_total",
            &[c, ("outcome", "retry_after_too_long")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "trellis_retries_total", &[c, ("outcome", "attempted")]),
        Some(0.0)
    );
}
