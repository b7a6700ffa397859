//! Workload identity end to end, against the controller's CA served in process on 127.0.0.1:
//! the real `trellis-proxy` binary obtains and renews its certificate (a wrong token makes
//! renewal fail while the current certificate stays; the right one resumes it), and two
//! identities obtained through the library do mesh mTLS that holds only with the expected
//! SPIFFE ID and the mesh's own CA.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{metric, scrape};
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
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_control::{
    catalog::Catalog,
    identity::{CaSource, CertificateAuthority, IdentityService, TokenDir},
    server::{self, DiscoveryService},
    status::Registry,
};
use trellis_proxy::identity::{
    IdentityClient, IdentitySettings, IdentityWatch, SpiffeId,
    mtls::{self, AppProtocol},
};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const WAIT: Duration = Duration::from_secs(20);
const WEB_TOKEN: &str = "web-token-0b7e";
const DB_TOKEN: &str = "db-token-77a1";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB_ID: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// The controller's gRPC server (discovery and identity) with its own CA directory.
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
        std::fs::write(dir.path().join("tokens/shop/web"), WEB_TOKEN).unwrap();
        std::fs::write(dir.path().join("tokens/shop/db"), DB_TOKEN).unwrap();
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

    fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, token).unwrap();
        path
    }

    /// An identity for shop/`account` through the library, once its first certificate is in.
    async fn identity(&self, account: &str, token: &str) -> IdentityWatch {
        let (client, mut watch) = IdentityClient::new(IdentitySettings {
            address: self.addr.to_string(),
            namespace: "shop".into(),
            service_account: account.into(),
            token_file: self.token_file(&format!("{account}.token"), token),
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

/// The proxy binary; killed on drop.
struct Proxy {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(controller: SocketAddr, token_file: &std::path::Path) -> Proxy {
        let mut child = Command::new(BIN)
            .args(["--xds", &controller.to_string()])
            .args(["--namespace", "shop", "--service-account", "web"])
            .arg("--identity-token-file")
            .arg(token_file)
            .args(["--admin", "127.0.0.1:0", "--workers", "1"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("proxy: {line}");
                // Keep draining: a closed pipe would fail the proxy's log writes.
                let _ = tx.send(line);
            }
        });
        Proxy { child, lines }
    }

    /// The admin address from the start-up line.
    fn admin(&self) -> SocketAddr {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .expect("the proxy logs its start in time");
            if line.contains("trellis-proxy started") {
                let addr = line.split("admin=").nth(1).unwrap();
                return addr.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Renewals by outcome and the certificate's notAfter (Unix seconds, from the seconds-left gauge).
async fn identity_metrics(admin: SocketAddr) -> (f64, f64, Option<f64>) {
    let samples = scrape(admin).await;
    let count = |outcome| {
        metric(
            &samples,
            "trellis_identity_renewals_total",
            &[("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    let not_after = metric(&samples, "trellis_identity_certificate_expiry_seconds", &[])
        .map(|left| now_secs() + left);
    (count("success"), count("failure"), not_after)
}

/// Polls the proxy's metrics until `done` holds, bounded.
async fn until(
    admin: SocketAddr,
    what: &str,
    done: impl Fn(&(f64, f64, Option<f64>)) -> bool,
) -> (f64, f64, Option<f64>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = identity_metrics(admin).await;
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: last {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_renews_its_certificate_and_survives_a_bad_token() {
    let controller = Controller::start(Duration::from_secs(4)).await;
    let token = controller.token_file("proxy.token", WEB_TOKEN);
    let proxy = Proxy::start(controller.addr, &token);
    let admin = proxy.admin();

    let (_, _, first) = until(admin, "a first certificate", |m| m.0 >= 1.0).await;
    let first = first.expect("the expiry gauge once a certificate is held");
    assert!(first > now_secs(), "the first certificate is current");
    // A 4 s lifetime renewed at about half: two more successes within a few seconds, each
    // certificate expiring later than the one before.
    let (_, failures, renewed) = until(admin, "two renewals", |m| m.0 >= 3.0).await;
    let renewed = renewed.unwrap();
    assert!(
        renewed > first + 1.5,
        "notAfter moved from {first} to {renewed}"
    );
    assert_eq!(failures, 0.0);

    // The token file is re-read for each renewal: a wrong token fails, loudly, and the
    // certificate in force stays.
    std::fs::write(&token, "not-the-token").unwrap();
    let (successes, _, _) = until(admin, "a failed renewal", |m| m.1 >= 1.0).await;
    std::fs::write(&token, WEB_TOKEN).unwrap();
    until(admin, "renewal resumes with the right token", |m| {
        m.0 > successes
    })
    .await;
    let refused = proxy
        .lines
        .try_iter()
        .find(|l| l.contains("renewal failed") || l.contains("cannot be renewed"))
        .expect("the failure is logged");
    assert!(refused.contains("shop/web"), "{refused}");
    assert!(!refused.contains("not-the-token"), "{refused}");
}

/// Accepts mesh connections with `identity`; each accepted one is answered with the caller's
/// SPIFFE ID and ALPN; each refused one sends its error on the returned channel.
async fn mesh_server(
    identity: IdentityWatch,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let acceptor = TlsAcceptor::from(mtls::server_config(identity).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (errors_tx, errors) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let errors_tx = errors_tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let peer = mtls::peer_identity(tls.get_ref().1).unwrap();
                        let line = format!("{} {:?}\n", peer.id, peer.protocol);
                        let _ = tls.write_all(line.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                    Err(e) => {
                        let _ = errors_tx.send(e.to_string());
                    }
                }
            });
        }
    });
    (addr, errors)
}

/// Connects with `config` and reads the server's answer, or the handshake error.
async fn call(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let fut = async {
        let mut tls = TlsConnector::from(config)
            .connect(mtls::server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer.is_empty() {
            return Err("closed without an answer".into());
        }
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("the exchange ends in time")
}

async fn server_error(errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .expect("the server reports the refused handshake in time")
        .unwrap()
}

#[tokio::test]
async fn mesh_mtls_holds_only_for_the_expected_identity_and_the_mesh_ca() {
    let controller = Controller::start(Duration::from_secs(3600)).await;
    let web = controller.identity("web", WEB_TOKEN).await;
    let db = controller.identity("db", DB_TOKEN).await;
    let (addr, mut errors) = mesh_server(db.clone()).await;
    let db_id = SpiffeId::parse(DB_ID).unwrap();

    // The expected identity: the server learns the caller's.
    let config = mtls::client_config(web.clone(), db_id.clone(), AppProtocol::Http1).unwrap();
    assert_eq!(
        call(addr, config).await.unwrap(),
        format!("{WEB_ID} Http1\n")
    );

    // Expecting anyone else: the client refuses the server.
    let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/other").unwrap();
    let config = mtls::client_config(web.clone(), other, AppProtocol::Http2).unwrap();
    let e = call(addr, config).await.unwrap_err();
    assert!(
        e.contains("the peer is spiffe://cluster.local/ns/shop/sa/db, expected"),
        "{e}"
    );
    let _ = server_error(&mut errors).await;

    // An identity from another CA: the client does not trust the server ...
    let stranger_ca = Controller::start(Duration::from_secs(3600)).await;
    let stranger = stranger_ca.identity("web", WEB_TOKEN).await;
    let config = mtls::client_config(stranger.clone(), db_id.clone(), AppProtocol::Tcp).unwrap();
    let e = call(addr, config).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    let _ = server_error(&mut errors).await;
    // ... nor the server the client, even one that skips checking the server.
    let key = stranger.borrow().as_ref().unwrap().certified_key.clone();
    let e = call(addr, trusting_client(Some(key))).await.unwrap_err();
    assert!(!e.is_empty());
    let e = server_error(&mut errors).await;
    assert!(e.contains("UnknownIssuer"), "{e}");
    // No client certificate at all.
    let _ = call(addr, trusting_client(None)).await.unwrap_err();
    let e = server_error(&mut errors).await;
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_renewed_certificate_serves_the_next_handshake() {
    let controller = Controller::start(Duration::from_secs(3)).await;
    let web = controller.identity("web", WEB_TOKEN).await;
    let mut db = controller.identity("db", DB_TOKEN).await;
    let (addr, _errors) = mesh_server(db.clone()).await;
    let config =
        mtls::client_config(web, SpiffeId::parse(DB_ID).unwrap(), AppProtocol::Tcp).unwrap();
    let served = |config: Arc<rustls::ClientConfig>| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(config)
            .connect(mtls::server_name(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = served(config.clone()).await;
    db.borrow_and_update();
    tokio::time::timeout(WAIT, db.changed())
        .await
        .expect("a renewal within the bound")
        .unwrap();
    let after = served(config).await;
    assert_ne!(
        before, after,
        "the same config presents the renewed certificate"
    );
    let current = db.borrow().as_ref().unwrap().certified_key.cert[0].to_vec();
    assert_eq!(after, current);
}

/// A client that accepts any server and presents `key` (or nothing): to see what the mesh
/// server itself refuses.
fn trusting_client(key: Option<Arc<rustls::sign::CertifiedKey>>) -> Arc<rustls::ClientConfig> {
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
    config.alpn_protocols = vec![AppProtocol::Tcp.alpn().to_vec()];
    Arc::new(config)
}
