//! Body types on the request path. Enums rather than boxed trait objects: one allocation fewer per
//! request, and the variants say where the bytes come from.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::{InFlight, pool::PoolReturn};

/// A request body sent upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Streamed from the downstream connection as it arrives.
    Streaming(Incoming),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(b) => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body sent downstream.
#[derive(Debug)]
pub enum ResponseBody {
    /// Streamed from an upstream; its connection goes back to the pool when the body ends.
    Upstream(UpstreamBody),
    /// Made by the proxy (direct responses, errors, redirects).
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// Ties the endpoint's in-flight count to this body's lifetime.
    pub fn hold(&mut self, in_flight: InFlight) {
        if let ResponseBody::Upstream(b) = self {
            b.in_flight = Some(in_flight);
        }
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(b) => b.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(b) => b.size_hint(),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// An upstream response body. When it has been read to the end, the HTTP/1 connection it came on
/// is returned to its pool; dropped early, the connection is closed (its remaining bytes would
/// otherwise be read as the next response).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    pool_return: Option<PoolReturn>,
    /// Keeps the request counted as in flight on its endpoint until the body is done.
    in_flight: Option<InFlight>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, pool_return: Option<PoolReturn>) -> Self {
        UpstreamBody {
            inner,
            pool_return,
            in_flight: None,
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.pool_return.take() {
            r.release();
        }
        self.in_flight = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.pool_return = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body the server never polled (HEAD, 204, 304, or one known empty) still ended cleanly.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}
