//! The real `trellis-control` binary as an operator runs it: started on a manifests directory
//! with ports chosen by the kernel (read back from its log), stopped by a signal while a proxy's
//! discovery stream is open, and asked for `status` about manifests it cannot use.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::discovery::v1::{
    self as api, DeltaDiscoveryRequest, aggregated_discovery_client::AggregatedDiscoveryClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-control");
/// Bound on start-up and on every wait below: a test fails rather than hangs.
const WAIT: Duration = Duration::from_secs(10);
/// How soon after SIGTERM/SIGINT the controller must be gone.
const STOP_WITHIN: Duration = Duration::from_secs(3);

/// A running controller; killed on drop if a test failed before stopping it.
struct Running {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    /// The log lines after start-up, as they arrive.
    log: mpsc::Receiver<String>,
    /// The log lines before the `serving` line.
    early: Vec<String>,
    /// The log lines read since, by `wait_log`.
    read: std::cell::RefCell<Vec<String>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts the binary on a copy of the mesh fixtures plus `extra` files, and waits for its
    /// "serving" line, which names the addresses it bound.
    fn start(extra: &[(&str, &str)]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh");
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        for (name, text) in extra {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut child = Command::new(BIN)
            .args(["serve", "--manifests"])
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("controller: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        let mut early = Vec::new();
        let (grpc, admin) = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = log
                .recv_timeout(left)
                .expect("the controller logs `serving` in time");
            if line.contains("trellis_control: serving ") {
                break (field(&line, "listen"), field(&line, "admin"));
            }
            early.push(line);
        };
        Running {
            child,
            grpc,
            admin,
            log,
            early,
            read: Default::default(),
            _dir: dir,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (bounded) for the process to exit, without blocking the runtime: the client's
    /// connection task must keep answering the server (its GOAWAY comes with a PING).
    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the log has (or gets, within `WAIT`) a line containing every one of `parts`.
    fn wait_log(&self, parts: &[&str]) -> String {
        if let Some(line) = self
            .early
            .iter()
            .find(|line| parts.iter().all(|p| line.contains(p)))
        {
            return line.clone();
        }
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.read.borrow_mut().push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {parts:?}"),
            }
        }
    }
}

impl Running {
    /// Every log line so far.
    fn whole_log(&self) -> String {
        let mut read = self.read.borrow_mut();
        read.extend(self.log.try_iter());
        let mut all = self.early.clone();
        all.extend(read.iter().cloned());
        all.join("\n")
    }
}

/// `key=value` from a log line.
fn field(line: &str, key: &str) -> SocketAddr {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 1;
    let value = line[start..].split_whitespace().next().unwrap();
    value
        .parse()
        .unwrap_or_else(|e| panic!("{key}={value}: {e}"))
}

/// Opens a discovery stream as a sidecar and waits for its first response, so the stream is
/// established and held open (the request side stays open until the returned sender drops).
async fn open_stream(
    grpc: SocketAddr,
) -> (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<api::DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(api::Node {
            id: "sidecar-held-open".into(),
            role: api::Role::Sidecar.into(),
            namespace: "shop".into(),
            ..Default::default()
        }),
        type_url: api::CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .delta_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("a first response in time")
        .expect("stream ok")
        .expect("stream open");
    assert_eq!(first.type_url, api::CLUSTER_TYPE);
    (tx, inbound)
}

async fn stops_on(signal: &str) {
    let mut controller = Running::start(&[]);
    let (_requests, mut inbound) = open_stream(controller.grpc).await;
    // Read while the controller stops, so how the stream ended is seen before the process is
    // gone (a reset after exit could discard it).
    let end = tokio::spawn(async move { inbound.message().await });
    let sent = Instant::now();
    controller.signal(signal);
    let exit = controller.wait_exit(STOP_WITHIN).await;
    let took = sent.elapsed();
    let Some(exit) = exit else {
        panic!("still running {STOP_WITHIN:?} after SIG{signal} with a stream open");
    };
    eprintln!("SIG{signal}: exited {exit} after {took:?}");
    assert!(exit.success(), "SIG{signal}: exit status {exit}");
    // The stream was ended from the server side, with a status a proxy reconnects on.
    let end = tokio::time::timeout(WAIT, end)
        .await
        .expect("the stream ends")
        .unwrap();
    match end {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        Ok(None) => {}
        Ok(Some(r)) => panic!("unexpected response after the stop: {r:?}"),
    }
}

#[tokio::test]
async fn sigterm_with_an_open_stream_exits_zero_promptly() {
    stops_on("TERM").await;
}

#[tokio::test]
async fn sigint_with_an_open_stream_exits_zero_promptly() {
    stops_on("INT").await;
}

/// Manifests the controller cannot fully use: a mistyped kind, a backendRef to a Service that
/// does not exist, a mistyped field, an HTTPS listener; and a gateway proxy whose Gateway does
/// not exist.
const BROKEN: [(&str, &str); 3] = [
    (
        "kind-typo.yaml",
        "apiVersion: gateway.networking.k8s.io/v1
kind: HttpRoute
metadata: {name: cased, namespace: shop}
",
    ),
    (
        "broken-route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: shop}
spec:
  parentRefs: [{name: ingress}]
  rules:
    - backendRefs: [{name: web, port: 80, weight: 3}, {name: nope, port: 80}]
",
    ),
    (
        "typo.yaml",
        "apiVersion: v1
kind: Service
metadata: {name: typo, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: typo, namespace: shop}
spec:
  rules:
    - backendRef: [{name: typo, port: 80}]
",
    ),
];

const HTTPS_GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: trellis
  listeners:
    - {name: web, port: 8080, protocol: HTTP, hostname: \"*.example.com\"}
    - {name: secure, port: 8443, protocol: HTTPS, hostname: \"*.example.com\",
       tls: {certificateRefs: [{name: shop-tls}]}}
    - {name: dns, port: 9053, protocol: UDP}
";

/// A `kubernetes.io/tls` Secret whose key belongs to another certificate, and that key's PEM.
fn mismatched_secret() -> (String, String) {
    use base64::Engine;
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()]).unwrap();
    let key = other.signing_key.serialize_pem();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-tls, namespace: shop}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(&cert.cert.pem()),
        b64(&key)
    );
    (yaml, key)
}

