//! TLS on the discovery port of the real `trellis-control` binary (`--tls-cert/--tls-key`, a
//! certificate made here with rcgen for IP 127.0.0.1 and a DNS name): a proxy in process that
//! trusts the CA gets its listener and serves traffic, and obtains its workload certificate over
//! the same TLS channel; a proxy with another CA, or expecting another name, does not connect and
//! says why; a plaintext client gets nothing from the TLS port; a renewed certificate file is
//! served from the next handshake on.

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::{net::TcpListener, sync::watch, time::Instant};
use trellis_proto::discovery::v1 as api;
use trellis_proxy::{
    Proxy,
    config::xds::{Client, XdsSettings, channel::ControlChannel},
    identity::{IdentityClient, IdentitySettings},
};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-control");
/// Bound on every wait: a test fails rather than hangs.
const WAIT: Duration = Duration::from_secs(15);
const DNS_NAME: &str = "trellis-control.test";
const WEB_TOKEN: &str = "web-token-31c7";

/// A CA and a server certificate it issued for 127.0.0.1 and [`DNS_NAME`], as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "discovery test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![DNS_NAME.to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), key.serialize_pem()).unwrap();
        // A CA the controller's certificate does not chain to.
        let other = rcgen::generate_simple_self_signed(vec![DNS_NAME.to_owned()]).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.cert.pem()).unwrap();
        std::fs::create_dir_all(dir.path().join("tokens/shop")).unwrap();
        std::fs::write(dir.path().join("tokens/shop/web"), WEB_TOKEN).unwrap();
        std::fs::write(dir.path().join("web.token"), WEB_TOKEN).unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The controller binary over TLS with identity on; killed on drop.
struct Running {
    child: Child,
    grpc: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(pki: &Pki) -> Running {
        let mut child = Command::new(BIN)
            .args(["serve", "--manifests"])
            .arg(pki.path("manifests"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(pki.path("server.pem"))
            .arg("--tls-key")
            .arg(pki.path("server-key.pem"))
            .arg("--ca-dir")
            .arg(pki.path("mesh-ca"))
            .arg("--identity-tokens")
            .arg(pki.path("tokens"))
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
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("controller: {line}");
                // Keep draining: a closed pipe would fail the controller's log writes.
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = log.recv_timeout(left) else {
                let _ = child.kill();
                panic!(
                    "the controller did not log `serving` in time: {:?}",
                    child.wait()
                );
            };
            if line.contains("trellis_control: serving ") {
                assert!(line.contains("tls=true"), "{line}");
                let listen = line.split("listen=").nth(1).unwrap();
                let grpc = listen.split_whitespace().next().unwrap().parse().unwrap();
                return Running { child, grpc, log };
            }
        }
    }

    /// Waits (bounded) for a log line containing `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("the controller never logged {needle:?}"),
            }
        }
    }
}

/// An HTTP upstream answering `x-upstream: secured`.
async fn upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    let mut r = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                    r.headers_mut()
                        .insert("x-upstream", http::HeaderValue::from_static("secured"));
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

