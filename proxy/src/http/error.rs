//! Every error the proxy answers for itself, mapped to a status and a short reason in one place.
//! The reason goes out in `x-trellis-error`, so users can tell a proxy error from an upstream one.

use http::{HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;
use crate::upstream::UpstreamError;

pub const ERROR_HEADER: &str = "x-trellis-error";

/// Who is at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Downstream,
    Upstream,
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no configuration has been loaded yet")]
    NotReady,
    #[error("no route matches the request")]
    NoRoute,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("backend {0} is not a cluster the configuration holds")]
    BackendNotFound(std::sync::Arc<str>),
    #[error("{0}")]
    InvalidPath(#[source] super::normalize::InvalidPath),
    #[error("cluster {0} has no endpoint available")]
    NoEndpoint(std::sync::Arc<str>),
    #[error("upstream connect timed out")]
    ConnectTimeout(#[source] UpstreamError),
    #[error("upstream connect failed")]
    ConnectFailure(#[source] UpstreamError),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("upstream reset the request")]
    UpstreamReset(#[source] UpstreamError),
    #[error("upstream spoke invalid HTTP")]
    UpstreamProtocol(#[source] UpstreamError),
    #[error("upstream response framing is contradictory: {0}")]
    UpstreamFraming(&'static str),
    #[error("the cluster cannot carry an upgraded connection")]
    UpgradeUnsupported,
    #[error("upstream try timed out")]
    PerTryTimeout,
    #[error("the endpoint stopped answering while its peers still answer")]
    UpstreamStalled,
    #[error("upstream refused the stream")]
    RefusedStream(#[source] UpstreamError),
    #[error("cluster {0} is over its {1} limit")]
    Overflow(std::sync::Arc<str>, &'static str),
    #[error("rate limit exceeded")]
    RateLimited,
    #[error("denied by authorization policy")]
    Forbidden,
    #[error("the request body failed before it was sent in full")]
    DownstreamBody(#[source] UpstreamError),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NotReady | ProxyError::NoEndpoint(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            // The Gateway API's answer for the share of requests of an invalid backendRef.
            ProxyError::BackendNotFound(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::BadRequest(_)
            | ProxyError::InvalidPath(_)
            | ProxyError::DownstreamBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConnectTimeout(_) | ProxyError::ConnectFailure(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamTimeout
            | ProxyError::PerTryTimeout
            | ProxyError::UpstreamStalled => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RefusedStream(_) | ProxyError::Overflow(..) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamProtocol(_)
            | ProxyError::UpstreamFraming(_)
            | ProxyError::UpgradeUnsupported => StatusCode::BAD_GATEWAY,
        }
    }

    /// The short reason sent in `x-trellis-error`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NotReady => "not-ready",
            ProxyError::NoRoute => "no-route",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::BackendNotFound(_) => "backend-not-found",
            ProxyError::InvalidPath(_) => "invalid-path",
            ProxyError::NoEndpoint(_) => "no-endpoint",
            ProxyError::ConnectTimeout(_) => "connect-timeout",
            // A connect failure in every other respect (status, retries, outlier detection),
            // named apart because its cure is a certificate or trust fix, not a restart.
            ProxyError::ConnectFailure(UpstreamError::Tls(..)) => "tls-handshake",
            ProxyError::ConnectFailure(_) => "connect-failure",
            ProxyError::UpstreamTimeout => "upstream-timeout",
            ProxyError::UpstreamReset(_) => "upstream-reset",
            ProxyError::UpstreamProtocol(_) | ProxyError::UpstreamFraming(_) => {
                "upstream-protocol-error"
            }
            ProxyError::UpgradeUnsupported => "upgrade-unsupported",
            ProxyError::PerTryTimeout => "per-try-timeout",
            ProxyError::UpstreamStalled => "upstream-stalled",
            ProxyError::RefusedStream(_) => "refused-stream",
            ProxyError::Overflow(..) => "overflow",
            ProxyError::RateLimited => "rate-limited",
            ProxyError::Forbidden => "forbidden",
            ProxyError::DownstreamBody(_) => "downstream-body-error",
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::InvalidPath(_)
            | ProxyError::NoRoute
            | ProxyError::RateLimited
            | ProxyError::Forbidden
            | ProxyError::DownstreamBody(_) => Blame::Downstream,
            ProxyError::NotReady
            | ProxyError::NoEndpoint(_)
            | ProxyError::BackendNotFound(_)
            | ProxyError::UpgradeUnsupported
            | ProxyError::Overflow(..) => Blame::Proxy,
            _ => Blame::Upstream,
        }
    }

    /// The upstream never got the request: refused, unreachable, no connection in time, the
    /// stream refused, or the connection closed before a byte of it was written. Such a request
    /// may be sent again whatever its method.
    pub fn never_reached_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::ConnectTimeout(_)
                | ProxyError::ConnectFailure(_)
                | ProxyError::RefusedStream(_)
                | ProxyError::UpstreamReset(UpstreamError::NotSent(..))
        )
    }

    /// For outlier detection: no usable connection to the endpoint.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::ConnectTimeout(_)
                | ProxyError::ConnectFailure(_)
                | ProxyError::UpstreamReset(_)
        )
    }

    pub fn from_upstream(e: UpstreamError) -> Self {
        match &e {
            UpstreamError::ConnectTimeout(_) => ProxyError::ConnectTimeout(e),
            UpstreamError::Connect(..) | UpstreamError::Tls(..) => ProxyError::ConnectFailure(e),
            UpstreamError::Send(_, h) | UpstreamError::NotSent(_, h) if is_downstream_body(h) => {
                ProxyError::DownstreamBody(e)
            }
            UpstreamError::Handshake(..) => ProxyError::UpstreamProtocol(e),
            UpstreamError::Send(_, h) if h.is_parse() => ProxyError::UpstreamProtocol(e),
            UpstreamError::Send(_, h) if is_refused_stream(h) => ProxyError::RefusedStream(e),
            UpstreamError::Send(..) | UpstreamError::NotSent(..) => ProxyError::UpstreamReset(e),
            UpstreamError::Overflow(_, limit) => {
                ProxyError::Overflow(std::sync::Arc::from("upstream"), limit.as_str())
            }
        }
    }

    /// Names the cluster of an overflow that came up from a pool.
    pub fn in_cluster(self, cluster: &std::sync::Arc<str>) -> Self {
        match self {
            ProxyError::Overflow(_, limit) => ProxyError::Overflow(cluster.clone(), limit),
            other => other,
        }
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        match self.blame() {
            Blame::Downstream => tracing::debug!(error = %self, "request refused"),
            _ => tracing::debug!(error = ?self, "request failed"),
        }
        let mut resp = Response::new(ResponseBody::full(format!("{self}\n")));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// Whether hyper failed because the request body read from the client failed.
fn is_downstream_body(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<super::body::DownstreamBodyError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Whether an HTTP/2 stream was refused (`REFUSED_STREAM`): the server did not process it.
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}
