//! Benchmark upstream for the Trellis harness (`bench/run`).
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) on one port via
//! `hyper_util::server::conn::auto`. Every request gets `200 hello world\n`,
//! except a POST with `content-type: application/grpc*`, which gets a unary
//! gRPC answer: one length-prefixed message, then trailers `grpc-status: 0`.
//!
//! Usage: trellis-bench-upstream [--listen 127.0.0.1:PORT] [--workers N]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

const HELLO: &[u8] = b"hello world\n";
/// gRPC message: protobuf field 1 (string) = "hello world".
const GRPC_MSG: &[u8] = b"\x0a\x0bhello world";

/// A body of at most one data frame followed by optional trailers.
struct OneShot {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for OneShot {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, &self.trailers) {
            (Some(d), None) => SizeHint::with_exact(d.len() as u64),
            (None, None) => SizeHint::with_exact(0),
            (Some(d), Some(_)) => {
                let mut h = SizeHint::new();
                h.set_lower(d.len() as u64);
                h
            }
            (None, Some(_)) => SizeHint::new(),
        }
    }
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.method() == http::Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn handle(req: Request<Incoming>) -> Result<Response<OneShot>, Infallible> {
    if is_grpc(&req) {
        // Read the whole (unary) request before answering.
        let _ = req.into_body().collect().await;
        let mut framed = Vec::with_capacity(5 + GRPC_MSG.len());
        framed.push(0u8); // not compressed
        framed.extend_from_slice(&(GRPC_MSG.len() as u32).to_be_bytes());
        framed.extend_from_slice(GRPC_MSG);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = OneShot { data: Some(Bytes::from(framed)), trailers: Some(trailers) };
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .expect("static response");
        return Ok(resp);
    }
    // Drain any request body so HTTP/1.1 keep-alive stays usable.
    let _ = req.into_body().collect().await;
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(OneShot { data: Some(Bytes::from_static(HELLO)), trailers: None })
        .expect("static response");
    Ok(resp)
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:8081".parse().expect("addr");
    let mut workers: usize = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR").parse().expect("bad --listen"),
            "--workers" => workers = args.next().expect("--workers N").parse().expect("bad --workers"),
            "-h" | "--help" => {
                println!("trellis-bench-upstream [--listen 127.0.0.1:PORT] [--workers N]");
                return;
            }
            other => {
                eprintln!("unknown argument: {other}");
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(listen));
}

async fn serve(listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
        eprintln!("bind {listen}: {e}");
        std::process::exit(1);
    });
    eprintln!("trellis-bench-upstream listening on {listen}");
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let builder = std::sync::Arc::new(builder);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let builder = builder.clone();
                tokio::spawn(async move {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service_fn(handle))
                        .await;
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
}
