//! TLS from the proxy to its upstreams, end to end: real rustls servers on 127.0.0.1 with
//! certificates made by rcgen in each test, which record the server name, ALPN protocol, client
//! certificate and handshake kind of every session they accept.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::{
    HandshakeKind, RootCertStore, ServerConfig,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use trellis_proxy::{
    config::validate,
    tls::material::{self, SecretString},
};

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses): its PEM chain and PEM key.
    fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        if client {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn certified(chain: &str, key: &str) -> Arc<CertifiedKey> {
    material::certificate(chain.as_bytes(), &SecretString::new(key), SystemTime::now())
        .unwrap()
        .key
}

/// Serves its certificate only to a ClientHello naming `only_for` (any name when `None`), as a
/// server hosting several names refuses one it does not host.
#[derive(Debug)]
struct SniResolver {
    only_for: Option<String>,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match &self.only_for {
            Some(name) if hello.server_name() != Some(name.as_str()) => None,
            _ => Some(self.key.clone()),
        }
    }
}

/// What a TLS upstream saw of each session it accepted.
#[derive(Debug, Clone, PartialEq)]
struct Session {
    sni: Option<String>,
    alpn: Option<String>,
    resumed: bool,
    client_certificate: bool,
}

#[derive(Default)]
struct Upstream {
    sessions: Mutex<Vec<Session>>,
    failed_handshakes: AtomicUsize,
    requests: AtomicUsize,
    health_checks: AtomicUsize,
    /// The path and `:scheme` (HTTP/2) of every request.
    schemes: Mutex<Vec<(String, Option<String>)>>,
}

impl Upstream {
    fn sessions(&self) -> Vec<Session> {
        self.sessions.lock().unwrap().clone()
    }
}

struct ServerOptions<'a> {
    chain: &'a str,
    key: &'a str,
    only_for: Option<&'a str>,
    /// Client certificates required, from this CA.
    client_ca: Option<&'a str>,
}

fn server_config(o: &ServerOptions<'_>) -> ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match o.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots: RootCertStore = material::ca_bundle(ca.as_bytes()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver {
        only_for: o.only_for.map(str::to_owned),
        key: certified(o.chain, o.key),
    }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// A TLS upstream (HTTP/1.1 and HTTP/2) answering every request with a JSON description of its
