//! One request, start to end: route it, then answer directly, redirect, or forward it upstream
//! with the route's edits applied.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::request::Parts;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::{Authority, PathAndQuery, Scheme as UriScheme},
};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::{
    body::{Replay, RequestBody, ResponseBody, UpstreamBody},
    error::{Blame, ProxyError},
    headers::{
        X_FORWARDED_CLIENT_CERT, X_FORWARDED_PROTO, X_REQUEST_ID, X_TRELLIS_CLIENT_IDENTITY,
        append_forwarded_for, is_upgrade, join_cookies, new_request_id, strip_hop_by_hop,
    },
    normalize::{self, EscapedSlashes},
    observe::{Exchange, ObservedBody},
    retry,
    route::{Route, RouteAction},
    router::{RequestHead, strip_port},
    server::Informational,
    trace, upgrade,
};
use crate::{
    authz,
    config::{
        Store,
        model::{
            HashKey, HeaderEdits, PathRewrite, Redirect, RetryPolicy, Scheme, UpstreamProtocol,
        },
    },
    telemetry::{ListenerTelemetry, RetryOutcome, TimeoutKind},
    upstream::{
        Cluster, Outcome, UpstreamError,
        breaker::{ActiveRetry, Limit},
        endpoint::STALL_MIN_MS,
        hash::hash64,
    },
};

/// What a request handler knows about its downstream connection; built once per connection.
#[derive(Clone, Debug)]
pub struct ConnContext {
    pub store: Arc<Store>,
    pub listener: Arc<str>,
    pub client: IpAddr,
    /// The client's IP, ready to append to `x-forwarded-for`.
    pub client_ip: HeaderValue,
    /// The listener's metric handles and access log.
    pub telemetry: Arc<ListenerTelemetry>,
    /// The listener's `path_normalization.escaped_slashes`, fixed for the connection's life.
    pub escaped_slashes: EscapedSlashes,
    /// The port the connection was accepted on, which a redirect with neither scheme nor port
    /// keeps (the Gateway API's "listener port"); `None` when the socket could not say.
    pub local_port: Option<u16>,
    /// `x-forwarded-proto`: `https` on a connection whose TLS the listener terminated.
    pub forwarded_proto: HeaderValue,
    /// `x-forwarded-client-cert` for a client certificate the listener verified; a client's own
    /// `x-forwarded-client-cert` is never forwarded.
    pub client_certificate: Option<HeaderValue>,
    /// The protocol TLS's ALPN settled (HTTP/1.1 when none was): the client must speak it, as
    /// RFC 9113 §3.2 wants; `None` on cleartext, where the HTTP/2 preface tells them apart.
    pub negotiated: Option<http::Version>,
    /// The key of the route table that routes this connection's requests, when it is not the
    /// listener's own: a capture listener routes by the original destination's entry.
    pub route_table: Option<Arc<str>>,
    /// Set on an inbound capture connection: each request is checked against the sidecar's
    /// authorization policies (`crate::authz`) and `x-trellis-client-identity` is replaced.
    pub inbound: Option<InboundMesh>,
}

/// What an inbound sidecar connection knows of its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundMesh {
    /// The caller's SPIFFE ID when it came over mesh mTLS; `None` on plaintext (permissive).
    pub peer_identity: Option<crate::identity::SpiffeId>,
    /// The original destination port, which policies' `destination_ports` match.
    pub destination_port: u16,
}

impl ConnContext {
    pub fn new(store: Arc<Store>, telemetry: Arc<ListenerTelemetry>, client: IpAddr) -> Self {
        let client_ip = HeaderValue::from_str(&client.to_string())
            .expect("an IP address is a valid header value");
        ConnContext {
            store,
            listener: telemetry.name.clone(),
            client,
            client_ip,
            telemetry,
            escaped_slashes: EscapedSlashes::default(),
            local_port: None,
            forwarded_proto: HeaderValue::from_static("http"),
            client_certificate: None,
            negotiated: None,
            route_table: None,
            inbound: None,
        }
    }

    /// An inbound capture connection: authorization policies apply to its requests.
    pub fn with_inbound(mut self, inbound: InboundMesh) -> Self {
        self.inbound = Some(inbound);
        self
    }

    /// Routed by the route table of this key (see `Compiled::http_routes`).
    pub fn with_route_table(mut self, key: Arc<str>) -> Self {
        self.route_table = Some(key);
        self
    }

    /// On a TLS connection the listener terminated, with the verified client certificate's
    /// `x-forwarded-client-cert` value if there was one.
    pub fn with_tls(mut self, client_certificate: Option<HeaderValue>) -> Self {
        self.forwarded_proto = HeaderValue::from_static("https");
        self.client_certificate = client_certificate;
        self
    }

