//! Trace context crosses the proxy: the trace id is kept, the proxy's own span becomes the
//! upstream's parent, and a request without context starts a trace.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// The proxy must stay alive for the test: callers hold the returned handle.
async fn proxy_to_echo() -> (std::sync::Arc<trellis_proxy::Proxy>, std::net::SocketAddr) {
    let (up, _) = echo_upstream("up").await;
    let (proxy, addr) = start_proxy(&config(
        "          - { name: all, forward: { cluster: up } }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    ))
    .await;
    (proxy, addr)
}

async fn send_with(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> Seen {
    let mut req = Request::get(format!("http://{addr}/"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, body) = send(&h1_client(), req.body(Full::<Bytes>::default()).unwrap()).await;
    assert_eq!(resp.status(), 200);
    seen(&body)
}

/// (version, trace id, parent id, flags)
fn split(tp: &str) -> (String, String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(
        (p[0].len(), p[1].len(), p[2].len(), p[3].len()),
        (2, 32, 16, 2),
        "{tp}"
    );
    (p[0].into(), p[1].into(), p[2].into(), p[3].into())
}

#[tokio::test]
async fn traceparent_keeps_trace_id_with_a_new_parent_id() {
    let (_proxy, addr) = proxy_to_echo().await;
    let incoming = format!("00-{TRACE}-{SPAN}-01");
    let seen = send_with(addr, &[("traceparent", &incoming), ("tracestate", "k=v")]).await;
    let (version, trace, parent, flags) = split(seen.header("traceparent").unwrap());
    assert_eq!(
        (version.as_str(), trace.as_str(), flags.as_str()),
        ("00", TRACE, "01")
    );
    assert_ne!(parent, SPAN, "the proxy's span is the upstream's parent");
    assert_ne!(parent, "0".repeat(16));
    assert_eq!(seen.header("tracestate"), Some("k=v"));
    assert_eq!(seen.header_all("traceparent").len(), 1);
}

#[tokio::test]
async fn a_request_without_context_starts_a_sampled_trace() {
    let (_proxy, addr) = proxy_to_echo().await;
    let a = send_with(addr, &[]).await;
    let b = send_with(addr, &[]).await;
    let (_, trace_a, _, flags) = split(a.header("traceparent").unwrap());
    let (_, trace_b, _, _) = split(b.header("traceparent").unwrap());
    assert_eq!(flags, "01");
    assert_ne!(trace_a, "0".repeat(32));
    assert_ne!(trace_a, trace_b, "each request is its own trace");
}

#[tokio::test]
async fn traces_join_across_two_proxies() {
    let (_back, echo) = proxy_to_echo().await;
    let (front, addr) = start_proxy(&config(
        "          - { name: all, forward: { cluster: next } }",
        &format!("  - {{ name: next, endpoints: [\"{echo}\"] }}"),
    ))
    .await;
    let incoming = format!("00-{TRACE}-{SPAN}-00");
    let seen = send_with(addr, &[("traceparent", &incoming)]).await;
    let (_, trace, parent, flags) = split(seen.header("traceparent").unwrap());
    assert_eq!(
        (trace.as_str(), flags.as_str()),
        (TRACE, "00"),
        "sampling decision kept"
    );
    assert_ne!(parent, SPAN);
    drop(front);
}

#[tokio::test]
async fn b3_multi_header_propagation() {
    let (_proxy, addr) = proxy_to_echo().await;
    let seen = send_with(
        addr,
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "1111111111111111"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(seen.header("x-b3-traceid"), Some(TRACE));
    assert_eq!(seen.header("x-b3-parentspanid"), Some(SPAN));
    let span = seen.header("x-b3-spanid").unwrap();
    assert_eq!(span.len(), 16);
    assert_ne!(span, SPAN);
    assert_eq!(seen.header("x-b3-sampled"), Some("1"));
}

#[tokio::test]
async fn b3_single_header_propagation() {
    let (_proxy, addr) = proxy_to_echo().await;
    let seen = send_with(addr, &[("b3", &format!("{TRACE}-{SPAN}-1"))]).await;
    let b3 = seen.header("b3").unwrap();
    let parts: Vec<&str> = b3.split('-').collect();
    assert_eq!(parts.len(), 4, "{b3}");
    assert_eq!(parts[0], TRACE);
    assert_ne!(parts[1], SPAN);
    assert_eq!(parts[2], "1");
    assert_eq!(parts[3], SPAN, "the incoming span is the new parent");
}