/// session and request. A path containing `/close` answers with `Connection: close`.
async fn tls_upstream(o: ServerOptions<'_>) -> (SocketAddr, Arc<Upstream>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&o)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Arc::new(Upstream::default());
    let up = upstream.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let up = up.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    up.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let (_, conn) = tls.get_ref();
                let session = Session {
                    sni: conn.server_name().map(str::to_owned),
                    alpn: conn
                        .alpn_protocol()
                        .map(|a| String::from_utf8_lossy(a).into_owned()),
                    resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
                    client_certificate: conn.peer_certificates().is_some(),
                };
                up.sessions.lock().unwrap().push(session.clone());
                let svc = service_fn(move |req| answer(up.clone(), session.clone(), req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, upstream)
}

async fn answer(
    up: Arc<Upstream>,
    session: Session,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    up.schemes.lock().unwrap().push((
        req.uri().path().to_owned(),
        req.uri().scheme_str().map(str::to_owned),
    ));
    if req
        .headers()
        .get("user-agent")
        .is_some_and(|v| v == "trellis-health-check")
    {
        up.health_checks.fetch_add(1, Ordering::SeqCst);
    } else {
        up.requests.fetch_add(1, Ordering::SeqCst);
    }
    let body = serde_json::json!({
        "sni": session.sni,
        "alpn": session.alpn,
        "client_certificate": session.client_certificate,
        "version": format!("{:?}", req.version()),
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    if req.uri().path().contains("/close") {
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    Ok(resp)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A cluster entry; `tls` is a JSON object (YAML flow syntax accepts it).
fn tls_cluster(name: &str, protocol: &str, endpoint: SocketAddr, tls: serde_json::Value) -> String {
    format!(
        "  - {{ name: {name}, protocol: {protocol}, connect_timeout: 2s, endpoints: [\"{endpoint}\"], tls: {tls} }}\n"
    )
}

/// Routes `/<cluster>/...` to each cluster.
fn routes(clusters: &[&str]) -> String {
    clusters
        .iter()
        .map(|c| {
            format!(
                "          - {{ name: {c}, match: {{ path: {{ prefix: /{c}/ }} }}, forward: {{ cluster: {c} }} }}\n"
            )
        })
        .collect()
}

async fn get_json(addr: SocketAddr, path: &str) -> (StatusCode, Option<String>, serde_json::Value) {
    let (resp, body) = get(&h1_client(), &format!("http://{addr}{path}")).await;
    let error = resp
        .headers()
        .get("x-trellis-error")
        .map(|v| v.to_str().unwrap().to_owned());
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (resp.status(), error, json)
}

async fn tls_errors(admin: SocketAddr, cluster: &str) -> f64 {
    metric(
        &scrape(admin).await,
        "trellis_upstream_errors_total",
        &[("cluster", cluster), ("reason", "tls-handshake")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn the_configured_server_name_is_sent_and_a_wrong_one_fails() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let clusters = [
        tls_cluster(
            "sni_right",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file }),
        ),
        tls_cluster(
            "sni_wrong",
            "http1",
            up,
            serde_json::json!({ "sni": "other.test", "ca_file": ca_file }),
        ),
    ]
    .concat();
    let (proxy, addr) = start_proxy(&config(&routes(&["sni_right", "sni_wrong"]), &clusters)).await;
    let (admin, _) = start_admin(&proxy).await;

    let (status, error, body) = get_json(addr, "/sni_right/x").await;
    assert_eq!((status, error), (StatusCode::OK, None), "{body}");
    assert_eq!(body["sni"], "upstream.test");
    assert_eq!(body["alpn"], "http/1.1");
    assert_eq!(body["version"], "HTTP/1.1");

    let (status, error, _) = get_json(addr, "/sni_wrong/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.as_deref(), Some("tls-handshake"));
    assert!(seen.failed_handshakes.load(Ordering::SeqCst) >= 1);
    assert!(tls_errors(admin, "sni_wrong").await >= 1.0);
    assert_eq!(tls_errors(admin, "sni_right").await, 0.0);
}

#[tokio::test]
async fn an_untrusted_certificate_fails_with_its_reason_and_system_roots_are_the_default() {
    let ca = Ca::new("test ca");
    let other = Ca::new("another ca");
    let (chain, key) = ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: None,
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let other_file = write(dir.path(), "other.pem", &other.pem());
    let clusters = [
        tls_cluster(
            "wrong_ca",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": other_file }),
        ),
        // No CA given: the system's trust store, which does not hold the test CA.
        tls_cluster(
            "system_roots",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test" }),
        ),
    ]
    .concat();
    let (proxy, addr) =
        start_proxy(&config(&routes(&["wrong_ca", "system_roots"]), &clusters)).await;
    let (admin, _) = start_admin(&proxy).await;
    for cluster in ["wrong_ca", "system_roots"] {
        let (status, error, _) = get_json(addr, &format!("/{cluster}/x")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{cluster}");
        assert_eq!(error.as_deref(), Some("tls-handshake"), "{cluster}");
        assert!(tls_errors(admin, cluster).await >= 1.0, "{cluster}");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
    assert!(seen.sessions().is_empty(), "no session was established");
}

#[tokio::test]
async fn without_sni_the_endpoint_address_is_verified_and_alt_names_widen_the_check() {
    let ca = Ca::new("test ca");
    let (ip_chain, ip_key) = ca.leaf(&["127.0.0.1"], false);
    let (by_ip, by_ip_seen) = tls_upstream(ServerOptions {
        chain: &ip_chain,
        key: &ip_key,
        only_for: None,
        client_ca: None,
    })
    .await;
    let (svc_chain, svc_key) = ca.leaf(&["svc.internal"], false);
    let (svc, _) = tls_upstream(ServerOptions {
        chain: &svc_chain,
        key: &svc_key,
        only_for: None,
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let clusters = [
        tls_cluster(
            "by_ip",
            "http1",
            by_ip,
            serde_json::json!({ "ca_file": ca_file }),
        ),
        tls_cluster(
            "alt_name",
            "http1",
            svc,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file,
                                "subject_alt_names": ["svc.internal"] }),
        ),
        tls_cluster(
            "no_alt_name",
            "http1",
            svc,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file }),
        ),
    ]
    .concat();
    let (_proxy, addr) = start_proxy(&config(
        &routes(&["by_ip", "alt_name", "no_alt_name"]),
        &clusters,
    ))
    .await;

    let (status, _, body) = get_json(addr, "/by_ip/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        by_ip_seen.sessions()[0].sni,
        None,
        "an IP address is never sent as SNI"
    );
    let (status, _, body) = get_json(addr, "/alt_name/x").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sni"], "upstream.test");
    let (status, error, _) = get_json(addr, "/no_alt_name/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.as_deref(), Some("tls-handshake"));
}

#[tokio::test]
async fn http2_clusters_negotiate_h2_by_alpn() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let clusters = tls_cluster(
        "h2tls",
        "http2",
        up,
        serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file }),
    );
    let (_proxy, addr) = start_proxy(&config(&routes(&["h2tls"]), &clusters)).await;
    for _ in 0..10 {
        let (status, _, body) = get_json(addr, "/h2tls/x").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["alpn"], "h2");
        assert_eq!(body["version"], "HTTP/2.0");
    }
    assert_eq!(
        seen.sessions().len(),
        1,
        "one HTTP/2 connection carries all"
    );
}

#[tokio::test]
async fn a_required_client_certificate_is_presented_from_files_or_a_secret() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let (chain, key) = server_ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: Some(&client_ca.pem()),
    })
    .await;
    let (client_chain, client_key) = client_ca.leaf(&["proxy.test"], true);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &server_ca.pem());
    let cert_file = write(dir.path(), "client.pem", &client_chain);
    let key_file = write(dir.path(), "client.key", &client_key);
    let clusters = [
        tls_cluster(
            "mtls_files",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file,
                "client_certificate": { "cert_file": cert_file, "key_file": key_file } }),
        ),
        tls_cluster(
            "mtls_secret",
            "http2",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_secret": "upstream-ca",
                "client_certificate": { "secret": "proxy-client" } }),
        ),
        tls_cluster(
            "no_client_cert",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file }),
        ),
        tls_cluster(
            "no_client_cert_h2",
            "http2",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file }),
        ),
    ]
    .concat();
    let secrets = serde_json::json!([
        { "name": "upstream-ca", "ca_bundle": server_ca.pem() },
        { "name": "proxy-client", "certificate_chain": client_chain, "private_key": client_key },
    ]);
    let yaml = format!(
        "{}\nsecrets: {secrets}\n",
        config(
            &routes(&[
                "mtls_files",
                "mtls_secret",
                "no_client_cert",
                "no_client_cert_h2"
            ]),
            &clusters
        )
    );
    let (proxy, addr) = start_proxy(&yaml).await;

    for cluster in ["mtls_files", "mtls_secret"] {
        let (status, _, body) = get_json(addr, &format!("/{cluster}/x")).await;
        assert_eq!(status, StatusCode::OK, "{cluster}: {body}");
        assert_eq!(body["client_certificate"], true, "{cluster}");
    }
    // Under TLS 1.3 the server refuses a missing certificate after the client has finished its
    // side of the handshake, as an alert in answer to the first request: still a failed
    // handshake, not an upstream reset.
    for cluster in ["no_client_cert", "no_client_cert_h2"] {
        let (status, error, _) = get_json(addr, &format!("/{cluster}/x")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{cluster}");
        assert_eq!(error.as_deref(), Some("tls-handshake"), "{cluster}");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);

    // The dump names where the key came from, never the key.
    let (admin, _) = start_admin(&proxy).await;
    let (resp, body) = get(&h1_client(), &format!("http://{admin}/config_dump")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    let key_body = client_key.lines().nth(1).unwrap();
    assert!(!text.contains(key_body), "key bytes in /config_dump");
    let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let cluster = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mtls_secret")
        .unwrap();
    assert_eq!(
        cluster["tls"],
        serde_json::json!({
            "sni": "upstream.test",
            "ca": "secret upstream-ca",
            "client_certificate": { "source": "secret proxy-client", "private_key": "[redacted]" },
            "subject_alt_names": [],
            "verify_subject_alt_names": [],
        })
    );
}

#[tokio::test]
async fn pooled_tls_connections_are_reused_and_new_ones_resume() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let clusters = tls_cluster(
        "pooled",
        "http1",
        up,
        serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file }),
    );
    let (_proxy, addr) = start_proxy(&config(&routes(&["pooled"]), &clusters)).await;
    for _ in 0..50 {
        let (status, _, _) = get_json(addr, "/pooled/x").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 50);
    assert_eq!(seen.sessions().len(), 1, "50 requests, one handshake");

    // The upstream closes the connection; the next one resumes the session.
    let (status, _, _) = get_json(addr, "/pooled/close").await;
    assert_eq!(status, StatusCode::OK);
    eventually(
        Duration::from_secs(5),
        "a resumed second session",
        || async {
            let (status, _, _) = get_json(addr, "/pooled/x").await;
            assert_eq!(status, StatusCode::OK);
            seen.sessions().len() >= 2
        },
    )
    .await;
    let sessions = seen.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert!(!sessions[0].resumed && sessions[1].resumed, "{sessions:?}");
}