    /// With the protocol ALPN chose: HTTP/2 for `h2`, else HTTP/1.1.
    pub fn with_alpn(mut self, h2: bool) -> Self {
        self.negotiated = Some(if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        });
        self
    }

    /// With the port the connection was accepted on.
    pub fn with_local_port(mut self, port: Option<u16>) -> Self {
        self.local_port = port;
        self
    }

    /// With the listener's `path_normalization.escaped_slashes`.
    pub fn with_escaped_slashes(mut self, action: EscapedSlashes) -> Self {
        self.escaped_slashes = action;
        self
    }
}

/// Serves one request. Never fails: errors become responses with `x-trellis-error`.
pub async fn handle(ctx: &ConnContext, req: Request<Incoming>) -> Response<ObservedBody> {
    let mut exchange = Exchange::start(ctx, &req);
    let resp = match proxy(ctx, req, &mut exchange).await {
        // An upstream's own `x-trellis-error` must not pass for the proxy's.
        Ok(resp) => super::headers::rename_upstream_error(resp),
        Err(e) => {
            exchange.error = Some(e.reason());
            e.into_response()
        }
    };
    exchange.finish(ctx, resp)
}

async fn proxy(
    ctx: &ConnContext,
    mut req: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Response<ResponseBody>, ProxyError> {
    // Routed and forwarded alike: the normalised path is the only path from here on.
    if let Some(resp) = normalize::request_target(req.uri_mut(), ctx.escaped_slashes)? {
        return Ok(resp);
    }
    // After normalisation, so a policy judges the path that is routed and forwarded; before
    // routing, so a denied request costs no route lookup and reaches nothing.
    if let Some(inbound) = &ctx.inbound {
        authorize(ctx, inbound, &mut req)?;
    }
    // Before routing, so routes can match the verified client certificate and never a claim
    // the client made itself.
    match &ctx.client_certificate {
        Some(v) => req
            .headers_mut()
            .insert(X_FORWARDED_CLIENT_CERT.clone(), v.clone()),
        None => req.headers_mut().remove(&X_FORWARDED_CLIENT_CERT),
    };
    // One load per request; the version is let go before any await (forward targets are
    // resolved in it first), so a long exchange does not keep a whole old config alive.
    let compiled = ctx.store.load().ok_or(ProxyError::NotReady)?;
    let route = {
        let table = compiled
            .http_routes(ctx.route_table.as_deref().unwrap_or(&ctx.listener))
            .ok_or(ProxyError::NoRoute)?;
        let host = request_host(&req)?;
        let head = RequestHead {
            host,
            path: req.uri().path(),
            query: req.uri().query(),
            method: req.method(),
            headers: req.headers(),
        };
        table.route(&head).ok_or(ProxyError::NoRoute)?.clone()
    };
    let metrics = route
        .telemetry
        .get(&ctx.listener, &route.vhost, &route.name);
    if !route.rate_limits.iter().all(|l| l.try_acquire()) {
        metrics.rate_limited.increment(1);
        exchange.route = Some(metrics);
        return Err(ProxyError::RateLimited);
    }
    exchange.route = Some(metrics);
    match &route.action {
        RouteAction::Direct(d) => {
            let mut resp = Response::new(ResponseBody::full(d.body.clone()));
            *resp.status_mut() = d.status;
            apply_edits(resp.headers_mut(), &route.filters.response_headers);
            Ok(resp)
        }
        RouteAction::Redirect(rd) => redirect(ctx, &req, &route, rd),
        RouteAction::Forward(backends) => {
            let slot = backends
                .pick()
                .ok_or_else(|| ProxyError::NoEndpoint(route.name.clone()))?;
            let backend = compiled
                .backend(slot)
                .ok_or_else(|| ProxyError::NoEndpoint(route.name.clone()))?;
            exchange.cluster = Some(backend.name.clone());
            let cluster = backend
                .cluster
                .clone()
                .ok_or_else(|| ProxyError::BackendNotFound(backend.name.clone()))?;
            drop(compiled);
            // Boxed: hyper keeps a slot the size of this future for every connection, idle
            // ones included, and the forwarding path (retries, pool, connect) is most of it.
            Box::pin(forward(ctx, req, &route, &cluster, exchange)).await
        }
    }
}

/// Applies the sidecar's authorization policies to a request on an inbound capture connection,
/// and tells the application who called: `x-trellis-client-identity` is removed whatever the
/// caller sent, then set to the verified SPIFFE ID of a mesh mTLS caller. Only the inbound side
/// does this: outbound and gateway listeners pass the header on untouched, since the sidecar in
/// front of the destination removes it.
fn authorize<B>(
    ctx: &ConnContext,
    inbound: &InboundMesh,
    req: &mut Request<B>,
) -> Result<(), ProxyError> {
    // `remove` drops every value of the header, not only the first.
    req.headers_mut().remove(&X_TRELLIS_CLIENT_IDENTITY);
    let facts = authz::Facts {
        source_identity: inbound.peer_identity.as_ref(),
        source_ip: ctx.client,
        destination_port: inbound.destination_port,
        http: Some(authz::HttpFacts {
            method: req.method().as_str(),
            path: req.uri().path(),
        }),
    };
    if !authz::check(&ctx.store, &facts).allowed {
        return Err(ProxyError::Forbidden);
    }
    if let Some(id) = &inbound.peer_identity {
        // A SPIFFE ID is ASCII without controls (checked when parsed), so this always holds.
        if let Ok(v) = HeaderValue::from_str(id.as_str()) {
            req.headers_mut()
                .insert(X_TRELLIS_CLIENT_IDENTITY.clone(), v);
        }
    }
    Ok(())
}

/// The request's host: the URI authority (HTTP/2 `:authority`, or an absolute-form HTTP/1.1
/// target), else `Host`. HTTP/1.1 requires one of them (RFC 9112 §3.2).
fn request_host<B>(req: &Request<B>) -> Result<&str, ProxyError> {
    if let Some(a) = req.uri().authority() {
        return Ok(a.as_str());
    }
    match req.headers().get(header::HOST) {
        Some(h) => h
            .to_str()
            .map_err(|_| ProxyError::BadRequest("the Host header is not valid text")),
        None if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        )),
        None => Ok(""),
    }
}