/// Fails if `text` holds any part of the key: a line of its PEM body, or of its base64 form.
fn assert_no_key(what: &str, text: &str, key_pem: &str) {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(key_pem);
    let body = key_pem.lines().filter(|l| !l.starts_with("-----"));
    let chunks = encoded
        .as_bytes()
        .chunks(24)
        .map(|c| std::str::from_utf8(c).unwrap());
    for part in body.chain(chunks).filter(|p| p.len() >= 16) {
        assert!(!text.contains(part), "{what} holds key material ({part})");
    }
}

fn status_command(admin: SocketAddr, json: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["status", "--admin", &admin.to_string()]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn log_and_status_name_every_unusable_manifest() {
    let mut files = BROKEN.to_vec();
    files.push(("gateway.yaml", HTTPS_GATEWAY));
    let (secret, key) = mismatched_secret();
    files.push(("secret.yaml", &secret));
    let controller = Running::start(&files);
    // Each one is logged: file, line and field for the typo; the object, condition and reason
    // for the others.
    controller.wait_log(&["typo.yaml", "line=12", "unknown field `backendRef`"]);
    controller.wait_log(&[
        "HTTPRoute shop/broken rules[0].backendRefs[1]",
        "BackendNotFound",
    ]);
    controller.wait_log(&["Gateway shop/ingress listeners[dns]", "UnsupportedProtocol"]);
    controller.wait_log(&[
        "Gateway shop/ingress listeners[secure].tls.certificateRefs[0]",
        "InvalidCertificateRef",
        "tls.key does not match",
    ]);
    controller.wait_log(&["kind-typo.yaml", "skipping a kind", "kind=\"HttpRoute\""]);
    // A gateway proxy for a Gateway that does not exist: logged when it connects, and shown.
    let mut client = AggregatedDiscoveryClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(api::Node {
            id: "gw-lost".into(),
            role: api::Role::Gateway.into(),
            namespace: "shop".into(),
            gateway_name: "egress".into(),
            ..Default::default()
        }),
        type_url: api::LISTENER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let _inbound = client
        .delta_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    controller.wait_log(&["gw-lost", "GatewayNotFound", "shop/egress"]);

    // The table, read by the real `status` command (bounded poll until the proxy shows).
    let deadline = Instant::now() + WAIT;
    let table = loop {
        let table = status_command(controller.admin, false);
        if table.contains("Proxy shop/gw-lost") {
            break table;
        }
        assert!(Instant::now() < deadline, "no proxy problem in\n{table}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("{table}");
    for want in [
        "typo.yaml:12: rejected, serving its last good content: spec.rules[0]: unknown field `backendRef`",
        "HTTPRoute shop/broken rules[0].backendRefs[1]: ResolvedRefs=False BackendNotFound: Service shop/nope does not exist",
        "Gateway shop/ingress listeners[dns]: Accepted=False UnsupportedProtocol: protocol \"UDP\" on port 9053",
        "Gateway shop/ingress listeners[secure].tls.certificateRefs[0]: ResolvedRefs=False InvalidCertificateRef: Secret shop/shop-tls: tls.key does not match the certificate in tls.crt",
        "Proxy shop/gw-lost: Configured=False GatewayNotFound: Gateway shop/egress (named by --gateway) does not exist (Gateways defined: shop/ingress)",
    ] {
        assert!(table.contains(want), "no {want:?} in\n{table}");
    }
    let json_text = status_command(controller.admin, true);
    let json: serde_json::Value = serde_json::from_str(&json_text).unwrap();
    let reasons: Vec<&str> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "InvalidCertificateRef",
            "UnsupportedProtocol",
            "BackendNotFound"
        ],
        "{json:#}"
    );
    // The private key is in none of what an operator sees.
    let (_, status_body) = trellis_control::admin::get(controller.admin, "/status")
        .await
        .unwrap();
    let (_, metrics) = trellis_control::admin::get(controller.admin, "/metrics")
        .await
        .unwrap();
    assert_no_key("`status`", &table, &key);
    assert_no_key("`status --json`", &json_text, &key);
    assert_no_key("/status", &String::from_utf8_lossy(&status_body), &key);
    assert_no_key("/metrics", &String::from_utf8_lossy(&metrics), &key);
    assert_no_key("the log", &controller.whole_log(), &key);
    assert_eq!(json["source_errors"][0]["line"], 12, "{json:#}");
    let proxy = &json["proxies"][0];
    assert_eq!(proxy["problems"][0]["condition"], "Configured", "{json:#}");
    assert_eq!(
        proxy["problems"][0]["reason"], "GatewayNotFound",
        "{json:#}"
    );
}

/// A proxy that stops answering (its connection never acknowledges the server's GOAWAY) holds
/// the stop up for the grace period only.
#[tokio::test]
async fn a_proxy_that_stops_answering_holds_the_stop_up_for_the_grace_only() {
    let mut controller = Running::start(&[]);
    let grpc = controller.grpc;
    let (opened_tx, opened_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    // The client on its own runtime, which then blocks: nothing on that connection runs.
    let client = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let held = open_stream(grpc).await;
            opened_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(WAIT);
            drop(held);
        });
    });
    opened_rx.recv_timeout(WAIT).expect("the stream opened");
    let sent = Instant::now();
    controller.signal("TERM");
    let exit = controller.wait_exit(STOP_WITHIN).await;
    let took = sent.elapsed();
    let _ = release_tx.send(());
    client.join().unwrap();
    let exit = exit.unwrap_or_else(|| panic!("still running {STOP_WITHIN:?} after SIGTERM"));
    eprintln!("unresponsive proxy: exited {exit} after {took:?}");
    assert!(exit.success(), "{exit}");
    controller.wait_log(&["connections still open", "closing them"]);
}