#[tokio::test]
async fn a_changed_tls_setting_is_not_served_by_old_connections() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["a.test", "b.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: None,
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let yaml = |sni: &str| {
        config(
            &routes(&["changing"]),
            &tls_cluster(
                "changing",
                "http1",
                up,
                serde_json::json!({ "sni": sni, "ca_file": ca_file }),
            ),
        )
    };
    let (proxy, addr) = start_proxy(&yaml("a.test")).await;
    let (_, _, body) = get_json(addr, "/changing/x").await;
    assert_eq!(body["sni"], "a.test");

    // The same settings again keep the pool.
    proxy
        .apply(validate::from_yaml(&yaml("a.test")).unwrap())
        .await
        .unwrap();
    let (_, _, body) = get_json(addr, "/changing/x").await;
    assert_eq!(body["sni"], "a.test");
    assert_eq!(seen.sessions().len(), 1);

    proxy
        .apply(validate::from_yaml(&yaml("b.test")).unwrap())
        .await
        .unwrap();
    let (_, _, body) = get_json(addr, "/changing/x").await;
    assert_eq!(body["sni"], "b.test", "a new connection with the new name");
    assert_eq!(seen.sessions().len(), 2);
}

#[tokio::test]
async fn health_checks_of_a_tls_cluster_speak_tls() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let clusters = format!(
        "  - {{ name: checked, connect_timeout: 2s, endpoints: [\"{up}\"], \
         health_check: {{ http: {{ path: /healthz }}, interval: 50ms, jitter: 0s }}, \
         tls: {} }}\n",
        serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file })
    );
    let (_proxy, _addr) = start_proxy(&config(&routes(&["checked"]), &clusters)).await;
    eventually(Duration::from_secs(5), "health checks over TLS", || async {
        seen.health_checks.load(Ordering::SeqCst) >= 2
    })
    .await;
    let sessions = seen.sessions();
    assert!(
        sessions
            .iter()
            .all(|s| s.sni.as_deref() == Some("upstream.test")
                && s.alpn.as_deref() == Some("http/1.1")),
        "{sessions:?}"
    );
}