async fn forward(
    ctx: &ConnContext,
    mut req: Request<Incoming>,
    route: &Route,
    cluster: &Arc<Cluster>,
    exchange: &mut Exchange,
) -> Result<Response<ResponseBody>, ProxyError> {
    let deadline = route
        .timeout
        .map(|t| Instant::from_std(exchange.started) + t);
    let hash = cluster
        .hash_key
        .as_ref()
        .and_then(|key| request_hash(key, req.headers(), &ctx.client_ip));
    let downstream_version = req.version();
    // An upgrade the route does not allow goes on as a plain request, its Upgrade removed.
    let upgrade = downstream_version == Version::HTTP_11
        && is_upgrade(req.headers())
        && upgrade::allowed(req.headers(), &route.upgrades);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let informational = parts.extensions.remove::<Informational>();
    let authority = upstream_authority(&parts.uri, &parts.headers, route)?;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    append_forwarded_for(headers, &ctx.client_ip);
    headers.insert(X_FORWARDED_PROTO.clone(), ctx.forwarded_proto.clone());
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), new_request_id());
    }
    exchange.trace_id = Some(trace::propagate(headers));
    if exchange.logging() {
        exchange.request_id = headers.get(&X_REQUEST_ID).cloned();
    }
    apply_edits(headers, &route.filters.request_headers);

    let path_and_query = rewrite_path(&parts.uri, route);
    // HTTP/2 without a host to send names the endpoint, so that part is filled in per try.
    let mut h2_authority = None;
    match cluster.protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::from(path_and_query);
            join_cookies(&mut parts.headers);
            if let Some(a) = authority {
                parts.headers.insert(header::HOST, a);
            }
            // hyper sends a GET or HEAD body of unknown length as no body at all unless the
            // request says chunked: the body the client framed must not be dropped.
            if !body.is_end_stream()
                && body.size_hint().exact().is_none()
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                parts.headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
        }
        UpstreamProtocol::Http2 => {
            parts.version = Version::HTTP_2;
            if let Some(a) = authority {
                h2_authority =
                    Some(Authority::try_from(a.as_bytes()).map_err(|_| {
                        ProxyError::BadRequest("the host is not a valid authority")
                    })?);
            }
            let mut uri = http::uri::Parts::default();
            uri.path_and_query = Some(path_and_query);
            parts.uri = Uri::from_parts(uri).unwrap_or_default();
            // HTTP/2 carries the host as :authority.
            parts.headers.remove(header::HOST);
        }
    }

    if let Some(downstream_upgrade) = downstream_upgrade {
        let Some(endpoint) = cluster.pick(hash) else {
            return Err(no_endpoint(cluster));
        };
        exchange.upstream = Some(endpoint.address);
        let Some(active) = cluster.breakers.try_request() else {
            return Err(overflow(cluster, Limit::Requests));
        };
        let upstream_req = Request::from_parts(parts, RequestBody::streaming(body));
        let in_flight = endpoint.state.start();
        let sent = Instant::now();
        let result = tunnel(
            route,
            &endpoint.pool,
            cluster.protocol,
            upstream_req,
            downstream_upgrade,
            deadline,
        )
        .await;
        if let Some(outcome) = outcome(&result) {
            cluster.record(endpoint, outcome);
        }
        record_upstream(cluster, &result, sent);
        drop((in_flight, active));
        return result;
    }

    let policy = &route.retry;
    let grpc = retry::is_grpc(&parts.headers);
    let idempotent = retry::is_idempotent(&parts.method);
    let mut body = TryBody::new(body, policy);
    cluster.breakers.deposit();
    // Endpoints this request failed on; a retry goes elsewhere when it can.
    let mut failed_on: Vec<SocketAddr> = Vec::new();
    let mut retry_slot = None;
    let mut template = Some(parts);
    loop {
        let Some(endpoint) = cluster.pick_avoiding(hash, &failed_on) else {
            return Err(no_endpoint(cluster));
        };
        exchange.upstream = Some(endpoint.address);
        let Some(active) = cluster.breakers.try_request() else {
            return Err(overflow(cluster, Limit::Requests));
        };
        let may_retry = exchange.retries < policy.attempts && body.may_replay();
        let (Some(try_parts), Some(try_body)) = (next_parts(&mut template, may_retry), body.next())
        else {
            // Not reached: a try is only started when the last one left parts and body behind.
            return Err(ProxyError::UpstreamTimeout);
        };
        let try_body = try_body.filter_trailers(&route.filters.request_headers);
        let mut upstream_req = Request::from_parts(try_parts, try_body);
        if let Some(client) = &informational {
            relay_informational(&mut upstream_req, client.clone());
        }
        match cluster.protocol {
            UpstreamProtocol::Http2 => {
                set_h2_authority(&mut upstream_req, h2_authority.as_ref(), endpoint.address)
            }
            // HTTP/1.1 requires a Host (an HTTP/1.0 or HTTP/2 request may have none): name the
            // endpoint, as HTTP/2 does for a missing :authority.
            UpstreamProtocol::Http1 => {
                if !upstream_req.headers().contains_key(header::HOST)
                    && let Ok(v) = HeaderValue::from_str(&endpoint.address.to_string())
                {
                    upstream_req.headers_mut().insert(header::HOST, v);
                }
            }
        }

        let in_flight = endpoint.state.start();
        let sent = Instant::now();
        let movable = retry::may_leave_stalled(policy, idempotent, may_retry);
        let result = send_try(
            endpoint.pool.send(upstream_req),
            policy.per_try_timeout,
            deadline,
            || movable && cluster.stalled_while_peers_answer(endpoint),
        )
        .await
        .map_err(|e| e.in_cluster(&cluster.name))
        .and_then(framing_agrees);
        drop(retry_slot.take());
        if let Some(outcome) = outcome(&result) {
            cluster.record(endpoint, outcome);
        }
        record_upstream(cluster, &result, sent);

        let wanted = if may_retry && template.is_some() {
            retry::wanted(policy, idempotent, grpc, &result)
        } else {
            None
        };
        if let Some(wanted) = wanted {
            match plan_retry(
                cluster,
                policy,
                &body,
                wanted,
                exchange.retries + 1,
                deadline,
            ) {
                Ok((delay, slot)) => {
                    drop(result);
                    drop((in_flight, active));
                    tokio::time::sleep(delay).await;
                    cluster.metrics.retry(RetryOutcome::Attempted);
                    exchange.retries += 1;
                    failed_on.push(endpoint.address);
                    retry_slot = Some(slot);
                    continue;
                }
                Err(Some(outcome)) => cluster.metrics.retry(outcome),
                Err(None) => {}
            }
        }

        let mut resp = result?;
        if let TryBody::Replay(replay) = &body {
            replay.commit();
        }
        if let Some(decay) = cluster.ewma_decay() {
            in_flight.record_rtt(decay);
        }
        let body = resp.body_mut();
        body.hold(in_flight, active);
        body.count_errors(cluster.metrics.clone());
        // gRPC streams run as long as the call; their deadline is the call's own
        // (`grpc-timeout`), so the route's timeout ends at the response head for them.
        if !grpc && let Some(deadline) = deadline {
            body.deadline(Some(deadline));
        }
        // The downstream connection keeps its own protocol whatever the upstream spoke.
        *resp.version_mut() = downstream_version;
        strip_hop_by_hop(resp.headers_mut(), false);
        apply_edits(resp.headers_mut(), &route.filters.response_headers);
        return Ok(resp);
    }
}

