//! A hardened edge: per-listener connection limits, file-descriptor exhaustion, and which upgrade
//! tokens are tunnelled. Raw bytes on real sockets.

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    config, eventually, h1_client, metric, parse_exposition, process::BIN, scrape, start_admin,
    start_named,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

const REFUSED: &str = "trellis_listener_connections_refused_total";

/// Reads one HTTP/1.1 response (head and Content-Length body) from `s`; `None` if the connection
/// closes (or resets) before a full head arrives.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return Some(String::from_utf8_lossy(&buf[..end + 4 + length]).to_string());
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends a GET on `s` and returns the response, within 5 s.
async fn exchange(s: &mut TcpStream, extra: &str) -> Option<String> {
    let req = format!("GET /x HTTP/1.1\r\nHost: edge.test\r\n{extra}\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return None;
    }
    timeout(Duration::from_secs(5), read_response(s))
        .await
        .expect("an answer or a close within 5s")
}

fn listener_yaml(name: &str, extra: &str) -> String {
    let routes = "          - { name: ok, direct_response: { status: 200, body: fine } }";
    config(routes, "  []").replace(
        "  - { name: main, address: \"127.0.0.1:0\" }",
        &format!("  - {{ name: {name}, address: \"127.0.0.1:0\"{extra} }}"),
    )
}

#[tokio::test]
async fn max_connections_refuses_the_third_and_counts_it() {
    let (proxy, addr) =
        start_named(&listener_yaml("capped", ", max_connections: 2"), "capped").await;
    let (admin, _) = start_admin(&proxy).await;

    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    for s in [&mut first, &mut second] {
        let resp = exchange(s, "").await.expect("served");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    // The kernel completes the handshake; the proxy accepts and closes at once.
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange(&mut third, "").await, None, "the third is refused");
    let samples = scrape(admin).await;
    assert_eq!(
        metric(
            &samples,
            REFUSED,
            &[("listener", "capped"), ("reason", "max_connections")]
        ),
        Some(1.0)
    );
    // The two open connections still work, and so does the admin API.
    let resp = exchange(&mut first, "").await.expect("still served");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (ready, _) = common::get(&h1_client(), &format!("http://{admin}/ready")).await;
    assert_eq!(ready.status(), 200);

    // A connection that ends frees its room.
    drop(first);
    eventually(Duration::from_secs(5), "room after a close", || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        exchange(&mut s, "").await.is_some()
    })
    .await;

    let dump: serde_json::Value = {
        let (resp, body) = common::get(&h1_client(), &format!("http://{admin}/config_dump")).await;
        assert_eq!(resp.status(), 200);
        serde_json::from_slice(&body).unwrap()
    };
    assert_eq!(dump["listeners"][0]["max_connections"], 2);
}

#[tokio::test]
async fn a_tcp_listener_holds_to_its_limit_too() {
    let upstream = common::tcp_echo_upstream().await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: tcp-capped, address: "127.0.0.1:0", protocol: tcp, cluster: echo, max_connections: 1 }}
clusters:
  - {{ name: echo, endpoints: ["{upstream}"] }}
"#
    );
    let (proxy, addr) = start_named(&yaml, "tcp-capped").await;
    let (admin, _) = start_admin(&proxy).await;
    let echo = |mut s: TcpStream| async move {
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("an answer or a close within 5s")
            .ok()?;
        Some((s, buf))
    };
    let (first, buf) = echo(TcpStream::connect(addr).await.unwrap())
        .await
        .expect("echoed");
    assert_eq!(&buf, b"ping");
    assert!(
        echo(TcpStream::connect(addr).await.unwrap())
            .await
            .is_none()
    );
    let samples = scrape(admin).await;
    assert_eq!(
        metric(
            &samples,
            REFUSED,
            &[("listener", "tcp-capped"), ("reason", "max_connections")]
        ),
        Some(1.0)
    );
    drop(first);
    eventually(Duration::from_secs(5), "room after a close", || async {
        echo(TcpStream::connect(addr).await.unwrap())
            .await
            .is_some()
    })
    .await;
}

#[tokio::test]
async fn max_connections_has_a_finite_default() {
    let (proxy, _) = start_named(&listener_yaml("plain", ""), "plain").await;
    let (admin, _) = start_admin(&proxy).await;
    let (_, body) = common::get(&h1_client(), &format!("http://{admin}/config_dump")).await;
    let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(dump["listeners"][0]["max_connections"], 100_000);
}

