//! Serving downstream connections: HTTP/1.1 and HTTP/2 cleartext on the same port.

use std::{convert::Infallible, sync::Arc};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;

use super::forward::{ConnContext, handle};

/// Connection settings shared by every connection of a listener.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The timer drives hyper's HTTP/1 header-read timeout and HTTP/2 keep-alive.
    b.http1().timer(TokioTimer::new());
    b.http2().timer(TokioTimer::new());
    b
}

/// Serves one accepted connection until the client or the server closes it.
pub async fn serve(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    ctx: ConnContext,
) {
    let _ = stream.set_nodelay(true);
    let ctx = Arc::new(ctx);
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "downstream connection ended with an error");
    }
}
