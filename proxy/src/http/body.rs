//! Body types on the request path. Enums rather than boxed trait objects: one allocation fewer per
//! request, and the variants say where the bytes come from.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::{
    config::model::HeaderEdits,
    telemetry::ClusterMetrics,
    upstream::{InFlight, breaker::ActiveRequest, pool::PoolReturn},
};

/// The reason a response body that failed after its head was relayed is logged and counted
/// under.
pub const UPSTREAM_BODY_ERROR: &str = "upstream-body-error";

/// Errors of the bodies the proxy sends: hyper's own, or the proxy ending a body early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A body stopped by the proxy rather than by either peer.
#[derive(Debug, thiserror::Error)]
pub enum Aborted {
    #[error("the route's timeout ended the response")]
    Timeout,
    #[error("the request was sent again; this try's copy of the body is no longer read")]
    Superseded,
}

/// The downstream request body failed (malformed framing, the client left mid-upload): the
/// client's fault, so the exchange it breaks never counts against the upstream.
#[derive(Debug, thiserror::Error)]
#[error("the downstream request body failed: {0}")]
pub struct DownstreamBodyError(#[source] pub hyper::Error);

/// A request body sent upstream, with the trailer names it must not carry.
#[derive(Debug)]
pub struct RequestBody {
    source: RequestSource,
    /// Names the route's request header filters remove or set: a trailer may not bring back a
    /// header the route took out, nor override one it fixed.
    filtered: Option<HeaderEdits>,
}

#[derive(Debug)]
enum RequestSource {
    /// Streamed from the downstream connection as it arrives.
    Streaming(Incoming),
    /// Streamed and kept for a retry: see [`Replay`].
    Replay(ReplayBody),
    Empty,
}

/// Fields a trailer may not carry whatever the route says, as they frame or route the message
/// or belong to one connection (RFC 9110 §6.5.1).
static FORBIDDEN_TRAILERS: [HeaderName; 7] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HOST,
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

impl RequestBody {
    /// Streamed from the downstream connection as it arrives.
    pub fn streaming(body: Incoming) -> Self {
        RequestBody::from(RequestSource::Streaming(body))
    }

    pub fn replay(body: ReplayBody) -> Self {
        RequestBody::from(RequestSource::Replay(body))
    }

    pub fn empty() -> Self {
        RequestBody::from(RequestSource::Empty)
    }

    /// Applies `edits`' removed and set names to the body's trailers.
    pub fn filter_trailers(mut self, edits: &HeaderEdits) -> Self {
        if !edits.remove.is_empty() || !edits.set.is_empty() {
            self.filtered = Some(edits.clone());
        }
        self
    }

    fn filter(&self, mut trailers: HeaderMap) -> HeaderMap {
        for name in &FORBIDDEN_TRAILERS {
            trailers.remove(name);
        }
        if let Some(edits) = &self.filtered {
            for name in edits.remove.iter() {
                trailers.remove(name);
            }
            for (name, _) in edits.set.iter() {
                trailers.remove(name);
            }
        }
        trailers
    }
}

impl From<RequestSource> for RequestBody {
    fn from(source: RequestSource) -> Self {
        RequestBody {
            source,
            filtered: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.source {
            RequestSource::Streaming(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| DownstreamBodyError(e).into()),
            RequestSource::Replay(b) => b.poll(cx),
            RequestSource::Empty => Poll::Ready(None),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let trailers = frame.into_trailers().unwrap_or_default();
                Poll::Ready(Some(Ok(Frame::trailers(this.filter(trailers)))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            RequestSource::Streaming(b) => b.is_end_stream(),
            RequestSource::Replay(b) => b.is_end_stream(),
            RequestSource::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            RequestSource::Streaming(b) => b.size_hint(),
            RequestSource::Replay(b) => b.hint,
            RequestSource::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A downstream request body read once and kept, up to a limit, so that a retry can send it
/// again. Each try gets its own [`ReplayBody`] that first replays what earlier tries read, then
/// goes on reading the downstream. Once more than the limit has been read the copy is dropped
/// and the request can no longer be retried.
#[derive(Clone, Debug)]
pub struct Replay {
    shared: Arc<Mutex<ReplayState>>,
    hint: SizeHint,
}

#[derive(Debug)]
struct ReplayState {
    source: Option<Incoming>,
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    limit: usize,
    /// More than `limit` was read, or the downstream failed: no more tries.
    spent: bool,
    /// The downstream body ended.
    complete: bool,
    /// The try whose body may read; older tries' bodies fail.
    generation: u32,
}

impl Replay {
    pub fn new(source: Incoming, limit: usize) -> Self {
        let hint = source.size_hint();
        Replay {
            shared: Arc::new(Mutex::new(ReplayState {
                source: Some(source),
                frames: Vec::new(),
                trailers: None,
                size: 0,
                limit,
                spent: false,
                complete: false,
                generation: 0,
            })),
            hint,
        }
    }

    /// The body for the next try; `None` when the request can no longer be sent again.
    pub fn body(&self) -> Option<ReplayBody> {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if state.spent {
            return None;
        }
        state.generation += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            generation: state.generation,
            position: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }

    /// No more tries will be made: stop keeping the body (a long stream would otherwise hold up
    /// to the limit for its whole life). The try in progress goes on reading.
    pub fn commit(&self) {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        state.spent = true;
        state.frames = Vec::new();
    }

    /// Whether another try can send the whole body.
    pub fn replayable(&self) -> bool {
        !self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spent
    }
}

/// One try's view of a [`Replay`].
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<ReplayState>>,
    generation: u32,
    /// Frames of `frames` already sent by this try.
    position: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl ReplayBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut guard = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *guard;
        if state.generation != self.generation {
            return Poll::Ready(Some(Err(Aborted::Superseded.into())));
        }
        if !state.spent && self.position < state.frames.len() {
            self.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(
                state.frames[self.position - 1].clone(),
            ))));
        }
        if state.complete {
            if self.trailers_sent {
                return Poll::Ready(None);
            }
            self.trailers_sent = true;
            return Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let Some(source) = state.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.complete = true;
                state.source = None;
                self.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.spent = true;
                Poll::Ready(Some(Err(DownstreamBodyError(e).into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !state.spent {
                        state.size += data.len();
                        if state.size > state.limit {
                            state.spent = true;
                            state.frames = Vec::new();
                        } else {
                            state.frames.push(data.clone());
                            self.position = state.frames.len();
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        state.complete
            && (state.spent || self.position >= state.frames.len())
            && (self.trailers_sent || state.trailers.is_none())
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
    /// Ties the endpoint's in-flight count and the cluster's active request to this body's
    /// lifetime.
    pub fn hold(&mut self, in_flight: InFlight, active: ActiveRequest) {
        if let ResponseBody::Upstream(b) = self {
            b.held = Some((in_flight, active));
        }
    }

    /// Counts a failure of the body, after its head went downstream, against the cluster.
    pub fn count_errors(&mut self, metrics: Arc<ClusterMetrics>) {
        if let ResponseBody::Upstream(b) = self {
            b.metrics = Some(metrics);
        }
    }

    /// Ends the body with an error if it is not done by then.
    pub fn deadline(&mut self, deadline: Option<Instant>) {
        if let ResponseBody::Upstream(b) = self {
            b.deadline = deadline;
            b.timer = None;
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
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
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
    /// Keeps the request counted as in flight on its endpoint and active in its cluster until
    /// the body is done.
    held: Option<(InFlight, ActiveRequest)>,
    /// The route's timeout, when it covers the response body.
    deadline: Option<Instant>,
    /// The timer for `deadline`, armed the first time the body has to wait: a body that is
    /// already there when the head is (most small responses) never builds one.
    timer: Option<Pin<Box<Sleep>>>,
    /// The cluster's metrics, where a failed body is counted.
    metrics: Option<Arc<ClusterMetrics>>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, pool_return: Option<PoolReturn>) -> Self {
        UpstreamBody {
            inner,
            pool_return,
            held: None,
            deadline: None,
            timer: None,
            metrics: None,
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.pool_return.take() {
            r.release();
        }
        self.held = None;
        self.deadline = None;
        self.timer = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(e))) => {
                this.pool_return = None;
                tracing::debug!(error = %e, "upstream response body failed");
                if let Some(m) = this.metrics.take() {
                    m.error(UPSTREAM_BODY_ERROR);
                }
            }
            Poll::Pending => {
                if let Some(deadline) = this.deadline {
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.as_mut().poll(cx).is_ready() {
                        // The connection is left mid-response: it cannot be reused.
                        this.pool_return = None;
                        this.deadline = None;
                        this.timer = None;
                        return Poll::Ready(Some(Err(Aborted::Timeout.into())));
                    }
                }
            }
            _ => {}
        }
        polled.map_err(Into::into)
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