/// Passes the upstream's `103 Early Hints` on to the client (hyper reports 1xx heads of HTTP/1
/// upstreams only). Other 1xx are the upstream connection's business: `100 Continue` answers
/// the proxy's own expectation. The client's own `expect: 100-continue` is answered here, as
/// its body is about to be read (on HTTP/2; hyper answers it on HTTP/1.1).
fn relay_informational(req: &mut Request<RequestBody>, client: Informational) {
    client.send_continue();
    hyper::ext::on_informational(req, move |resp| {
        if resp.status().as_u16() == 103 {
            let mut headers = resp.headers().clone();
            strip_hop_by_hop(&mut headers, false);
            client.send(resp.status(), &headers);
        }
    });
}

/// Refuses an upstream response whose framing contradicts itself: relayed, a length and a
/// chunked body would leave the client to guess where it ends (RFC 9112 §6.3 lets a proxy
/// refuse it, and smuggling thrives on such guesses).
fn framing_agrees(resp: Response<ResponseBody>) -> Result<Response<ResponseBody>, ProxyError> {
    let h = resp.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err(ProxyError::UpstreamFraming(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(resp)
}

/// The request body of each try: sent once as it streams, or kept for replay.
enum TryBody {
    Empty,
    Once(Option<Incoming>),
    Replay(Replay),
}

impl TryBody {
    fn new(body: Incoming, policy: &RetryPolicy) -> Self {
        if body.is_end_stream() {
            return TryBody::Empty;
        }
        // A body announced larger than the buffer is never kept (and never retried once read).
        let too_large = body.size_hint().lower() > policy.replay_buffer as u64;
        if policy.attempts == 0 || too_large {
            return TryBody::Once(Some(body));
        }
        TryBody::Replay(Replay::new(body, policy.replay_buffer))
    }

    /// Whether a try after this one could send the body again, as far as is known now. A body
    /// that has not been read yet can always be sent once more.
    fn may_replay(&self) -> bool {
        match self {
            TryBody::Empty => true,
            TryBody::Once(body) => body.is_some(),
            TryBody::Replay(r) => r.replayable(),
        }
    }

    fn next(&mut self) -> Option<RequestBody> {
        match self {
            TryBody::Empty => Some(RequestBody::empty()),
            TryBody::Once(body) => body.take().map(RequestBody::streaming),
            TryBody::Replay(r) => r.body().map(RequestBody::replay),
        }
    }
}

/// The head for the next try: a copy while more tries may follow, else the original.
fn next_parts(template: &mut Option<Parts>, copy: bool) -> Option<Parts> {
    if !copy {
        return template.take();
    }
    let t = template.as_ref()?;
    let (mut p, ()) = Request::new(()).into_parts();
    p.method = t.method.clone();
    p.uri = t.uri.clone();
    p.version = t.version;
    p.headers = t.headers.clone();
    Some(p)
}

fn set_h2_authority<B>(req: &mut Request<B>, authority: Option<&Authority>, endpoint: SocketAddr) {
    let authority = match authority {
        Some(a) => a.clone(),
        None => Authority::try_from(endpoint.to_string())
            .unwrap_or_else(|_| Authority::from_static("localhost")),
    };
    let mut uri = std::mem::take(req.uri_mut()).into_parts();
    uri.scheme = Some(UriScheme::HTTP);
    uri.authority = Some(authority);
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
}

/// How often a try that has waited [`STALL_MIN_MS`](crate::upstream::endpoint::STALL_MIN_MS)
/// asks whether its endpoint stalled.
const STALL_POLL: Duration = Duration::from_millis(100);

/// One try, bounded by the per-try timeout and the route's deadline, whichever comes first.
///
/// A try still without a response head after the shortest stall an endpoint can show also asks
/// `stalled` (then every [`STALL_POLL`]); when it says so the try is given up as
/// `upstream-stalled`, for the caller to retry elsewhere. This is what keeps requests already
/// sent to a hung endpoint from waiting out the route timeout; a try that gets its head within
/// that second costs no more than before (one timer).
async fn send_try<F>(
    send: F,
    per_try: Option<Duration>,
    deadline: Option<Instant>,
    stalled: impl Fn() -> bool,
) -> Result<Response<ResponseBody>, ProxyError>
where
    F: Future<Output = Result<Response<ResponseBody>, UpstreamError>>,
{
    let per_try = per_try.map(|t| Instant::now() + t);
    // The limit, and whether reaching it is the per-try timeout (else the route's).
    let limit = match (per_try, deadline) {
        (Some(p), Some(d)) if p < d => Some((p, true)),
        (_, Some(d)) => Some((d, false)),
        (Some(p), None) => Some((p, true)),
        (None, None) => None,
    };
    let timed_out = |per_try: bool| {
        if per_try {
            ProxyError::PerTryTimeout
        } else {
            ProxyError::UpstreamTimeout
        }
    };
    let mut send = std::pin::pin!(send);
    let mut check_at = Instant::now() + Duration::from_millis(STALL_MIN_MS);
    loop {
        let wake = match limit {
            Some((at, _)) if at <= check_at => at,
            _ => check_at,
        };
        match tokio::time::timeout_at(wake, &mut send).await {
            Ok(r) => return r.map_err(ProxyError::from_upstream),
            Err(_) => {
                if let Some((at, per_try)) = limit
                    && Instant::now() >= at
                {
                    return Err(timed_out(per_try));
                }
                if stalled() {
                    return Err(ProxyError::UpstreamStalled);
                }
                check_at = Instant::now() + STALL_POLL;
            }
        }
    }
}

/// Whether a retry the policy wants may go ahead, and after how long. `Err` names why not
/// (for the retry metric) when it is a limit rather than the policy's own bounds.
fn plan_retry(
    cluster: &Cluster,
    policy: &RetryPolicy,
    body: &TryBody,
    wanted: retry::Wanted,
    n: u32,
    deadline: Option<Instant>,
) -> Result<(Duration, ActiveRetry), Option<RetryOutcome>> {
    if !body.may_replay() {
        return Err(Some(RetryOutcome::NotReplayable));
    }
    let delay = retry::delay(policy, wanted, n).map_err(Some)?;
    if deadline.is_some_and(|d| Instant::now() + delay >= d) {
        return Err(None);
    }
    if !cluster.breakers.withdraw() {
        return Err(Some(RetryOutcome::BudgetExhausted));
    }
    match cluster.breakers.try_retry() {
        Some(slot) => Ok((delay, slot)),
        None => {
            cluster.metrics.circuit_breaker_overflows.increment(1);
            Err(Some(RetryOutcome::Overflow))
        }
    }
}

fn no_endpoint(cluster: &Cluster) -> ProxyError {
    let e = ProxyError::NoEndpoint(cluster.name.clone());
    cluster.metrics.error(e.reason());
    e
}

fn overflow(cluster: &Cluster, limit: Limit) -> ProxyError {
    cluster.metrics.circuit_breaker_overflows.increment(1);
    let e = ProxyError::Overflow(cluster.name.clone(), limit.as_str());
    cluster.metrics.error(e.reason());
    e
}

/// Upstream metrics of one exchange: its status class and time to the response head, or why it
/// failed.
fn record_upstream(
    cluster: &Cluster,
    result: &Result<Response<ResponseBody>, ProxyError>,
    sent: Instant,
) {
    let m = &cluster.metrics;
    match result {
        Ok(resp) => {
            m.response(resp.status().as_u16());
            m.duration.record(sent.elapsed().as_secs_f64());
        }
        Err(e) => {
            m.error(e.reason());
            match e {
                ProxyError::ConnectTimeout(_) => m.timeout(TimeoutKind::Connect),
                ProxyError::UpstreamTimeout => m.timeout(TimeoutKind::Response),
                ProxyError::PerTryTimeout => m.timeout(TimeoutKind::PerTry),
                ProxyError::Overflow(..) => m.circuit_breaker_overflows.increment(1),
                _ => {}
            }
        }
    }
}

/// What passive health checking makes of an exchange; nothing when the client broke it, so a
/// client cannot get a healthy endpoint ejected.
fn outcome(result: &Result<Response<ResponseBody>, ProxyError>) -> Option<Outcome> {
    Some(match result {
        Ok(resp) if resp.status().is_server_error() => Outcome::ServerError(resp.status().as_u16()),
        Ok(_) => Outcome::Success,
        Err(e) if e.blame() == Blame::Downstream => return None,
        Err(e) if e.is_connect_failure() => Outcome::ConnectFailure,
        Err(e) => Outcome::ServerError(e.status().as_u16()),
    })
}

/// The consistent-hash key of a request; `None` (a random pick) when the request lacks it.
/// `client` is the client's address as text, formatted once per connection.
fn request_hash(key: &HashKey, headers: &HeaderMap, client: &HeaderValue) -> Option<u64> {
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == &**name).then(|| hash64(v.as_bytes()))
            }),
        HashKey::SourceIp => Some(hash64(client.as_bytes())),
    }
}