fn manifests(port: u16, up: u16) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  listeners: [{{name: web, port: {port}, protocol: HTTP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 10.96.7.7
  ports: [{{name: http, port: 80, targetPort: {up}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {up}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{name: ingress}}]
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
"
    )
}

/// GET / through the proxy: the upstream's name, or why not.
async fn get(addr: SocketAddr) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "shop.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .map_err(|_| "no answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let who = resp
        .headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap().to_owned());
    let _ = resp.into_body().collect().await;
    who.filter(|_| status.is_success())
        .ok_or(format!("status {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_trusting_the_ca_gets_its_listener_over_tls_and_serves_traffic() {
    let pki = Pki::new();
    let up = upstream().await;
    // The Gateway's port is fixed by its manifest: take one the kernel just handed out.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(pki.path("manifests/shop.yaml"), manifests(port, up)).unwrap();
    let controller = Running::start(&pki);

    let proxy = Proxy::new();
    let settings = XdsSettings {
        // host:port with a CA file: TLS, verified against the IP SAN 127.0.0.1.
        address: controller.grpc.to_string(),
        ca_file: Some(pki.path("ca.pem")),
        node: api::Node {
            id: "gw-tls".into(),
            role: api::Role::Gateway as i32,
            namespace: "shop".into(),
            gateway_name: "ingress".into(),
            labels: [("trellis.io/bind-ip".to_owned(), "127.0.0.1".to_owned())].into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_static_tx, static_rx) = watch::channel(Arc::default());
    tokio::spawn(Client::new(proxy.clone(), settings, static_rx).run());
    let name = format!("gateway/shop/ingress:{port}");
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        if let Some(addr) = proxy.listener_addr(&name).await {
            break addr;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never served: {:?}",
            proxy.store().not_serving()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let last = get(addr).await;
        if last.as_deref() == Ok("secured") {
            break;
        }
        assert!(Instant::now() < deadline, "never served: {last:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_certificate_comes_over_the_tls_channel() {
    let pki = Pki::new();
    let controller = Running::start(&pki);
    // By DNS name this time, with the address given as an IP.
    let channel = ControlChannel::new(
        &controller.grpc.to_string(),
        Some(&pki.path("ca.pem")),
        Some(DNS_NAME),
    )
    .unwrap();
    let settings = IdentitySettings {
        address: controller.grpc.to_string(),
        namespace: "shop".into(),
        service_account: "web".into(),
        token_file: pki.path("web.token"),
    };
    let (client, mut identity) = IdentityClient::with_channel(settings, &channel).unwrap();
    tokio::spawn(client.run());
    tokio::time::timeout(WAIT, identity.wait_for(Option::is_some))
        .await
        .expect("a certificate over TLS within the bound")
        .unwrap();
    let id = identity.borrow().clone().unwrap();
    assert_eq!(
        id.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_name_does_not_connect_and_says_why() {
    let pki = Pki::new();
    let controller = Running::start(&pki);
    let address = controller.grpc.to_string();
    let connect = |ca: &Path, name: Option<&str>| {
        let channel = ControlChannel::new(&address, Some(ca), name).unwrap();
        async move { channel.connect().await.map(drop) }
    };

    let wrong_ca = connect(&pki.path("other-ca.pem"), None)
        .await
        .expect_err("connected with a CA the certificate does not chain to");
    assert!(
        wrong_ca.contains(&format!("TLS to the controller at {address}"))
            && wrong_ca.contains("UnknownIssuer"),
        "{wrong_ca}"
    );
    // The controller's side of the same refusal.
    controller.wait_log("TLS handshake on the discovery port failed");

    let wrong_name = connect(&pki.path("ca.pem"), Some("elsewhere.test"))
        .await
        .expect_err("connected to a certificate for other names");
    assert!(
        wrong_name.contains(&address)
            && wrong_name.contains("certificate not valid for name \"elsewhere.test\""),
        "{wrong_name}"
    );

    // The right CA and name do connect (the refusals above were not about something else).
    connect(&pki.path("ca.pem"), Some(DNS_NAME))
        .await
        .expect("the right CA and name connect");

    // A plaintext client gets no discovery stream from the TLS port.
    let plain = ControlChannel::new(&format!("http://{address}"), None, None).unwrap();
    // The h2 preface may already fail the connection; if not, the stream must.
    if let Ok(channel) = plain.connect().await {
        let mut grpc = api::aggregated_discovery_client::AggregatedDiscoveryClient::new(channel);
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let opened = tokio::time::timeout(
            WAIT,
            grpc.delta_resources(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .expect("a plaintext attempt ends within the bound");
        assert!(
            opened.is_err(),
            "a plaintext stream was opened on the TLS port"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_file_is_served_at_the_next_handshake() {
    let pki = Pki::new();
    let controller = Running::start(&pki);
    let address = controller.grpc.to_string();
    let connect = |ca: PathBuf| {
        let channel = ControlChannel::new(&address, Some(&ca), None).unwrap();
        async move { channel.connect().await.map(drop) }
    };
    connect(pki.path("ca.pem")).await.unwrap();

    // cert-manager renews from another CA: write the new pair beside, then rename over.
    let renewed = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(pki.path("renewed-ca.pem"), renewed.cert.pem()).unwrap();
    std::fs::write(pki.path("new.pem"), renewed.cert.pem()).unwrap();
    std::fs::write(pki.path("new-key.pem"), renewed.signing_key.serialize_pem()).unwrap();
    std::fs::rename(pki.path("new-key.pem"), pki.path("server-key.pem")).unwrap();
    std::fs::rename(pki.path("new.pem"), pki.path("server.pem")).unwrap();

    let deadline = Instant::now() + WAIT;
    loop {
        match connect(pki.path("renewed-ca.pem")).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "never reloaded: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    controller.wait_log("discovery TLS certificate reloaded");
    let old = connect(pki.path("ca.pem")).await.unwrap_err();
    assert!(old.contains("UnknownIssuer"), "{old}");
}
