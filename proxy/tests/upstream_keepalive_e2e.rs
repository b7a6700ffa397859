//! Upstreams that close idle keep-alive connections before the proxy would: bursts of POSTs
//! through a proxy child process, with pauses around the upstream's keep-alive timeout, must all
//! succeed. A POST sent on a connection the upstream is closing is lost (it may not be retried),
//! so the proxy must retire pooled connections before the upstream does, and must not reuse one
//! whose close has already arrived.

mod common;

use std::{
    io::ErrorKind,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{process::Running, *};
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What a scripted upstream saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

/// A raw HTTP/1.1 server that closes a keep-alive connection once it has been idle for
/// `idle_close` after its last response, like nginx's `keepalive_timeout`: a request that arrives
/// as the timer fires is lost with the connection. `announce` adds that `Keep-Alive` header to
/// every response.
async fn closing_upstream(
    idle_close: Duration,
    announce: Option<&'static str>,
) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            s.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve_closing(stream, idle_close, announce, s.clone()));
        }
    });
    (addr, seen)
}

async fn serve_closing(
    mut stream: TcpStream,
    idle_close: Duration,
    announce: Option<&'static str>,
    seen: Arc<Seen>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    loop {
        // The idle timer runs from the end of the last response to the first byte of the next
        // request.
        let head_end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let read = if buf.is_empty() {
                // A busy event loop: it comes round every `LOOP_LAG` and runs its timers before
                // it reads, as Node's does, so a request that arrived in the last round before
                // the timer fires is closed on unread.
                let idle_from = tokio::time::Instant::now();
                let mut round = 0;
                loop {
                    // Rounds at fixed instants, so the timer fires on the round at
                    // `idle_close` exactly, and what arrived in the round before is lost.
                    round += 1;
                    tokio::time::sleep_until(idle_from + LOOP_LAG * round).await;
                    if idle_from.elapsed() >= idle_close {
                        return;
                    }
                    match stream.try_read(&mut chunk) {
                        Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                        r => break r,
                    }
                }
            } else {
                stream.read(&mut chunk).await
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap_or(0));
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        seen.requests.fetch_add(1, Ordering::Relaxed);
        let extra = announce.map_or(String::new(), |k| format!("keep-alive: {k}\r\n"));
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{extra}\r\nok");
        if stream.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// How long the scripted upstream's event loop takes to come round.
const LOOP_LAG: Duration = Duration::from_millis(25);

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn proxy_config(up: SocketAddr) -> String {
    config(
        "          - { name: up, forward: { cluster: up } }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    )
}

/// Sends `bursts` bursts of `width` concurrent POSTs through `proxy`, waiting `pause(i)` after
/// burst `i` ends; returns the failed POSTs (any answer but 200) with their error.
async fn bursts_of_posts(
    proxy: SocketAddr,
    bursts: usize,
    width: usize,
    pause: impl Fn(usize) -> Duration,
) -> Vec<String> {
    let client = h1_client();
    let mut failed = Vec::new();
    for i in 0..bursts {
        let sends = (0..width).map(|_| {
            let client = client.clone();
            async move {
                let req = Request::post(format!("http://{proxy}/submit"))
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from_static(b"payload")))
                    .unwrap();
                let (resp, _) = send(&client, req).await;
                (resp.status() != StatusCode::OK).then(|| {
                    format!(
                        "{} {:?}",
                        resp.status(),
                        resp.headers().get("x-trellis-error")
                    )
                })
            }
        });
        failed.extend(
            futures_util::future::join_all(sends)
                .await
                .into_iter()
                .flatten(),
        );
        tokio::time::sleep(pause(i)).await;
    }
    failed
}

/// The upstream closes connections idle for 300 ms and says nothing about it. After a first pause
/// long enough for it to close every connection (from which the proxy may learn), pauses sweep a
/// few milliseconds either side of the timeout, where a pooled connection is closing as the next
/// request is sent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_survive_an_upstream_that_closes_idle_connections_first() {
    let idle_close = Duration::from_millis(300);
    let (up, seen) = closing_upstream(idle_close, None).await;
    let (_proxy, addr, _dir) = Running::with_config(&proxy_config(up), &[]);
    let (bursts, width) = (16, 20);
    let failed = bursts_of_posts(addr, bursts, width, |i| {
        if i == 0 {
            return idle_close * 2;
        }
        // 282 ms to 310 ms: across the upstream's last loop round before its timer fires.
        idle_close - Duration::from_millis(20) + Duration::from_millis(2 * (i as u64 % 16))
    })
    .await;
    assert!(
        failed.is_empty(),
        "{} of {} POSTs failed: {failed:?}",
        failed.len(),
        bursts * width
    );
    assert_eq!(seen.requests.load(Ordering::Relaxed), bursts * width);
}

/// The upstream announces `Keep-Alive: timeout=1` and closes connections idle for exactly that:
/// the proxy must retire them before the second is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_survive_an_announced_keep_alive_timeout() {
    let idle_close = Duration::from_secs(1);
    let (up, seen) = closing_upstream(idle_close, Some("timeout=1")).await;
    let (_proxy, addr, _dir) = Running::with_config(&proxy_config(up), &[]);
    let (bursts, width) = (5, 20);
    let failed = bursts_of_posts(addr, bursts, width, |i| {
        idle_close - Duration::from_millis(20) + Duration::from_millis(5 * i as u64)
    })
    .await;
    assert!(
        failed.is_empty(),
        "{} of {} POSTs failed: {failed:?}",
        failed.len(),
        bursts * width
    );
    assert_eq!(seen.requests.load(Ordering::Relaxed), bursts * width);
}

/// An nginx child process, killed when dropped.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nginx answering 200 to everything on 127.0.0.1 with `keepalive_timeout`; `None` when
/// there is no nginx. nginx binds the port itself, so a free one is found first (and taken
/// again if another process got it in between).
async fn start_nginx(keepalive_timeout: &str) -> Option<Nginx> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               keepalive_timeout {keepalive_timeout}; keepalive_requests 1000000;\n\
               server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\"; }} }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let mut child = std::process::Command::new(bin)
            .args(["-p", &d.to_string(), "-c", path.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break; // the port was taken: try another
            }
            if TcpStream::connect(addr).await.is_ok() {
                return Some(Nginx {
                    child,
                    addr,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

/// nginx with `keepalive_timeout 1s`, which it does not announce: after a first pause that lets
/// it close every connection, pauses sweep 0.9 s to 1.1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_survive_nginx_closing_idle_connections() {
    let Some(nginx) = start_nginx("1s").await else {
        eprintln!("skipped: nginx is not installed (apt-get install -y nginx-light)");
        return;
    };
    let (_proxy, addr, _dir) = Running::with_config(&proxy_config(nginx.addr), &[]);
    let (bursts, width) = (6, 20);
    let failed = bursts_of_posts(addr, bursts, width, |i| {
        if i == 0 {
            return Duration::from_millis(1500);
        }
        Duration::from_millis(900 + 50 * (i as u64 - 1) % 250)
    })
    .await;
    assert!(
        failed.is_empty(),
        "{} of {} POSTs failed: {failed:?}",
        failed.len(),
        bursts * width
    );
}
