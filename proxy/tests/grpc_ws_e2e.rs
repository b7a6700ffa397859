//! gRPC (unary, streaming both ways, error statuses in trailers) and WebSocket tunnelling through
//! a real proxy.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use trellis_proto::echo::v1::{EchoRequest, echo_client::EchoClient};

/// The proxy stops listening when dropped, so callers keep the handle.
async fn grpc_proxy() -> (std::sync::Arc<trellis_proxy::Proxy>, std::net::SocketAddr) {
    let up = grpc_upstream("grpc-up").await;
    let yaml = config(
        "          - { name: grpc, match: { path: { prefix: /trellis.echo.v1.Echo } }, forward: { cluster: grpc } }",
        &format!("  - {{ name: grpc, protocol: http2, endpoints: [\"{up}\"] }}\n"),
    );
    start_proxy(&yaml).await
}

#[tokio::test]
async fn grpc_unary_and_error_status() {
    let (_proxy, addr) = grpc_proxy().await;
    let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
    let resp = client
        .unary(EchoRequest {
            message: "hello".into(),
            fail_with_code: 0,
        })
        .await
        .expect("unary call succeeds")
        .into_inner();
    assert_eq!(resp.message, "hello");
    assert_eq!(resp.server, "grpc-up");

    // A failing call's status arrives intact (trailers-only response through the proxy).
    let status = client
        .unary(EchoRequest {
            message: "x".into(),
            fail_with_code: tonic::Code::ResourceExhausted as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "asked to fail");
}

#[tokio::test]
async fn grpc_server_streaming_and_trailers() {
    let (_proxy, addr) = grpc_proxy().await;
    let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
    let mut stream = client
        .server_stream(EchoRequest {
            message: "s".into(),
            fail_with_code: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(item) = stream
        .message()
        .await
        .expect("stream ends with OK trailers")
    {
        got.push(item.message);
    }
    assert_eq!(got, ["s-0", "s-1", "s-2"]);
}

#[tokio::test]
async fn grpc_bidirectional_streaming_interleaves() {
    let (_proxy, addr) = grpc_proxy().await;
    let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut inbound = client
        .bidi_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Each reply must arrive before the next message is sent: proof that neither direction is
    // buffered to the end by the proxy.
    for i in 0..5 {
        let msg = format!("m{i}");
        tx.send(EchoRequest {
            message: msg.clone(),
            fail_with_code: 0,
        })
        .await
        .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("reply before the next send")
            .unwrap()
            .expect("a reply");
        assert_eq!(reply.message, msg);
    }
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none());
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let up = ws_upstream().await;
    let yaml = config(
        "          - { name: ws, forward: { cluster: ws } }",
        &format!("  - {{ name: ws, protocol: http1, endpoints: [\"{up}\"] }}\n"),
    );
    let (_proxy, addr) = start_proxy(&yaml).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        let text = format!("ping {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo within 5s")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let big = vec![7u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_to_an_h2_cluster_is_refused_cleanly() {
    let up = ws_upstream().await;
    let yaml = config(
        "          - { name: ws, forward: { cluster: ws } }",
        &format!("  - {{ name: ws, protocol: http2, endpoints: [\"{up}\"] }}\n"),
    );
    let (_proxy, addr) = start_proxy(&yaml).await;
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 502);
            assert_eq!(resp.headers()["x-trellis-error"], "upgrade-unsupported");
        }
        other => panic!("expected an HTTP error response, got {other:?}"),
    }
}