/// The authority to send upstream: the route's host rewrite, else the request's own host.
fn upstream_authority(
    uri: &Uri,
    headers: &HeaderMap,
    route: &Route,
) -> Result<Option<HeaderValue>, ProxyError> {
    if let Some(host) = route.filters.rewrite.as_ref().and_then(|r| r.host.as_ref()) {
        return Ok(Some(host.clone()));
    }
    if let Some(a) = uri.authority() {
        return HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("the authority is not valid"));
    }
    Ok(headers.get(header::HOST).cloned())
}

/// The upstream request target, after the route's path rewrite; the query is kept.
fn rewrite_path(uri: &Uri, route: &Route) -> PathAndQuery {
    let rewrite = route.filters.rewrite.as_ref().and_then(|r| r.path.as_ref());
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some(rewrite) = rewrite else {
        return original;
    };
    let path = new_path(uri.path(), rewrite, route.prefix.as_deref());
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    PathAndQuery::try_from(target).unwrap_or(original)
}

/// Applies a full or prefix path replacement. A prefix replacement swaps the segments the route's
/// prefix matched and keeps the rest as it is, trailing slash and all, as the Gateway API's
/// `ReplacePrefixMatch` table has it: with prefix `/old`, `/old/x` becomes `/new/x` under `/new`
/// and `/x` under `/`, `/old/` becomes `/new/`, and `/old` becomes `/new`.
pub fn new_path(path: &str, rewrite: &PathRewrite, matched_prefix: Option<&str>) -> String {
    match rewrite {
        PathRewrite::Full(p) => p.to_string(),
        PathRewrite::Prefix(replacement) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            // What follows the prefix starts a new segment (or is empty): routing matched it on
            // a segment boundary.
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let base = replacement.trim_end_matches('/');
            match (base.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (false, true) => base.to_owned(),
                (_, false) if !rest.starts_with('/') => format!("{base}/{rest}"),
                (_, false) => format!("{base}{rest}"),
            }
        }
    }
}

