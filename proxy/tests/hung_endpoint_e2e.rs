//! A hung endpoint: one of three upstream processes is stopped with SIGSTOP (its sockets stay
//! open, nothing answers) under keep-alive load, with the cluster's default settings. The proxy
//! must stop sending it requests within about a second and eject it, instead of letting every
//! client connection wait out the route timeout on it.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

/// A threaded HTTP/1.1 keep-alive server naming itself in `x-upstream`; it prints its port.
const UPSTREAM: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("x-upstream", sys.argv[1])
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// An upstream process; resumed and killed on drop, so a failing test leaves none stopped.
struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Upstream {
    fn spawn(name: &str) -> Upstream {
        let mut child = Command::new("python3")
            .args(["-c", UPSTREAM, name])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("upstream prints its port");
        let port: u16 = line.trim().parse().expect("a port number");
        Upstream {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client request: when it started (relative to the hang) and who answered, or why not.
#[derive(Debug)]
struct Outcome {
    started_ms: i64,
    took: Duration,
    result: Result<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_endpoint_stops_getting_traffic_and_is_ejected() {
    const CONNECTIONS: usize = 20;
    const RUN_AFTER_HANG: Duration = Duration::from_secs(6);

    let upstreams: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::spawn(n)).collect();
    let hung = &upstreams[2];
    let eps: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    let yaml = config(
        "          - { name: all, forward: { cluster: up } }",
        &format!("  - name: up\n    endpoints: [{}]\n", eps.join(", ")),
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;

    all_answer(
        addr,
        3,
        Duration::from_secs(10),
        "all three endpoints answer",
    )
    .await;

    let hang_at = Arc::new(Mutex::new(None::<Instant>));
    let start = Instant::now();
    let stop_at = Arc::new(Mutex::new(start + Duration::from_secs(30)));
    let workers = load(addr, CONNECTIONS, &hang_at, &stop_at);

    // Let the load settle, then hang the third endpoint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    hung.signal("-STOP");
    let hang = Instant::now();
    *hang_at.lock().unwrap() = Some(hang);
    *stop_at.lock().unwrap() = hang + RUN_AFTER_HANG;

    // Ejected within a few seconds, as admin metrics report it.
    let hung_addr = hung.addr.to_string();
    let mut ejected_after = None;
    let deadline = hang + Duration::from_secs(4);
    while Instant::now() < deadline {
        let samples = scrape(admin).await;
        let ejected = metric(
            &samples,
            "trellis_endpoint_ejected",
            &[("cluster", "up"), ("endpoint", &hung_addr)],
        );
        if ejected == Some(1.0) {
            ejected_after = Some(hang.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap());
    }
    hung.signal("-CONT");

    // Requests that start once the proxy had time to notice: all answered, by the others.
    let settled_ms = 2000;
    let late: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.started_ms >= settled_ms)
        .collect();
    let late_failed: Vec<&&Outcome> = late.iter().filter(|o| o.result.is_err()).collect();
    let late_ok = late.len() - late_failed.len();
    let stuck_total = outcomes
        .iter()
        .filter(|o| o.started_ms >= 0 && o.result.is_err())
        .count();
    let last_stuck_ms = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.started_ms)
        .max();
    eprintln!(
        "requests after the hang: {}, failed: {stuck_total} (the last started {last_stuck_ms:?} \
         ms after the hang); after {settled_ms} ms: {} ok, {} failed; ejected after \
         {ejected_after:?}",
        outcomes.iter().filter(|o| o.started_ms >= 0).count(),
        late_ok,
        late_failed.len(),
    );
    assert!(
        late_failed.is_empty(),
        "requests sent {settled_ms} ms or more after the hang must not wait on the hung endpoint: \
         {} of {} failed, first {:?}",
        late_failed.len(),
        late.len(),
        late_failed.first()
    );
    assert!(
        late_ok >= 100,
        "traffic keeps flowing to the other endpoints: {late_ok} answered"
    );
    assert!(
        late.iter().all(|o| o.result.as_deref() != Ok("c")),
        "the hung endpoint answered while stopped?"
    );
    assert!(
        ejected_after.is_some(),
        "the hung endpoint is reported ejected within 4 s"
    );

    // Requests already waiting on it when it hung are GETs: they move to another endpoint once
    // it is seen stalled, instead of waiting out the route timeout (or the client's patience).
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "no GET fails because an endpoint hung: {} of {} failed, first {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    let mut took: Vec<Duration> = outcomes.iter().map(|o| o.took).collect();
    took.sort();
    let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
    let max = took.last().copied().unwrap_or_default();
    eprintln!(
        "latency over {} requests: p99 {p99:?}, max {max:?}",
        took.len()
    );
    assert!(p99 < Duration::from_secs(2), "p99 stays under 2 s: {p99:?}");
}

/// A client gives a request up after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// Keep-alive load: each worker owns one client (one connection while it is healthy), sends GETs
/// one after another until `stop_at`, and gives a request up after [`CLIENT_TIMEOUT`]. Start
/// times are taken relative to `hang_at` once it is set.
fn load(
    addr: SocketAddr,
    connections: usize,
    hang_at: &Arc<Mutex<Option<Instant>>>,
    stop_at: &Arc<Mutex<Instant>>,
) -> Vec<tokio::task::JoinHandle<Vec<Outcome>>> {
    let start = Instant::now();
    (0..connections)
        .map(|_| {
            let (hang_at, stop_at) = (hang_at.clone(), stop_at.clone());
            tokio::spawn(async move {
                let url = format!("http://{addr}/");
                let mut client = h1_client();
                let mut outcomes = Vec::new();
                for _ in 0..20_000 {
                    if Instant::now() >= *stop_at.lock().unwrap() {
                        break;
                    }
                    let began = Instant::now();
                    let req = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
                    let result =
                        match tokio::time::timeout(CLIENT_TIMEOUT, client.request(req)).await {
                            Err(_) => {
                                // The stuck connection is dropped with the request.
                                client = h1_client();
                                Err("no response".to_owned())
                            }
                            Ok(Err(e)) => Err(e.to_string()),
                            Ok(Ok(resp)) => {
                                let status = resp.status();
                                let who = resp
                                    .headers()
                                    .get("x-upstream")
                                    .map(|v| v.to_str().unwrap().to_owned());
                                let _ = resp.into_body().collect().await;
                                match who {
                                    Some(who) if status.is_success() => Ok(who),
                                    _ => Err(format!("status {status}")),
                                }
                            }
                        };
                    let hang = hang_at
                        .lock()
                        .unwrap()
                        .unwrap_or(start + Duration::from_secs(3600));
                    let started_ms = if began >= hang {
                        (began - hang).as_millis() as i64
                    } else {
                        -((hang - began).as_millis() as i64)
                    };
                    let took = began.elapsed();
                    outcomes.push(Outcome {
                        started_ms,
                        took,
                        result,
                    });
                }
                outcomes
            })
        })
        .collect()
}

/// Waits until every one of `names` has answered a request through the proxy at `addr`.
async fn all_answer(addr: SocketAddr, names: usize, limit: Duration, what: &str) {
    let client = h1_client();
    eventually(limit, what, || {
        let client = client.clone();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..30 {
                let req = Request::get(format!("http://{addr}/"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                // A request may still land on an endpoint that has not recovered yet.
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(1), client.request(req)).await
                    && let Some(v) = resp.headers().get("x-upstream")
                {
                    seen.insert(v.to_str().unwrap().to_owned());
                }
            }
            seen.len() == names
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_endpoint_gets_traffic_again_after_it_resumes() {
    let upstreams: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::spawn(n)).collect();
    let hung = &upstreams[2];
    let eps: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    // Default settings but a short ejection, so that its end comes within the test.
    let yaml = config(
        "          - { name: all, forward: { cluster: up } }",
        &format!(
            "  - name: up\n    endpoints: [{}]\n    outlier_detection: {{ base_ejection_time: 1s }}\n",
            eps.join(", ")
        ),
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;
    all_answer(
        addr,
        3,
        Duration::from_secs(10),
        "all three endpoints answer",
    )
    .await;

    let hang_at = Arc::new(Mutex::new(None::<Instant>));
    let stop_at = Arc::new(Mutex::new(Instant::now() + Duration::from_secs(30)));
    let workers = load(addr, 20, &hang_at, &stop_at);
    tokio::time::sleep(Duration::from_millis(300)).await;
    hung.signal("-STOP");
    *hang_at.lock().unwrap() = Some(Instant::now());
    let hung_addr = hung.addr.to_string();
    eventually(
        Duration::from_secs(4),
        "the hung endpoint is ejected",
        || async {
            let ejections = metric(
                &scrape(admin).await,
                "trellis_endpoint_ejections_total",
                &[("cluster", "up")],
            );
            ejections.is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    *stop_at.lock().unwrap() = Instant::now();
    for w in workers {
        w.await.unwrap();
    }

    hung.signal("-CONT");
    all_answer(
        addr,
        3,
        Duration::from_secs(10),
        "the resumed endpoint answers again",
    )
    .await;
    let ejected = metric(
        &scrape(admin).await,
        "trellis_endpoint_ejected",
        &[("cluster", "up"), ("endpoint", &hung_addr)],
    );
    assert_eq!(ejected, Some(0.0), "its ejection has ended");
}
