//! Retries, replay, budgets, circuit breakers, rate limits and timeouts, end to end: a real proxy
//! in front of scripted upstreams on 127.0.0.1.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What a scripted upstream does with its n-th request (0-based).
#[derive(Clone, Debug)]
enum Act {
    Respond {
        status: u16,
        delay: Duration,
        headers: Vec<(&'static str, String)>,
    },
    /// Close the connection without answering.
    Close,
}

fn ok() -> Act {
    status(200)
}

fn status(code: u16) -> Act {
    Act::Respond {
        status: code,
        delay: Duration::ZERO,
        headers: Vec::new(),
    }
}

fn slow(delay: Duration) -> Act {
    Act::Respond {
        status: 200,
        delay,
        headers: Vec::new(),
    }
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
struct Arrival {
    method: String,
    body: Bytes,
    at: Instant,
}

type Script = Arc<dyn Fn(usize) -> Act + Send + Sync>;

/// An HTTP/1.1 upstream that follows a script, records what it receives, and can be killed
/// (listener and every connection closed at once).
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Arrival>>>,
    kill: watch::Sender<bool>,
}

impl Upstream {
    async fn start(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kill = watch::Sender::new(false);
        let script: Script = Arc::new(script);
        let counter = Arc::new(AtomicUsize::new(0));
        let (s, mut killed) = (seen.clone(), kill.subscribe());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = killed.wait_for(|k| *k) => return,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { return };
                let (s, script, counter) = (s.clone(), script.clone(), counter.clone());
                let mut conn_killed = killed.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, script, counter) = (s.clone(), script.clone(), counter.clone());
                        async move {
                            let method = req.method().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body = body.unwrap_or_default();
                            let n = counter.fetch_add(1, Ordering::SeqCst);
                            s.lock().unwrap().push(Arrival {
                                method,
                                body,
                                at: Instant::now(),
                            });
                            match script(n) {
                                Act::Close => Err("closing without an answer"),
                                Act::Respond {
                                    status,
                                    delay,
                                    headers,
                                } => {
                                    tokio::time::sleep(delay).await;
                                    let mut resp = Response::new(Full::new(Bytes::from(format!(
                                        "answer {n}"
                                    ))));
                                    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                                    for (k, v) in headers {
                                        resp.headers_mut().insert(k, v.parse().unwrap());
                                    }
                                    Ok::<_, &str>(resp)
                                }
                            }
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_killed.wait_for(|k| *k) => {}
                    }
                });
            }
        });
        Upstream { addr, seen, kill }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.seen.lock().unwrap().clone()
    }

    fn kill(&self) {
        self.kill.send_replace(true);
    }
}

/// One route `/` with `route_extra` (YAML keys at route level) to cluster `name` over
/// `endpoints`, with `cluster_extra` at cluster level.
fn one_route(
    name: &str,
    endpoints: &[SocketAddr],
    route_extra: &str,
    cluster_extra: &str,
) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    config(
        &format!(
            "          - match: {{ path: {{ prefix: / }} }}\n            forward: {{ cluster: {name} }}\n{route_extra}"
        ),
        &format!(
            "  - name: {name}\n    lb: {{ policy: round_robin }}\n    endpoints: [{}]\n{cluster_extra}",
            eps.join(", ")
        ),
    )
}