/// A gRPC health check of a TLS cluster is an HTTP/2 request over TLS, and says so: `:scheme`
/// is `https`, as a gRPC server behind TLS expects.
#[tokio::test]
async fn grpc_health_checks_over_tls_send_scheme_https() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let clusters = format!(
        "  - {{ name: grpc_checked, protocol: http2, connect_timeout: 2s, endpoints: [\"{up}\"], \
         health_check: {{ grpc: {{ service: \"\" }}, interval: 50ms, jitter: 0s }}, \
         tls: {} }}\n",
        serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file })
    );
    let (_proxy, _addr) = start_proxy(&config(&routes(&["grpc_checked"]), &clusters)).await;
    let check = "/grpc.health.v1.Health/Check";
    eventually(Duration::from_secs(5), "a gRPC health check", || async {
        seen.schemes.lock().unwrap().iter().any(|(p, _)| p == check)
    })
    .await;
    let schemes = seen.schemes.lock().unwrap().clone();
    assert!(
        schemes
            .iter()
            .filter(|(p, _)| p == check)
            .all(|(_, s)| s.as_deref() == Some("https")),
        "{schemes:?}"
    );
}

/// Each mistake is refused with the field at fault; no message quotes key material.
#[test]
fn bad_tls_settings_are_refused_with_their_field() {
    let ca = Ca::new("test ca");
    let (chain, key) = ca.leaf(&["proxy.test"], true);
    let (_, other_key) = ca.leaf(&["proxy.test"], true);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let not_pem = write(dir.path(), "junk.pem", "not a certificate");
    let cert_file = write(dir.path(), "c.pem", &chain);
    let wrong_key = write(dir.path(), "wrong.key", &other_key);
    let missing = dir.path().join("missing.pem").display().to_string();
    let secrets = serde_json::json!([
        { "name": "no-ca", "certificate_chain": chain, "private_key": key },
    ]);
    let ep = "127.0.0.1:1".parse().unwrap();
    let check = |tls: serde_json::Value, extra: &str| -> String {
        let yaml = format!(
            "{}\nsecrets: {secrets}\n{extra}",
            config(&routes(&["c"]), &tls_cluster("c", "http1", ep, tls))
        );
        match validate::from_yaml(&yaml) {
            Ok(_) => "accepted".to_owned(),
            Err(e) => e.to_string(),
        }
    };
    let cases = [
        (
            serde_json::json!({ "ca_file": missing }),
            "clusters[0].tls.ca_file: cannot read",
        ),
        (
            serde_json::json!({ "ca_file": "/dev/zero" }),
            "clusters[0].tls.ca_file: \"/dev/zero\" is not a regular file",
        ),
        (
            serde_json::json!({ "ca_file": not_pem }),
            "clusters[0].tls.ca_file: file",
        ),
        (
            serde_json::json!({ "ca_file": ca_file, "ca_secret": "no-ca" }),
            "clusters[0].tls.ca_file: give ca_file or ca_secret, not both",
        ),
        (
            serde_json::json!({ "ca_secret": "nowhere" }),
            "clusters[0].tls.ca_secret: unknown secret \"nowhere\"",
        ),
        (
            serde_json::json!({ "ca_secret": "no-ca" }),
            "clusters[0].tls.ca_secret: secret \"no-ca\" has no ca_bundle",
        ),
        (
            serde_json::json!({ "sni": "not a name" }),
            "clusters[0].tls.sni:",
        ),
        (
            serde_json::json!({ "subject_alt_names": ["ok.test", "bad name"] }),
            "clusters[0].tls.subject_alt_names[1]:",
        ),
        (
            serde_json::json!({ "client_certificate": { "cert_file": cert_file } }),
            "clusters[0].tls.client_certificate: give cert_file and key_file, or secret",
        ),
        (
            serde_json::json!({ "client_certificate": { "cert_file": cert_file, "key_file": wrong_key } }),
            "clusters[0].tls.client_certificate: files",
        ),
        (
            serde_json::json!({ "client_certificate": { "secret": "nowhere" } }),
            "clusters[0].tls.client_certificate.secret: unknown secret \"nowhere\"",
        ),
    ];
    for (tls, want) in cases {
        let got = check(tls.clone(), "");
        assert!(got.contains(want), "{tls}: {got}");
        assert!(
            !got.contains(key.lines().nth(1).unwrap())
                && !got.contains(other_key.lines().nth(1).unwrap()),
            "key bytes in {got}"
        );
    }
    let mismatch = check(
        serde_json::json!({ "client_certificate": { "cert_file": cert_file, "key_file": wrong_key } }),
        "",
    );
    assert!(mismatch.contains("does not match"), "{mismatch}");

    // Accepted: no CA (the system's roots), and a full set.
    assert_eq!(check(serde_json::json!({}), ""), "accepted");
    assert_eq!(
        check(
            serde_json::json!({ "sni": "x.test", "ca_file": ca_file,
                "client_certificate": { "secret": "no-ca" }, "subject_alt_names": ["10.0.0.1"] }),
            ""
        ),
        "accepted"
    );

    // A passthrough listener forwards the client's own TLS: wrapping it again is refused; a
    // TCP listener originates TLS (see `a_tcp_listener_originates_tls_to_a_tls_cluster`).
    let sni = "  - { name: l4, address: \"127.0.0.1:0\", protocol: tls_passthrough, default_cluster: c }\n";
    let yaml = format!(
        "listeners:\n{sni}clusters:\n{}",
        tls_cluster("c", "http1", ep, serde_json::json!({ "ca_file": ca_file }))
    );
    let got = validate::from_yaml(&yaml).unwrap_err().to_string();
    assert!(
        got.contains(
            "clusters[0].tls: listeners[0] (\"l4\", protocol tls_passthrough) sends to this \
             cluster"
        ),
        "{got}"
    );
    let tcp = "  - { name: l4, address: \"127.0.0.1:0\", protocol: tcp, cluster: c }\n";
    let yaml = format!(
        "listeners:\n{tcp}clusters:\n{}",
        tls_cluster("c", "http1", ep, serde_json::json!({ "ca_file": ca_file }))
    );
    if let Err(e) = validate::from_yaml(&yaml) {
        panic!("a TCP listener to a TLS cluster is refused: {e}");
    }
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A TCP listener in front of a TLS cluster: the bytes it receives in the clear reach the
/// upstream inside a TLS session the proxy originates, with the cluster's SNI and client
/// certificate and no ALPN offer; an upstream whose certificate the cluster's CA did not sign
/// gets no bytes, and the proxy logs and counts the failed handshake.
#[tokio::test]
async fn a_tcp_listener_originates_tls_to_a_tls_cluster() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test's runtime is single-threaded, so the proxy's tasks log on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let other = Ca::new("another ca");
    let (chain, key) = server_ca.leaf(&["upstream.test"], false);
    let (up, seen) = tls_upstream(ServerOptions {
        chain: &chain,
        key: &key,
        only_for: Some("upstream.test"),
        client_ca: Some(&client_ca.pem()),
    })
    .await;
    let (client_chain, client_key) = client_ca.leaf(&["proxy.test"], true);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &server_ca.pem());
    let other_file = write(dir.path(), "other.pem", &other.pem());
    let cert_file = write(dir.path(), "client.pem", &client_chain);
    let key_file = write(dir.path(), "client.key", &client_key);
    let yaml = format!(
        "listeners:
  - {{ name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: tcp_tls }}
  - {{ name: wrong, address: \"127.0.0.1:0\", protocol: tcp, cluster: tcp_wrong_ca }}
clusters:
{}{}",
        tls_cluster(
            "tcp_tls",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file,
                "client_certificate": { "cert_file": cert_file, "key_file": key_file } }),
        ),
        tls_cluster(
            "tcp_wrong_ca",
            "http1",
            up,
            serde_json::json!({ "sni": "upstream.test", "ca_file": other_file }),
        ),
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _) = start_admin(&proxy).await;

    // Plain HTTP/1.1 to the TCP listener; the upstream answers with what its session saw.
    let (status, error, body) = get_json(addr, "/x").await;
    assert_eq!((status, error), (StatusCode::OK, None), "{body}");
    assert_eq!(body["sni"], "upstream.test");
    assert_eq!(body["client_certificate"], true);
    assert_eq!(body["alpn"], serde_json::Value::Null, "no ALPN offered");
    assert_eq!(seen.sessions().len(), 1);

    let wrong = proxy.listener_addr("wrong").await.unwrap();
    let before = seen.requests.load(Ordering::SeqCst);
    let (got, closed) = raw_exchange(
        wrong,
        b"GET /x HTTP/1.1\r\nhost: upstream.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        closed && got.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(seen.requests.load(Ordering::SeqCst), before);
    assert!(tls_errors(admin, "tcp_wrong_ca").await >= 1.0);
    assert_eq!(tls_errors(admin, "tcp_tls").await, 0.0);
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("TLS handshake with upstream failed"))
        .unwrap_or_else(|| panic!("no log line: {text}"));
    assert!(
        line.contains("WARN") && line.contains("cluster=tcp_wrong_ca"),
        "{line}"
    );
}