/// The proxy binary with at most `fds` descriptors (soft and hard, so raising the soft limit to
/// the hard one at start changes nothing), its admin API on port 0 and stderr read on a thread.
struct Limited {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Limited {
    fn start(yaml: &str, fds: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={fds}:{fds}"))
            .args([BIN, "--config", path.to_str().unwrap()])
            .args(["--workers", "1", "--admin", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("prlimit (util-linux) runs");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        Limited {
            child,
            lines,
            _dir: dir,
        }
    }

    /// The value after `key=` on the first log line containing `needle`, waiting up to 10 s.
    async fn logged(&self, needle: &str, key: &str) -> String {
        let mut found = None;
        eventually(Duration::from_secs(10), needle, || {
            found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            std::future::ready(found.is_some())
        })
        .await;
        let line = found.unwrap();
        line.split(&format!("{key}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{key}= in {line:?}"))
            .to_owned()
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET to the admin API on a fresh connection, within 5 s.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    timeout(Duration::from_secs(5), read_response(&mut s))
        .await
        .ok()?
}

/// The proxy's count of accepts that failed for want of descriptors, from its admin API.
async fn fd_exhausted(admin: SocketAddr) -> Option<f64> {
    let text = admin_get(admin, "/metrics").await?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    metric(
        &parse_exposition(body),
        REFUSED,
        &[("listener", "edge"), ("reason", "fd_exhausted")],
    )
}

#[tokio::test]
async fn out_of_descriptors_the_admin_api_still_answers() {
    let proxy = Limited::start(&listener_yaml("edge", ""), 64);
    let addr: SocketAddr = proxy.logged("listening", "local").await.parse().unwrap();
    let admin: SocketAddr = proxy
        .logged("trellis-proxy started", "admin")
        .await
        .parse()
        .unwrap();

    // Far more connections than the proxy has descriptors: it runs out while accepting them.
    let mut open = Vec::new();
    for _ in 0..120 {
        open.push(TcpStream::connect(addr).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let exhausted = loop {
        if let Some(n) = fd_exhausted(admin).await.filter(|n| *n > 0.0) {
            break n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fd_exhausted not counted within 10s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Still out of descriptors (the connections stay open): the admin API answers every time.
    for _ in 0..5 {
        let ready = admin_get(admin, "/ready").await.expect("admin answers");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    }
    // The accept loop backs off instead of spinning on the failing accept.
    let before = exhausted;
    let window = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = fd_exhausted(admin).await.expect("admin answers");
    let per_second = (after - before) / window.elapsed().as_secs_f64();
    assert!(
        per_second < 200.0,
        "{per_second} accept failures per second"
    );

    // Once the connections close, the listener serves again.
    drop(open);
    eventually(
        Duration::from_secs(10),
        "served after the flood",
        || async {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return false;
            };
            exchange(&mut s, "")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        },
    )
    .await;
}

/// An upstream that records each request head and answers `101` to any upgrade request (then
/// echoes bytes) and `200` otherwise.
async fn recording_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                seen.lock().unwrap().push(head.clone());
                let upgrade = head.lines().find_map(|l| l.strip_prefix("upgrade:"));
                match upgrade {
                    Some(token) => {
                        let resp = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: {}\r\n\r\n",
                            token.trim()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                    None => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
                            .await;
                    }
                }
            });
        }
    });
    (addr, heads)
}

fn upgrade_yaml(upstream: SocketAddr) -> String {
    let routes = r#"          - name: custom
            match: { path: { prefix: /custom } }
            forward: { cluster: up }
            upgrades: [websocket, x-custom]
          - name: default
            forward: { cluster: up }"#;
    let clusters = format!("  - {{ name: up, endpoints: [\"{upstream}\"] }}");
    config(routes, &clusters).replace("name: main,", "name: upgrades,")
}

#[tokio::test]
async fn an_upgrade_token_the_route_does_not_allow_is_stripped() {
    let (upstream, heads) = recording_upstream().await;
    let (_proxy, addr) = start_named(&upgrade_yaml(upstream), "upgrades").await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    let resp = exchange(&mut s, "Connection: Upgrade\r\nUpgrade: x-custom\r\n")
        .await
        .expect("answered");
    assert!(resp.starts_with("HTTP/1.1 200"), "a plain exchange: {resp}");
    assert!(resp.ends_with("plain"), "{resp}");
    let head = heads.lock().unwrap().pop().expect("the upstream saw it");
    assert!(!head.contains("upgrade"), "Upgrade went upstream: {head}");

    // Several tokens where one is not allowed: nothing is offered upstream.
    let resp = exchange(&mut s, "Connection: upgrade\r\nUpgrade: websocket, h2c\r\n")
        .await
        .expect("answered");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let head = heads.lock().unwrap().pop().unwrap();
    assert!(!head.contains("upgrade"), "Upgrade went upstream: {head}");
}

#[tokio::test]
async fn an_allowed_upgrade_token_is_tunnelled() {
    let (upstream, heads) = recording_upstream().await;
    let (_proxy, addr) = start_named(&upgrade_yaml(upstream), "upgrades").await;

    for (path, token) in [("/custom", "X-Custom"), ("/other", "websocket")] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: edge.test\r\nConnection: upgrade\r\nUpgrade: {token}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let resp = timeout(Duration::from_secs(5), read_response(&mut s))
            .await
            .unwrap()
            .expect("a 101");
        assert!(resp.starts_with("HTTP/1.1 101"), "{path}: {resp}");
        let head = heads.lock().unwrap().pop().unwrap();
        assert!(
            head.contains(&format!("upgrade: {}", token.to_lowercase())),
            "{head}"
        );
        s.write_all(b"tunnelled bytes").await.unwrap();
        let mut echoed = [0u8; 15];
        timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, b"tunnelled bytes");
    }
}

#[test]
fn bad_limits_and_upgrade_names_are_refused_by_field() {
    let zero = listener_yaml("z", ", max_connections: 0");
    let text = trellis_proxy::config::validate::from_yaml(&zero)
        .unwrap_err()
        .to_string();
    assert!(text.contains("listeners[0].max_connections"), "{text}");

    for (upgrades, field) in [
        ("[\"web socket\"]", "upgrades[0]"),
        ("[websocket, \"a/b/c\"]", "upgrades[1]"),
        ("[websocket, WebSocket]", "upgrades[1]"),
        ("[\"\"]", "upgrades[0]"),
    ] {
        let routes = format!(
            "          - {{ name: r, direct_response: {{ status: 200 }}, upgrades: {upgrades} }}"
        );
        let text = trellis_proxy::config::validate::from_yaml(&config(&routes, "  []"))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains(&format!("routes[0].{field}")),
            "{upgrades}: {text}"
        );
    }
}
