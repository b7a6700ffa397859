//! What a request leaves behind for operators: its status counted per route, its duration, and an
//! access log line. Counted when the response head is ready; timed and logged when the response
//! body ends (or is dropped), so the duration covers the whole exchange.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};

use super::{
    body::{Aborted, BodyError, ResponseBody, UPSTREAM_BODY_ERROR},
    forward::ConnContext,
    trace::TraceId,
};
use crate::telemetry::{
    ListenerTelemetry, RouteMetrics,
    access_log::{HttpRecord, Record},
};

/// Facts gathered while a request is handled.
#[derive(Debug)]
pub struct Exchange {
    pub started: Instant,
    /// Tries after the first.
    pub retries: u32,
    /// Set once the request matched a route.
    pub route: Option<Arc<RouteMetrics>>,
    pub cluster: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
    pub trace_id: Option<TraceId>,
    pub request_id: Option<HeaderValue>,
    /// The request line, kept only when the listener logs (clones here are reference counts).
    head: Option<Head>,
}

#[derive(Debug)]
struct Head {
    time: SystemTime,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    version: Version,
}

impl Exchange {
    pub fn start<B>(ctx: &ConnContext, req: &Request<B>) -> Self {
        let head = ctx.telemetry.access_log.as_ref().map(|_| Head {
            time: SystemTime::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(header::HOST).cloned(),
            version: req.version(),
        });
        Exchange {
            started: Instant::now(),
            retries: 0,
            route: None,
            cluster: None,
            upstream: None,
            error: None,
            trace_id: None,
            request_id: None,
            head,
        }
    }

    /// Whether an access log line will be written (so details worth logging should be kept).
    pub fn logging(&self) -> bool {
        self.head.is_some()
    }

    /// Counts the response and arranges for the rest to be recorded when its body ends.
    pub fn finish(self, ctx: &ConnContext, resp: Response<ResponseBody>) -> Response<ObservedBody> {
        let status = resp.status().as_u16();
        let metrics = self
            .route
            .clone()
            .unwrap_or_else(|| ctx.telemetry.unrouted.clone());
        metrics.count_response(status);
        resp.map(|inner| ObservedBody {
            inner,
            pending: Some(Pending {
                exchange: self,
                metrics,
                listener: ctx.telemetry.clone(),
                status,
                bytes: 0,
            }),
        })
    }
}

/// A response body that records its exchange when it ends.
#[derive(Debug)]
pub struct ObservedBody {
    inner: ResponseBody,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    exchange: Exchange,
    metrics: Arc<RouteMetrics>,
    listener: Arc<ListenerTelemetry>,
    status: u16,
    bytes: u64,
}

impl Pending {
    fn record(self) {
        let duration = self.exchange.started.elapsed();
        self.metrics.duration.record(duration.as_secs_f64());
        let (Some(log), Some(head)) = (&self.listener.access_log, self.exchange.head) else {
            return;
        };
        log.send(Record::Http(HttpRecord {
            time: head.time,
            listener: self.listener.name.clone(),
            route: self.exchange.route.and_then(|r| r.route_name().cloned()),
            cluster: self.exchange.cluster,
            method: head.method,
            uri: head.uri,
            host: head.host,
            version: head.version,
            status: self.status,
            duration,
            upstream: self.exchange.upstream,
            bytes_sent: self.bytes,
            retries: self.exchange.retries,
            error: self.exchange.error,
            request_id: self.exchange.request_id,
            trace_id: self.exchange.trace_id,
        }));
    }
}

impl ObservedBody {
    /// Records the exchange as ended by `reason` (the drain timeout), whatever the status said.
    pub fn ended_by(&mut self, reason: &'static str) {
        if let Some(p) = &mut self.pending {
            p.exchange.error = Some(reason);
        }
    }

    /// Drops the body, as the answer to HEAD: the exchange is recorded as before, with no bytes.
    pub fn discard(&mut self) {
        self.inner = ResponseBody::empty();
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(p), Some(data)) = (&mut this.pending, frame.data_ref()) {
                    p.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.record();
                }
            }
            // The head went out as a success; the log must not say the exchange was one.
            Poll::Ready(Some(Err(e))) => {
                if let Some(p) = this.pending.take() {
                    let mut p = p;
                    p.exchange.error = Some(match e.downcast_ref::<Aborted>() {
                        Some(Aborted::Timeout) => "upstream-timeout",
                        _ => UPSTREAM_BODY_ERROR,
                    });
                    p.record();
                }
            }
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

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // Bodies the server never polls to the end (HEAD, known-empty, a client gone) end here.
        if let Some(p) = self.pending.take() {
            p.record();
        }
    }
}
