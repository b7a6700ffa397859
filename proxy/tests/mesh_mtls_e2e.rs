//! Automatic mesh mTLS end to end on 127.0.0.1: two in-process proxies whose workload
//! certificates come from the controller's CA served in process. Proxy A originates mesh mTLS
//! to endpoints that carry an identity (HTTP/1.1, HTTP/2, TCP); proxy B's inbound capture
//! listeners terminate it, verify the caller and hand the bytes to the application. Strict mode
//! refuses plaintext and non-mesh TLS, permissive serves plaintext, and callers with no
//! certificate, another CA's or an expired one are refused. Certificates of a few seconds renew
//! under a stream of requests with no failure.
//!
//! The tests share the process-wide metrics registry, so they run one at a time ([`SERIAL`]) and
//! compare counts before and after.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use common::{echo_upstream, get, h1_client, metric, raw_exchange, scrape, seen, start_admin};
use http::StatusCode;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    time::Instant,
};
use tokio_rustls::TlsConnector;
use trellis_control::{
    catalog::Catalog,
    identity::{CaSource, CertificateAuthority, IdentityService, TokenDir},
    server::{self, DiscoveryService},
    status::Registry,
};
use trellis_proxy::{
    Proxy,
    config::validate,
    identity::{
        IdentityClient, IdentitySettings, IdentityWatch,
        mtls::{self, AppProtocol},
    },
};

const WAIT: Duration = Duration::from_secs(20);
const A_TOKEN: &str = "a-token-51c2";
const B_TOKEN: &str = "b-token-9d0e";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The controller's identity service with its own CA directory.
struct Controller {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    _catalog: watch::Sender<Arc<Catalog>>,
    _stop: oneshot::Sender<()>,
}