fn redirect(
    ctx: &ConnContext,
    req: &Request<Incoming>,
    route: &Route,
    rd: &Redirect,
) -> Result<Response<ResponseBody>, ProxyError> {
    let host_header = request_host(req)?;
    let host = match &rd.host {
        Some(h) => h.to_string(),
        None => strip_port(host_header).to_owned(),
    };
    // With no redirect scheme the Location keeps the listener's: `https` where it terminates TLS.
    let listener_scheme = if ctx.forwarded_proto == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let scheme = rd.scheme.unwrap_or(listener_scheme);
    let path = match &rd.path {
        Some(rewrite) => new_path(req.uri().path(), rewrite, route.prefix.as_deref()),
        None => req.uri().path().to_owned(),
    };
    let mut location = format!("{}://{host}", scheme.as_str());
    if let Some(p) = redirect_port(rd, ctx.local_port, listener_scheme) {
        location.push_str(&format!(":{p}"));
    }
    location.push_str(&path);
    if let Some(q) = req.uri().query() {
        location.push('?');
        location.push_str(q);
    }
    let location = HeaderValue::from_str(&location)
        .map_err(|_| ProxyError::BadRequest("the redirect target is not a valid header value"))?;
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = rd.status;
    resp.headers_mut().insert(header::LOCATION, location);
    apply_edits(resp.headers_mut(), &route.filters.response_headers);
    Ok(resp)
}