async fn post(client: &TestClient, url: &str, body: Vec<u8>) -> (Response<()>, Bytes) {
    send(
        client,
        Request::post(url)
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await
}

fn error_reason(resp: &Response<()>) -> &str {
    resp.headers()
        .get("x-trellis-error")
        .map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn failing_first_tries_then_success() {
    let up = Upstream::start(|n| if n < 2 { status(503) } else { ok() }).await;
    let yaml = one_route(
        "retry-n",
        &[up.addr],
        "            retry: { attempts: 3, retry_on: [gateway-error], backoff: { base: 5ms, max: 20ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, body) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&body[..], b"answer 2");
    assert_eq!(up.count(), 3, "two failures, then the success");

    // With fewer attempts than failures the last failure is the answer.
    let up = Upstream::start(|_| status(503)).await;
    let yaml = one_route(
        "retry-exhausted",
        &[up.addr],
        "            retry: { attempts: 1, retry_on: [gateway-error], backoff: { base: 1ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_reason(&resp), "", "the upstream's own 503");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn per_try_timeout_fires_and_the_next_try_succeeds() {
    let up = Upstream::start(|n| {
        if n == 0 {
            slow(Duration::from_secs(3))
        } else {
            ok()
        }
    })
    .await;
    let yaml = one_route(
        "per-try",
        &[up.addr],
        "            retry: { per_try_timeout: 200ms, backoff: { base: 1ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let started = Instant::now();
    let (resp, body) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body:?}");
    assert_eq!(&body[..], b"answer 1");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "did not wait out the slow try"
    );

    // Every try slow: the per-try timeout is the answer.
    let up = Upstream::start(|_| slow(Duration::from_secs(3))).await;
    let yaml = one_route(
        "per-try-all",
        &[up.addr],
        "            retry: { attempts: 1, per_try_timeout: 100ms, backoff: { base: 1ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_reason(&resp), "per-try-timeout");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn backoff_waits_stay_within_the_jitter_bounds() {
    let up = Upstream::start(|_| status(503)).await;
    let yaml = one_route(
        "backoff",
        &[up.addr],
        "            retry: { attempts: 4, retry_on: [gateway-error], backoff: { base: 40ms, max: 100ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let arrivals = up.arrivals();
    assert_eq!(arrivals.len(), 5);
    // Caps: 40, 80, 100, 100 ms; allow generous slack for a loaded machine, no lower bound
    // (full jitter may draw 0).
    let caps = [40u64, 80, 100, 100];
    for (i, pair) in arrivals.windows(2).enumerate() {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap <= Duration::from_millis(caps[i] + 250),
            "gap {i} was {gap:?}, cap {}ms",
            caps[i]
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_the_backoff_max() {
    let after = |secs: &str| Act::Respond {
        status: 503,
        delay: Duration::ZERO,
        headers: vec![("retry-after", secs.to_owned())],
    };
    let up = Upstream::start(move |n| if n == 0 { after("1") } else { ok() }).await;
    let yaml = one_route(
        "retry-after",
        &[up.addr],
        "            retry: { retry_on: [gateway-error], backoff: { base: 10ms, max: 2s } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let a = up.arrivals();
    assert!(
        a[1].at - a[0].at >= Duration::from_millis(950),
        "waited {:?}",
        a[1].at - a[0].at
    );

    // Asked to wait longer than the policy's max: the 503 stands.
    let up = Upstream::start(move |_| after("30")).await;
    let yaml = one_route(
        "retry-after-long",
        &[up.addr],
        "            retry: { retry_on: [gateway-error], backoff: { base: 10ms, max: 2s } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn small_bodies_are_replayed_exactly_large_ones_are_not_retried() {
    let up = Upstream::start(|_| status(503)).await;
    let yaml = one_route(
        "replay",
        &[up.addr],
        "            retry: { attempts: 1, retry_on: [gateway-error], retry_non_idempotent: true, backoff: { base: 1ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let client = h1_client();
    let small: Vec<u8> = (0..10 * 1024).map(|i| (i % 251) as u8).collect();
    let (resp, _) = post(&client, &format!("http://{addr}/"), small.clone()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let a = up.arrivals();
    assert_eq!(a.len(), 2, "a 10 KiB POST is sent twice");
    assert!(
        a.iter()
            .all(|x| x.method == "POST" && x.body[..] == small[..])
    );

    let large: Vec<u8> = (0..100 * 1024).map(|i| (i % 253) as u8).collect();
    let (resp, _) = post(&client, &format!("http://{addr}/"), large.clone()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let a = up.arrivals();
    assert_eq!(a.len(), 3, "a 100 KiB POST is sent once");
    assert_eq!(a[2].body[..], large[..]);

    // Chunked, so its size is unknown until more than the buffer has streamed.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut req =
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .to_vec();
    for chunk in large.chunks(8192) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    raw.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 503"));
    let a = up.arrivals();
    assert_eq!(a.len(), 4, "a streamed 100 KiB POST is sent once");
    assert_eq!(a[3].body[..], large[..]);
}

#[tokio::test]
async fn non_idempotent_requests_are_retried_only_when_never_sent() {
    // A dead endpoint first in round robin: connect failures are safe to retry for any method.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let up = Upstream::start(|_| ok()).await;
    let yaml = one_route("never-sent", &[dead_addr, up.addr], "", "");
    let (_p, addr) = start_proxy(&yaml).await;
    let client = h1_client();
    for i in 0..4 {
        let (resp, _) = post(&client, &format!("http://{addr}/"), vec![b'x'; 100]).await;
        assert_eq!(resp.status(), StatusCode::OK, "POST {i}");
    }
    assert_eq!(
        up.count(),
        4,
        "each POST reached the live endpoint exactly once"
    );

    // An upstream that reads the request then drops the connection: a GET is retried by
    // default, a POST is not (the upstream may have acted on it).
    let up = Upstream::start(|n| if n % 2 == 0 { Act::Close } else { ok() }).await;
    let yaml = one_route(
        "reset",
        &[up.addr],
        "            retry: { backoff: { base: 1ms } }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&client, &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.count(), 2);
    let (resp, _) = post(&client, &format!("http://{addr}/"), b"once".to_vec()).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_reason(&resp), "upstream-reset");
    assert_eq!(up.count(), 3, "the POST was not sent again");
}

#[tokio::test]
async fn retry_budget_bounds_retries() {
    let up = Upstream::start(|_| status(500)).await;
    let yaml = one_route(
        "budget",
        &[up.addr],
        "            retry: { attempts: 3, retry_on: [5xx], backoff: { base: 1ms, max: 2ms } }\n",
        "    retry_budget: { percent: 20, min_retries_per_second: 0 }\n    outlier_detection: { enabled: false }\n",
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    let client = h1_client();
    for _ in 0..50 {
        let (resp, _) = get(&client, &format!("http://{addr}/")).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let retries = up.count() - 50;
    // 20% of 50 requests; without the budget it would be 150.
    assert!(retries <= 10, "{retries} retries");
    assert!(retries >= 8, "the budget allowed {retries} retries");
    let m = scrape(admin).await;
    let exhausted = metric(
        &m,
        "trellis_retries_total",
        &[("cluster", "budget"), ("outcome", "budget_exhausted")],
    );
    assert!(exhausted.unwrap_or(0.0) >= 30.0, "{exhausted:?}");
}

/// An upstream that answers one request per connection with keep-alive, then closes the
/// connection shortly after without saying so.
async fn closing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let a = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let a = a.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                a.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    (addr, answered)
}

#[tokio::test]
async fn stale_pooled_connections_are_retried_whatever_the_policy() {
    let (up, answered) = closing_upstream().await;
    let yaml = one_route("stale", &[up], "            retry: { attempts: 0 }\n", "");
    let (_p, addr) = start_proxy(&yaml).await;
    let client = h1_client();
    for i in 0..5 {
        let (resp, body) = get(&client, &format!("http://{addr}/")).await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}: {body:?}");
        // Let the upstream close the pooled connection.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (resp, _) = post(&client, &format!("http://{addr}/"), b"body".to_vec()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(answered.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn circuit_breakers_overflow_with_503() {
    let up = Upstream::start(|_| slow(Duration::from_millis(600))).await;
    let yaml = one_route(
        "breaker-requests",
        &[up.addr],
        "",
        "    circuit_breakers: { max_requests: 1 }\n",
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    let client = h1_client();
    let url = format!("http://{addr}/");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_, dump) = get(&client, &format!("http://{admin}/clusters")).await;
    let dump: serde_json::Value = serde_json::from_slice(&dump).unwrap();
    let breakers = &dump["clusters"][0]["circuit_breakers"];
    assert_eq!(breakers["active_requests"], 1, "{dump}");
    assert_eq!(breakers["open_connections"], 1, "{dump}");
    let (resp, body) = get(&client, &url).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_reason(&resp), "overflow");
    assert!(String::from_utf8_lossy(&body).contains("max_requests"));
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
    let m = scrape(admin).await;
    assert_eq!(
        metric(
            &m,
            "trellis_circuit_breaker_overflows_total",
            &[("cluster", "breaker-requests")]
        ),
        Some(1.0)
    );

    // One connection, one waiting request: a third concurrent request overflows.
    let up = Upstream::start(|_| slow(Duration::from_millis(600))).await;
    let yaml = one_route(
        "breaker-conns",
        &[up.addr],
        "",
        "    circuit_breakers: { max_connections: 1, max_pending_requests: 1 }\n",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let url = format!("http://{addr}/");
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (client, url) = (h1_client(), url.clone());
        tasks.push(tokio::spawn(async move { get(&client, &url).await }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (resp, body) = get(&h1_client(), &url).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(error_reason(&resp), "overflow");
    assert!(String::from_utf8_lossy(&body).contains("max_pending_requests"));
    for t in tasks {
        assert_eq!(
            t.await.unwrap().0.status(),
            StatusCode::OK,
            "the waiting request is served"
        );
    }
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn rate_limits_answer_429() {
    let up = Upstream::start(|_| ok()).await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: limited-host
        domains: ["limited.test"]
        rate_limit: {{ max_tokens: 3, fill_interval: 1h }}
        routes:
          - forward: {{ cluster: rl }}
      - name: all
        domains: ["*"]
        routes:
          - match: {{ path: {{ prefix: /tight }} }}
            forward: {{ cluster: rl }}
            rate_limit: {{ max_tokens: 2, tokens_per_fill: 1, fill_interval: 1h }}
          - forward: {{ cluster: rl }}
clusters:
  - name: rl
    endpoints: ["{}"]
"#,
        up.addr
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let client = h1_client();
    let statuses = |n: usize, url: String, host: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let mut req = Request::get(&url);
                if let Some(h) = host {
                    req = req.header("host", h);
                }
                let (resp, _) = send(&client, req.body(Full::default()).unwrap()).await;
                out.push((resp.status().as_u16(), error_reason(&resp).to_owned()));
            }
            out
        }
    };
    let tight = statuses(3, format!("http://{addr}/tight"), None).await;
    assert_eq!(tight[0].0, 200);
    assert_eq!(tight[1].0, 200);
    assert_eq!(tight[2], (429, "rate-limited".to_owned()));
    // Other routes have their own (no) limit.
    let open = statuses(5, format!("http://{addr}/open"), None).await;
    assert!(open.iter().all(|(s, _)| *s == 200));
    let host = statuses(4, format!("http://{addr}/any"), Some("limited.test")).await;
    assert_eq!(
        host.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![200, 200, 200, 429]
    );
}

#[tokio::test]
async fn route_timeout_covers_head_and_body() {
    let up = Upstream::start(|_| slow(Duration::from_secs(2))).await;
    let yaml = one_route(
        "route-timeout",
        &[up.addr],
        "            timeout: 200ms\n            retry: { attempts: 0 }\n",
        "",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let started = Instant::now();
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_reason(&resp), "upstream-timeout");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A head in time but a body that stalls: the response is cut off, not left hanging.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                    .await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
        }
    });
    let yaml = one_route("body-timeout", &[stall], "            timeout: 300ms\n", "");
    let (_p, addr) = start_proxy(&yaml).await;
    let client = h1_client();
    let resp = client
        .request(
            Request::get(format!("http://{addr}/"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
    assert!(body.expect("ended before the upstream gave up").is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn connect_timeout_gives_503_with_its_reason() {
    // A listener that never accepts, with its backlog filled: further connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let full_addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full_addr)).await
        {
            fillers.push(s);
        }
    }
    let probe =
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(full_addr)).await;
    if probe.is_ok() {
        eprintln!("skipped: this kernel accepts connections beyond the backlog");
        return;
    }
    let yaml = one_route(
        "connect-timeout",
        &[full_addr],
        "            retry: { attempts: 0 }\n",
        "    connect_timeout: 200ms\n",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_reason(&resp), "connect-timeout");
    drop(fillers);
}

#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let yaml = one_route("idle-up", &[up], "", "    idle_timeout: 200ms\n");
    let (_p, addr) = start_proxy(&yaml).await;
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    eventually(
        Duration::from_secs(3),
        "idle upstream connection closed",
        || {
            let c = closed.clone();
            async move { c.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    // The pool makes a new one when needed.
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// The bounded load test: a fixed number of requests over three endpoints while one of them is
/// killed, with the default retry policy and outlier detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_endpoints_loses_almost_nothing() {
    const REQUESTS: usize = 3000;
    const WORKERS: usize = 6;
    let ups = [
        Upstream::start(|_| ok()).await,
        Upstream::start(|_| ok()).await,
        Upstream::start(|_| slow(Duration::from_millis(2))).await,
    ];
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let yaml = one_route("kill-one", &addrs, "", "");
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    let url = format!("http://{addr}/");
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (url, sent, failures) = (url.clone(), sent.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            while sent.fetch_add(1, Ordering::SeqCst) < REQUESTS
                && started.elapsed() < Duration::from_secs(60)
            {
                let req = Request::get(&url).body(Full::default()).unwrap();
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let reason = resp
                            .headers()
                            .get("x-trellis-error")
                            .map(|v| v.to_str().unwrap_or("?").to_owned());
                        let body = resp.into_body().collect().await;
                        if status != StatusCode::OK || body.is_err() {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{status} {reason:?}"));
                        }
                    }
                    Ok(Err(e)) => failures.lock().unwrap().push(format!("client error: {e}")),
                    Err(_) => failures.lock().unwrap().push("no answer in 10s".into()),
                }
            }
        }));
    }
    // Kill the slow endpoint (the one most likely to have requests in flight) a third of the way.
    while sent.load(Ordering::SeqCst) < REQUESTS / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ups[2].kill();
    for t in tasks {
        t.await.unwrap();
    }
    let done = sent.load(Ordering::SeqCst).min(REQUESTS);
    let failures = failures.lock().unwrap().clone();
    let m = scrape(admin).await;
    let retries = metric(
        &m,
        "trellis_retries_total",
        &[("cluster", "kill-one"), ("outcome", "attempted")],
    )
    .unwrap_or(0.0);
    let rate = 100.0 * (done - failures.len()) as f64 / done as f64;
    println!(
        "kill-one: {done} requests, {} failed, success {rate:.2}%, {retries} retries, {} / {} / {} at the endpoints, {:?}",
        failures.len(),
        ups[0].count(),
        ups[1].count(),
        ups[2].count(),
        started.elapsed()
    );
    assert_eq!(done, REQUESTS, "all requests sent in time");
    assert!(
        failures.len() * 1000 <= REQUESTS,
        "success {rate:.2}% < 99.9%: {failures:?}"
    );
    assert!(ups[2].count() > 0, "the killed endpoint had taken traffic");
}

#[tokio::test]
async fn max_retries_caps_retries_in_flight() {
    // Each request's first try fails at once; retries are slow, so the second request's retry
    // finds the only retry slot taken.
    let up = Upstream::start(|n| {
        if n < 2 {
            status(503)
        } else {
            slow(Duration::from_millis(500))
        }
    })
    .await;
    let yaml = one_route(
        "breaker-retries",
        &[up.addr],
        "            retry: { retry_on: [gateway-error], backoff: { base: 1ms, max: 2ms } }\n",
        "    circuit_breakers: { max_retries: 1 }\n",
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    let url = format!("http://{addr}/");
    let (c1, c2) = (h1_client(), h1_client());
    let (a, b) = tokio::join!(get(&c1, &url), get(&c2, &url));
    let mut statuses = [a.0.status().as_u16(), b.0.status().as_u16()];
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 503],
        "one retried, one answered with its failure"
    );
    assert_eq!(up.count(), 3);
    let m = scrape(admin).await;
    let c = ("cluster", "breaker-retries");
    assert_eq!(
        metric(&m, "trellis_retries_total", &[c, ("outcome", "overflow")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "trellis_circuit_breaker_overflows_total", &[c]),
        Some(1.0)
    );
}

/// An h2c upstream that refuses its first stream (RST_STREAM REFUSED_STREAM) and echoes the
/// body of every later one.
async fn refusing_h2_upstream() -> (SocketAddr, Arc<Mutex<Vec<Bytes>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let streams = Arc::new(AtomicUsize::new(0));
    let b = bodies.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (b, streams) = (b.clone(), streams.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if streams.fetch_add(1, Ordering::SeqCst) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let b = b.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        let got = Bytes::from(got);
                        b.lock().unwrap().push(got.clone());
                        let resp = Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut send) = respond.send_response(resp, false) {
                            let _ = send.send_data(got, true);
                        }
                    });
                }
            });
        }
    });
    (addr, bodies)
}

#[tokio::test]
async fn refused_streams_are_retried_even_for_post() {
    let (up, bodies) = refusing_h2_upstream().await;
    let yaml = one_route(
        "refused",
        &[up],
        "            retry: { backoff: { base: 1ms } }\n",
        "    protocol: http2\n",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    let body: Vec<u8> = (0..5000).map(|i| (i % 7) as u8).collect();
    let (resp, echoed) = post(&h1_client(), &format!("http://{addr}/"), body.clone()).await;
    assert_eq!(resp.status(), StatusCode::OK, "{echoed:?}");
    assert_eq!(echoed[..], body[..]);
    let seen = bodies.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "the refused stream was not processed");
    assert_eq!(seen[0][..], body[..]);
}

/// An h2c gRPC-style upstream: trailers-only answers with `grpc-status` 14 (UNAVAILABLE) for the
/// first `failures` calls, then 0.
async fn grpc_status_upstream(failures: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let c = c.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        let code = if n < failures { "14" } else { "0" };
                        let resp = Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", code)
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test]
async fn grpc_unavailable_is_retried_when_listed() {
    let grpc_call = |addr: SocketAddr| async move {
        let req = Request::post(format!("http://{addr}/trellis.echo.v1.Echo/Unary"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let (resp, _) = send(&h2_client(), req).await;
        resp.headers()["grpc-status"].to_str().unwrap().to_owned()
    };
    let (up, calls) = grpc_status_upstream(1).await;
    let yaml = one_route(
        "grpc-retry",
        &[up],
        "            retry: { retry_on: [unavailable], backoff: { base: 1ms } }\n",
        "    protocol: http2\n",
    );
    let (_p, addr) = start_proxy(&yaml).await;
    assert_eq!(grpc_call(addr).await, "0");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // The default policy leaves gRPC statuses alone: the call is POST and reached the upstream.
    let (up, calls) = grpc_status_upstream(1).await;
    let yaml = one_route("grpc-default", &[up], "", "    protocol: http2\n");
    let (_p, addr) = start_proxy(&yaml).await;
    assert_eq!(grpc_call(addr).await, "14");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