impl Controller {
    async fn start(cert_ttl: Duration) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tokens/shop")).unwrap();
        std::fs::write(dir.path().join("tokens/shop/a"), A_TOKEN).unwrap();
        std::fs::write(dir.path().join("tokens/shop/b"), B_TOKEN).unwrap();
        let ca = CertificateAuthority::load(
            &CaSource::Dir(dir.path().join("ca")),
            "cluster.local",
            cert_ttl,
        )
        .unwrap();
        let identity = IdentityService::new(
            Arc::new(ca),
            Some(Arc::new(TokenDir::new(dir.path().join("tokens")))),
        );
        let (catalog_tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let discovery = DiscoveryService::new(catalog, Arc::new(Registry::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::serve_with_identity(
            listener,
            discovery,
            Some(identity),
            async {
                let _ = stopped.await;
            },
        ));
        Controller {
            addr,
            dir,
            _catalog: catalog_tx,
            _stop: stop,
        }
    }

    /// An identity for shop/`account`, renewed in the background, once its first certificate
    /// is in.
    async fn identity(&self, account: &str, token: &str) -> IdentityWatch {
        let token_file = self.dir.path().join(format!("{account}.token"));
        std::fs::write(&token_file, token).unwrap();
        let (client, mut watch) = IdentityClient::new(IdentitySettings {
            address: self.addr.to_string(),
            namespace: "shop".into(),
            service_account: account.into(),
            token_file,
        })
        .unwrap();
        tokio::spawn(client.run());
        tokio::time::timeout(WAIT, watch.wait_for(Option::is_some))
            .await
            .expect("a certificate within the bound")
            .unwrap();
        watch
    }
}

/// Proxy B's inbound capture listeners: `in-http` (the application's HTTP server) and `in-tcp`
/// (a TCP echo server), each listing its own port (a connection made straight to a capture
/// listener has its local address as original destination).
fn b_yaml(mtls: &str, ports: &HashMap<&str, u16>, apps: [SocketAddr; 3]) -> String {
    let [app, echo, ws] = apps;
    let mut out = String::from("listeners:\n");
    for (name, cluster) in [("in-http", "app"), ("in-tcp", "echo"), ("in-ws", "ws")] {
        out.push_str(&format!(
            "  - name: {name}\n    address: 127.0.0.1:0\n    protocol: capture\n    \
             direction: inbound\n    mtls: {mtls}\n"
        ));
        if let Some(port) = ports.get(name) {
            out.push_str(&format!(
                "    services: [{{ port: {port}, cluster: {cluster} }}]\n"
            ));
        }
    }
    out.push_str(&format!(
        "clusters:\n  - {{ name: app, endpoints: [\"{app}\"] }}\n  - {{ name: echo, endpoints: [\"{echo}\"] }}\n  - {{ name: ws, endpoints: [\"{ws}\"] }}\n"
    ));
    out
}

/// Proxy A: plain listeners whose clusters' endpoint is B, meshed as `B_ID` (or, for
/// `out-wrong`, as an identity B does not hold; for `out-plain` and `out-tcp-plain`, not
/// meshed).
fn a_yaml(b_http: SocketAddr, b_tcp: SocketAddr, b_ws: SocketAddr) -> String {
    let mut out = String::from("listeners:\n");
    for name in ["h1", "h2", "wrong", "plain", "ws"] {
        out.push_str(&format!(
            "  - {{ name: out-{name}, address: \"127.0.0.1:0\", route_config: to-{name} }}\n"
        ));
    }
    for name in ["tcp", "tcp-plain"] {
        out.push_str(&format!(
            "  - {{ name: out-{name}, address: \"127.0.0.1:0\", protocol: tcp, cluster: b-{name} }}\n"
        ));
    }
    out.push_str("route_configs:\n");
    for name in ["h1", "h2", "wrong", "plain", "ws"] {
        out.push_str(&format!(
            "  - name: to-{name}\n    virtual_hosts: [{{ name: all, domains: ['*'], routes: \
             [{{ forward: {{ cluster: b-{name} }} }}] }}]\n"
        ));
    }
    let wrong = "spiffe://cluster.local/ns/shop/sa/other";
    out.push_str(&format!(
        "clusters:
  - {{ name: b-h1, endpoints: [{{ address: \"{b_http}\", identity: \"{B_ID}\" }}] }}
  - {{ name: b-h2, protocol: http2, endpoints: [{{ address: \"{b_http}\", identity: \"{B_ID}\" }}] }}
  - {{ name: b-wrong, endpoints: [{{ address: \"{b_http}\", identity: \"{wrong}\" }}] }}
  - {{ name: b-tcp, endpoints: [{{ address: \"{b_tcp}\", identity: \"{B_ID}\" }}] }}
  - {{ name: b-plain, endpoints: [\"{b_http}\"] }}
  - {{ name: b-tcp-plain, endpoints: [\"{b_tcp}\"] }}
  - {{ name: b-ws, endpoints: [{{ address: \"{b_ws}\", identity: \"{B_ID}\" }}] }}
"
    ));
    out
}

struct Mesh {
    controller: Controller,
    a: Arc<Proxy>,
    b: Arc<Proxy>,
    a_identity: IdentityWatch,
    out: HashMap<&'static str, SocketAddr>,
    inbound: HashMap<&'static str, SocketAddr>,
    /// B's applications: HTTP, TCP echo, WebSocket.
    apps: [SocketAddr; 3],
    admin: SocketAddr,
}

impl Mesh {
    async fn start(cert_ttl: Duration, mode: &str) -> Mesh {
        let controller = Controller::start(cert_ttl).await;
        let a_identity = controller.identity("a", A_TOKEN).await;
        let b_identity = controller.identity("b", B_TOKEN).await;
        let (app, _) = echo_upstream("app").await;
        let apps = [
            app,
            common::tcp_echo_upstream().await,
            common::ws_upstream().await,
        ];

        let b = Proxy::with_identity(Some(b_identity)).unwrap();
        let first = b_yaml(mode, &HashMap::new(), apps);
        b.apply(validate::from_yaml(&first).unwrap()).await.unwrap();
        let mut inbound = HashMap::new();
        for name in ["in-http", "in-tcp", "in-ws"] {
            inbound.insert(name, b.listener_addr(name).await.unwrap());
        }
        let mesh = Mesh {
            controller,
            a: Proxy::with_identity(Some(a_identity.clone())).unwrap(),
            b,
            a_identity,
            out: HashMap::new(),
            inbound,
            apps,
            admin: "127.0.0.1:0".parse().unwrap(),
        };
        mesh.set_mode(mode).await;
        let yaml = a_yaml(
            mesh.inbound["in-http"],
            mesh.inbound["in-tcp"],
            mesh.inbound["in-ws"],
        );
        mesh.a
            .apply(validate::from_yaml(&yaml).unwrap())
            .await
            .unwrap();
        let mut out = HashMap::new();
        for name in [
            "out-h1",
            "out-h2",
            "out-wrong",
            "out-plain",
            "out-tcp",
            "out-tcp-plain",
            "out-ws",
        ] {
            out.insert(name, mesh.a.listener_addr(name).await.unwrap());
        }
        let (admin, _) = start_admin(&mesh.b).await;
        Mesh { out, admin, ..mesh }
    }

    /// B's inbound listeners in `mode`, keeping their sockets.
    async fn set_mode(&self, mode: &str) {
        let ports = self.inbound.iter().map(|(k, a)| (*k, a.port())).collect();
        let yaml = b_yaml(mode, &ports, self.apps);
        self.b
            .apply(validate::from_yaml(&yaml).unwrap())
            .await
            .unwrap();
        for (name, addr) in &self.inbound {
            assert_eq!(self.b.listener_addr(name).await, Some(*addr));
        }
    }

    async fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&scrape(self.admin).await, name, labels).unwrap_or(0.0)
    }

    async fn handshakes(&self, direction: &str, result: &str) -> f64 {
        self.count(
            "trellis_mesh_tls_handshakes_total",
            &[("direction", direction), ("result", result)],
        )
        .await
    }

    async fn refused(&self) -> f64 {
        self.count(
            "trellis_mesh_plaintext_refused_total",
            &[("listener", "in-http")],
        )
        .await
    }

    /// Through A's TCP listener to B's echo: what comes back.
    async fn tcp_round_trip(&self, payload: &[u8]) -> Vec<u8> {
        self.tcp_round_trip_via("out-tcp", payload).await
    }

    async fn tcp_round_trip_via(&self, listener: &str, payload: &[u8]) -> Vec<u8> {
        let fut = async {
            let mut s = TcpStream::connect(self.out[listener]).await.unwrap();
            s.write_all(payload).await.unwrap();
            let mut back = vec![0u8; payload.len()];
            s.read_exact(&mut back).await.map(|_| back)
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("echo in time")
            .expect("echo read")
    }
}

/// A client that accepts any server and presents `key` (or nothing), offering `alpn`: to see
/// what B itself refuses.
fn trusting_client(
    key: Option<Arc<rustls::sign::CertifiedKey>>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyServer;
    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Fixed {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match key {
        Some(key) => builder.with_client_cert_resolver(Arc::new(Fixed(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// An HTTP/1.1 GET over TLS with `config` straight to `addr`: the response head's first line,
/// or why there was none.
async fn tls_get(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(config)
            .connect(mtls::server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"GET /direct HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        match text.lines().next() {
            Some(line) if !line.is_empty() => Ok(line.to_owned()),
            _ => Err("closed without an answer".into()),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("the exchange ends in time")
}

/// Polls `f` until it gives a value at least `want`, bounded.
async fn until_at_least<F, Fut>(what: &str, want: f64, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = f().await;
        if got >= want {
            return got;
        }
        assert!(Instant::now() < deadline, "{what}: {got} < {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mesh_mtls_and_strict_inbound_refuses_everything_else() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(Duration::from_secs(3600), "strict").await;
    let inbound_ok = mesh.handshakes("inbound", "ok").await;
    let outbound_ok = mesh.handshakes("outbound", "ok").await;
    let client = h1_client();

    // HTTP/1.1: A → (mesh mTLS) → B → the application.
    for _ in 0..3 {
        let (resp, body) = get(&client, &format!("http://{}/one", mesh.out["out-h1"])).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(seen(&body).server, "app");
        assert_eq!(seen(&body).uri, "/one");
    }
    // HTTP/2 between the sidecars (the cluster's protocol), HTTP/1.1 to the application.
    let h2_before = mesh
        .count(
            "trellis_protocol_detection_total",
            &[
                ("listener", "in-http"),
                ("protocol", "http2"),
                ("reason", "declared"),
            ],
        )
        .await;
    let (resp, body) = get(&client, &format!("http://{}/two", mesh.out["out-h2"])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(seen(&body).uri, "/two");
    let h2_after = mesh
        .count(
            "trellis_protocol_detection_total",
            &[
                ("listener", "in-http"),
                ("protocol", "http2"),
                ("reason", "declared"),
            ],
        )
        .await;
    assert_eq!(h2_after - h2_before, 1.0, "B served the hop as HTTP/2");
    // TCP: opaque bytes inside `trellis-mesh/1`.
    assert_eq!(mesh.tcp_round_trip(b"ping\n").await, b"ping\n");
    // A WebSocket upgrade: its own connection, tunnelled once upgraded.
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat", mesh.out["out-ws"]))
            .await
            .expect("the upgrade succeeds");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("over the mesh")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("over the mesh"));
    ws.close(None).await.unwrap();

    // One pooled HTTP/1.1 connection, one HTTP/2 connection, one TCP connection, one upgraded
    // connection: four hops, each a TLS handshake on both sides.
    let inbound = until_at_least("inbound handshakes", inbound_ok + 4.0, || {
        mesh.handshakes("inbound", "ok")
    })
    .await;
    assert_eq!(inbound - inbound_ok, 4.0);
    assert_eq!(mesh.handshakes("outbound", "ok").await - outbound_ok, 4.0);

    // The endpoint is expected to run as another identity: the connection fails as a refused
    // TLS upstream does, and nothing reaches B's application.
    let outbound_errors = mesh.handshakes("outbound", "error").await;
    let (resp, _) = get(&client, &format!("http://{}/wrong", mesh.out["out-wrong"])).await;
    assert!(
        matches!(resp.status().as_u16(), 502 | 503),
        "{}",
        resp.status()
    );
    assert_eq!(resp.headers()["x-trellis-error"], "tls-handshake");
    assert!(mesh.handshakes("outbound", "error").await > outbound_errors);

    // Strict: plaintext and TLS without the mesh ALPN are closed, counted.
    let refused = mesh.refused().await;
    let (answer, closed) = raw_exchange(
        mesh.inbound["in-http"],
        b"GET /plain HTTP/1.1\r\nhost: b\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed && answer.is_empty(), "{answer:?}");
    let a_key = mesh
        .a_identity
        .borrow()
        .as_ref()
        .unwrap()
        .certified_key
        .clone();
    let e = tls_get(
        mesh.inbound["in-http"],
        trusting_client(Some(a_key.clone()), b"http/1.1"),
    )
    .await
    .unwrap_err();
    assert!(!e.is_empty());
    assert_eq!(mesh.refused().await - refused, 2.0);

    // The mesh ALPN with A's certificate straight to B works: the refusals above were about
    // what the caller offered, not the client.
    assert_eq!(
        tls_get(
            mesh.inbound["in-http"],
            trusting_client(Some(a_key), AppProtocol::Http1.alpn())
        )
        .await
        .unwrap(),
        "HTTP/1.1 200 OK"
    );

    // No client certificate, or one from another CA: B's handshake refuses it.
    let inbound_errors = mesh.handshakes("inbound", "error").await;
    assert!(
        tls_get(
            mesh.inbound["in-http"],
            trusting_client(None, AppProtocol::Http1.alpn())
        )
        .await
        .is_err()
    );
    let stranger_ca = Controller::start(Duration::from_secs(3600)).await;
    let stranger = stranger_ca.identity("a", A_TOKEN).await;
    let stranger_key = stranger.borrow().as_ref().unwrap().certified_key.clone();
    assert!(
        tls_get(
            mesh.inbound["in-http"],
            trusting_client(Some(stranger_key), AppProtocol::Http1.alpn())
        )
        .await
        .is_err()
    );
    until_at_least("inbound handshake errors", inbound_errors + 2.0, || {
        mesh.handshakes("inbound", "error")
    })
    .await;

    // Permissive: plaintext is served (no caller identity), and mesh traffic still is.
    mesh.set_mode("permissive").await;
    let (answer, _) = raw_exchange(
        mesh.inbound["in-http"],
        b"GET /plain HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"/plain\""), "{answer}");
    let (resp, _) = get(&client, &format!("http://{}/again", mesh.out["out-h1"])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(mesh.tcp_round_trip(b"pong\n").await, b"pong\n");
    drop(mesh.controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_continues_across_renewals_and_an_expired_certificate_is_refused() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(Duration::from_secs(4), "strict").await;
    let first = mesh.a_identity.borrow().clone().unwrap();
    let mut a_renewals = mesh.a_identity.clone();
    a_renewals.borrow_and_update();
    let client = h1_client();
    let inbound_ok = mesh.handshakes("inbound", "ok").await;
    let inbound_errors = mesh.handshakes("inbound", "error").await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(40);
    let (mut requests, mut renewals) = (0, 0);
    // HTTP on the pooled connection, and a new TCP connection (a new handshake) every tenth.
    while renewals < 3 || requests < 300 {
        assert!(
            Instant::now() < deadline,
            "{requests} requests, {renewals} renewals in the bound"
        );
        if requests % 10 == 0 {
            assert_eq!(mesh.tcp_round_trip(b"tick\n").await, b"tick\n");
        } else {
            let (resp, _) = get(&client, &format!("http://{}/n", mesh.out["out-h1"])).await;
            assert_eq!(resp.status(), StatusCode::OK, "request {requests}");
        }
        requests += 1;
        if a_renewals.has_changed().unwrap() {
            a_renewals.borrow_and_update();
            renewals += 1;
        }
    }

    eprintln!(
        "{requests} requests across {renewals} renewals in {:?}",
        started.elapsed()
    );
    // Every TCP connection was a mesh handshake on B, and none failed.
    let handshakes = mesh.handshakes("inbound", "ok").await - inbound_ok;
    assert!(handshakes >= f64::from(requests / 10), "{handshakes}");
    assert_eq!(mesh.handshakes("inbound", "error").await, inbound_errors);

    // Once the first certificate has expired (validity is checked to the second, so one more),
    // B refuses it.
    let expired = first.not_after + Duration::from_secs(1);
    while SystemTime::now() < expired {
        assert!(
            Instant::now() < deadline,
            "the first certificate outlived the bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = tls_get(
        mesh.inbound["in-http"],
        trusting_client(Some(first.certified_key.clone()), AppProtocol::Http1.alpn()),
    )
    .await
    .unwrap_err();
    assert!(!e.is_empty());
}

#[tokio::test]
async fn ready_waits_for_the_workload_certificate() {
    let _serial = SERIAL.lock().await;
    let controller = Controller::start(Duration::from_secs(3600)).await;
    let issued = controller.identity("a", A_TOKEN).await;
    let (tx, identity) = watch::channel(None);
    let proxy = Proxy::with_identity(Some(identity)).unwrap();
    proxy
        .apply(
            validate::from_yaml(
                "listeners:\n  - { name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: c }\n\
                 clusters:\n  - { name: c, endpoints: [\"127.0.0.1:9\"] }\n",
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let (admin, _) = start_admin(&proxy).await;
    let (resp, body) = get(&h1_client(), &format!("http://{admin}/ready")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"waiting for the workload certificate\n");
    tx.send_replace(issued.borrow().clone());
    let (resp, _) = get(&h1_client(), &format!("http://{admin}/ready")).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// CPU time of this process so far (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start at `state`, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// `n` sequential GETs through `listener`: p50, p99 and process CPU per request.
async fn measure(mesh: &Mesh, listener: &str, n: usize) -> (Duration, Duration, Duration) {
    let client = h1_client();
    let url = format!("http://{}/bench", mesh.out[listener]);
    for _ in 0..100 {
        get(&client, &url).await;
    }
    let mut latencies = Vec::with_capacity(n);
    let cpu = cpu_time();
    for _ in 0..n {
        let started = Instant::now();
        let (resp, _) = get(&client, &url).await;
        latencies.push(started.elapsed());
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let cpu = (cpu_time() - cpu) / n as u32;
    latencies.sort();
    (latencies[n / 2], latencies[n * 99 / 100], cpu)
}

/// Figures, not a check: `cargo test -p trellis-proxy --test mesh_mtls_e2e -- --ignored
/// --nocapture figures`. Both proxies, the client and the application share this process, so
/// CPU per request is the whole exchange's; the difference between the two rows is mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run on demand"]
async fn figures() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(Duration::from_secs(3600), "permissive").await;
    const N: usize = 3000;
    for _ in 0..2 {
        for (label, listener) in [("mTLS", "out-h1"), ("plaintext", "out-plain")] {
            let (p50, p99, cpu) = measure(&mesh, listener, N).await;
            eprintln!(
                "HTTP/1.1 via A->B {label:9}: p50 {p50:?} p99 {p99:?} CPU/request {cpu:?} ({N} requests)"
            );
        }
    }
    for (label, listener) in [("mTLS", "out-tcp"), ("plaintext", "out-tcp-plain")] {
        let started = Instant::now();
        let connections = 1000;
        for _ in 0..connections {
            // A byte no protocol starts with: B's detection decides at once (a word could
            // still become an HTTP method, and would wait for the detection timeout).
            mesh.tcp_round_trip_via(listener, b"\x00").await;
        }
        let rate = f64::from(connections) / started.elapsed().as_secs_f64();
        eprintln!(
            "new TCP connections via A->B {label:9}: {rate:.0}/s (one client, one connection per exchange)"
        );
    }
}