/// The port a redirect's Location names, by the Gateway API's HTTPRequestRedirectFilter rules: an
/// explicit port wins; a redirect scheme alone means its well-known port; with neither, the
/// listener's port (never the Host header's). Port 80 under `http` and 443 under `https` are
/// left out.
fn redirect_port(rd: &Redirect, listener_port: Option<u16>, listener: Scheme) -> Option<u16> {
    let scheme = rd.scheme.unwrap_or(listener);
    let port = match (rd.port, rd.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(s)) => Some(s.default_port()),
        (None, None) => listener_port,
    };
    port.filter(|p| *p != scheme.default_port())
}

/// Remove, then set, then add.
pub fn apply_edits(headers: &mut HeaderMap, edits: &HeaderEdits) {
    if edits.is_empty() {
        return;
    }
    for name in edits.remove.iter() {
        headers.remove(name);
    }
    for (name, value) in edits.set.iter() {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in edits.add.iter() {
        headers.append(name.clone(), value.clone());
    }
}

/// Forwards an HTTP/1.1 upgrade (WebSocket) and, once the upstream switches protocols, copies
/// bytes both ways between the two upgraded connections until either side closes.
async fn tunnel(
    route: &Route,
    endpoint: &Arc<crate::upstream::EndpointPool>,
    protocol: UpstreamProtocol,
    req: Request<RequestBody>,
    downstream: hyper::upgrade::OnUpgrade,
    deadline: Option<Instant>,
) -> Result<Response<ResponseBody>, ProxyError> {
    if protocol != UpstreamProtocol::Http1 {
        return Err(ProxyError::UpgradeUnsupported);
    }
    // The route's timeout covers the handshake; the tunnel then lasts as long as both sides
    // want it.
    let send = endpoint.send_upgrade(req);
    let mut resp = match deadline {
        Some(at) => tokio::time::timeout_at(at, send)
            .await
            .map_err(|_| ProxyError::UpstreamTimeout)?,
        None => send.await,
    }
    .map_err(ProxyError::from_upstream)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(resp.headers_mut(), false);
        apply_edits(resp.headers_mut(), &route.filters.response_headers);
        return Ok(resp.map(|b| ResponseBody::Upstream(UpstreamBody::new(b, None))));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
    strip_hop_by_hop(resp.headers_mut(), true);
    apply_edits(resp.headers_mut(), &route.filters.response_headers);
    Ok(resp.map(|_| ResponseBody::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> impl Future<Output = Result<Response<ResponseBody>, UpstreamError>> {
        std::future::pending()
    }

    /// A try with no answer leaves its endpoint once told it stalled, not before the shortest
    /// stall; otherwise the per-try timeout or the route's deadline ends it as before.
    #[tokio::test]
    async fn a_try_leaves_a_stalled_endpoint_only_when_told() {
        let start = Instant::now();
        let r = send_try(never(), None, Some(start + Duration::from_secs(5)), || true).await;
        let took = start.elapsed();
        assert!(matches!(r, Err(ProxyError::UpstreamStalled)), "{r:?}");
        assert!(took >= Duration::from_millis(STALL_MIN_MS), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");

        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(1300));
        let r = send_try(never(), None, deadline, || false).await;
        assert!(matches!(r, Err(ProxyError::UpstreamTimeout)), "{r:?}");
        assert!(start.elapsed() >= Duration::from_millis(1300));

        let per_try = Some(Duration::from_millis(200));
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        let r = send_try(never(), per_try, deadline, || true).await;
        assert!(matches!(r, Err(ProxyError::PerTryTimeout)), "{r:?}");
    }

    /// The Gateway API's `ReplacePrefixMatch` table (HTTPPathModifier), row by row, then the
    /// rows it implies for merged slashes and a root prefix.
    #[test]
    fn prefix_rewrites_follow_the_gateway_api_table() {
        let p =
            |path, prefix, to: &str| new_path(path, &PathRewrite::Prefix(to.into()), Some(prefix));
        let table = [
            // The spec's rows, in its order.
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            // What the rows imply for a root prefix, longer and doubled slashes.
            ("/foo/bar", "/", "", "/foo/bar"),
            ("/foo/", "/", "", "/foo/"),
            ("/foo/bar", "/", "/", "/foo/bar"),
            ("/foo/", "/", "/", "/foo/"),
            ("/foo/bar/", "/foo", "/xyz", "/xyz/bar/"),
            ("/foo/bar", "/foo/bar", "/xyz/", "/xyz"),
            ("/foo/bar/", "/foo/bar", "/", "/"),
            // The rewrite itself collapses nothing.
            ("/old//x", "/old", "/new", "/new//x"),
            ("/old//x", "/old", "/", "//x"),
            ("/old//", "/old", "/new/", "/new//"),
            ("/old/x/", "/old", "/new", "/new/x/"),
            ("/x", "/", "/new", "/new/x"),
            ("/", "/", "/new", "/new/"),
        ];
        for (path, prefix, to, want) in table {
            assert_eq!(p(path, prefix, to), want, "{path} with {prefix} -> {to:?}");
        }
    }

    #[test]
    fn prefix_rewrites_whole_segments() {
        let p =
            |path, to: &str, prefix| new_path(path, &PathRewrite::Prefix(to.into()), Some(prefix));
        assert_eq!(p("/api/v1", "/", "/api"), "/v1");
        assert_eq!(p("/api", "/", "/api"), "/");
        assert_eq!(p("/api/", "/", "/api"), "/");
        assert_eq!(p("/api/v1", "/new", "/api"), "/new/v1");
        assert_eq!(p("/api/v1", "/new/", "/api"), "/new/v1");
        assert_eq!(p("/api", "/new", "/api"), "/new");
        assert_eq!(p("/x/y", "/pre", "/"), "/pre/x/y");
        assert_eq!(
            new_path("/a/b", &PathRewrite::Full("/c".into()), Some("/a")),
            "/c"
        );
    }

    #[test]
    fn redirect_ports_follow_the_gateway_api() {
        let rd = |scheme, port| Redirect {
            scheme,
            host: None,
            port,
            path: None,
            status: StatusCode::FOUND,
        };
        let (http, https) = (Some(Scheme::Http), Some(Scheme::Https));
        let rows = [
            // (scheme, port, listener port, written port)
            (None, None, Some(8080), Some(8080)),
            (None, None, Some(80), None),
            (None, None, Some(443), Some(443)),
            (None, None, None, None),
            (https, None, Some(8080), None),
            (http, None, Some(8080), None),
            (None, Some(9000), Some(8080), Some(9000)),
            (None, Some(80), Some(8080), None),
            (https, Some(443), Some(8080), None),
            (https, Some(80), Some(8080), Some(80)),
            (http, Some(443), Some(8080), Some(443)),
        ];
        for (scheme, port, listener, want) in rows {
            assert_eq!(
                redirect_port(&rd(scheme, port), listener, Scheme::Http),
                want,
                "scheme {scheme:?}, port {port:?}, listener {listener:?}"
            );
        }
    }
}