/// A leaf signed by `ca` whose only subject alternative names are `dns` and `uris`.
fn leaf_with_sans(ca: &Ca, dns: &[&str], uris: &[&str]) -> (String, String) {
    use rcgen::SanType;
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    for d in dns {
        p.subject_alt_names
            .push(SanType::DnsName((*d).try_into().unwrap()));
    }
    for u in uris {
        p.subject_alt_names
            .push(SanType::URI((*u).try_into().unwrap()));
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `verify_subject_alt_names` (Gateway API BackendTLSPolicy `subjectAltNames`): the upstream's
/// certificate must carry one of the names, of type hostname or URI, instead of the server name
/// sent; a certificate naming only the server name then fails.
#[tokio::test]
async fn verified_subject_alt_names_replace_the_server_name_check() {
    let ca = Ca::new("test ca");
    let spiffe = "spiffe://cluster.local/ns/shop/sa/api";
    let (by_dns, by_dns_key) = leaf_with_sans(&ca, &["api.internal"], &[]);
    let (by_uri, by_uri_key) = leaf_with_sans(&ca, &[], &[spiffe]);
    let (by_sni, by_sni_key) = leaf_with_sans(&ca, &["upstream.test"], &[]);
    let mut ups = Vec::new();
    for (chain, key) in [
        (&by_dns, &by_dns_key),
        (&by_uri, &by_uri_key),
        (&by_sni, &by_sni_key),
    ] {
        ups.push(
            tls_upstream(ServerOptions {
                chain,
                key,
                only_for: None,
                client_ca: None,
            })
            .await,
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let tls = |sans: serde_json::Value| {
        serde_json::json!({ "sni": "upstream.test", "ca_file": ca_file,
            "verify_subject_alt_names": sans })
    };
    let clusters = [
        tls_cluster(
            "dns",
            "http1",
            ups[0].0,
            tls(serde_json::json!([{ "hostname": "api.internal" }])),
        ),
        tls_cluster(
            "uri",
            "http1",
            ups[1].0,
            tls(serde_json::json!([{ "hostname": "other.internal" }, { "uri": spiffe }])),
        ),
        // The certificate names the server name sent, but none of the names asked for.
        tls_cluster(
            "sni_only",
            "http1",
            ups[2].0,
            tls(serde_json::json!([{ "hostname": "api.internal" }, { "uri": spiffe }])),
        ),
        tls_cluster(
            "wrong_uri",
            "http1",
            ups[1].0,
            tls(serde_json::json!([{ "uri": "spiffe://cluster.local/ns/shop/sa/web" }])),
        ),
    ]
    .concat();
    let (proxy, addr) = start_proxy(&config(
        &routes(&["dns", "uri", "sni_only", "wrong_uri"]),
        &clusters,
    ))
    .await;
    let (admin, _) = start_admin(&proxy).await;
    for cluster in ["dns", "uri"] {
        let (status, error, body) = get_json(addr, &format!("/{cluster}/x")).await;
        assert_eq!((status, error), (StatusCode::OK, None), "{cluster}: {body}");
        assert_eq!(
            body["sni"], "upstream.test",
            "{cluster}: the SNI is still sent"
        );
    }
    for cluster in ["sni_only", "wrong_uri"] {
        let (status, error, _) = get_json(addr, &format!("/{cluster}/x")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{cluster}");
        assert_eq!(error.as_deref(), Some("tls-handshake"), "{cluster}");
        assert!(tls_errors(admin, cluster).await >= 1.0, "{cluster}");
    }

    // Each entry is one kind, well formed.
    for (sans, want) in [
        (
            serde_json::json!([{ "hostname": "a.test", "uri": "spiffe://x/y" }]),
            "clusters[0].tls.verify_subject_alt_names[0]: give hostname or uri, not both",
        ),
        (
            serde_json::json!([{ "uri": "not a uri" }]),
            "clusters[0].tls.verify_subject_alt_names[0].uri: \"not a uri\" is not an absolute URI",
        ),
        (
            serde_json::json!([{ "hostname": "bad name!" }]),
            "clusters[0].tls.verify_subject_alt_names[0].hostname: \"bad name!\" is not a DNS name",
        ),
    ] {
        let yaml = format!(
            "clusters:\n{}",
            tls_cluster("c", "http1", ups[0].0, tls(sans.clone()))
        );
        let got = validate::from_yaml(&yaml).unwrap_err().to_string();
        assert!(got.contains(want), "{sans}: {got}");
    }
}
