//! TLS through the real controller on a manifests directory: an HTTPS Gateway listener with a
//! `kubernetes.io/tls` Secret gives its gateway proxy a TLS listener and the Secret resource,
//! the Secret before the listener, and no other proxy the Secret; rewriting the Secret file sends
//! a new version of it alone; a bad Secret is reported in status without its key; and a real
//! gateway proxy fed by the controller serves HTTPS with the Secret's certificate, then with a
//! rotated one. Certificates are generated here with rcgen.

mod common;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsConnector;
use trellis_proto::discovery::v1::{self as api, resource::Kind};

const HTTPS_LISTENER: &str = "gateway/shop/ingress:8443";

/// The fixture Gateway with an HTTPS listener on 8443 for `*.example.com`.
const GATEWAY: &str = "    - {name: web, port: 8080, protocol: HTTP, hostname: \"*.example.com\"}";
const WITH_HTTPS: &str =
    "    - {name: web, port: 8080, protocol: HTTP, hostname: \"*.example.com\"}
    - name: https
      port: 8443
      protocol: HTTPS
      hostname: \"*.example.com\"
      tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: shop-tls}]}";

fn certificate() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn secret_yaml(chain: &str, key: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-tls, namespace: shop}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(chain),
        b64(key)
    )
}

fn held_secret(proxy: &Proxy) -> Option<api::Secret> {
    match proxy.resource(SECRETS, "shop/shop-tls") {
        Some(Kind::Secret(s)) => Some(s.clone()),
        None => None,
        other => panic!("{other:?}"),
    }
}

fn listener_tls(proxy: &Proxy) -> Option<api::ListenerTls> {
    match proxy.resource(LISTENER, HTTPS_LISTENER)? {
        Kind::Listener(api::Listener {
            kind: Some(api::listener::Kind::Http(h)),
            ..
        }) => h.tls.clone(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_https_gateway_gets_its_secret_first_and_alone_and_rotations_follow_the_file() {
    let controller = Controller::start().await;
    let (chain, key) = certificate();
    controller.write("tls.yaml", &secret_yaml(&chain, &key));
    controller.edit("gateway.yaml", GATEWAY, WITH_HTTPS);

    let mut gateway = Proxy::connect(&controller, Proxy::gateway_node("gw-tls")).await;
    gateway.subscribe_all().await;
    // The edits reach the catalog in their own time: follow until the listener arrives.
    let mut log = gateway.settle(&controller, true).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.resource(LISTENER, HTTPS_LISTENER).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no HTTPS listener: {log:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        log.extend(gateway.settle(&controller, false).await);
    }
    let secret = held_secret(&gateway).expect("the gateway holds the Secret");
    assert_eq!(
        (
            secret.certificate_chain.as_str(),
            secret.private_key.as_str()
        ),
        (chain.as_str(), key.as_str())
    );
    let tls = listener_tls(&gateway).expect("the HTTPS listener terminates TLS");
    assert_eq!(
        tls.certificates,
        [api::ServerCertificate {
            server_names: vec!["*.example.com".into()],
            secret: "shop/shop-tls".into(),
        }]
    );
    // The routes bound to the Gateway serve on the HTTPS port too.
    assert!(
        gateway.resource(ROUTES, HTTPS_LISTENER).is_some(),
        "{log:?}"
    );
    let position = |t: &str, name: &str| {
        log.iter()
            .position(|(ty, names, _)| *ty == t && names.iter().any(|n| n == name))
            .unwrap_or_else(|| panic!("no {t} {name} in {log:?}"))
    };
    assert!(
        position(SECRETS, "shop/shop-tls") < position(LISTENER, HTTPS_LISTENER),
        "the listener came before its secret: {log:?}"
    );

    // A sidecar in the same namespace never gets the Secret.
    let mut sidecar = Proxy::connect(&controller, Proxy::sidecar_node("pod-tls")).await;
    sidecar.subscribe_all().await;
    sidecar.settle(&controller, true).await;
    assert!(
        sidecar.held.get(SECRETS).is_none_or(|m| m.is_empty()),
        "{:?}",
        sidecar
            .held
            .get(SECRETS)
            .map(|m| m.keys().collect::<Vec<_>>())
    );

    // Rotation: a new certificate in the file is a new version of the Secret, and nothing else.
    let before = gateway
        .version(SECRETS, "shop/shop-tls")
        .unwrap()
        .to_owned();
    let listener_before = gateway
        .version(LISTENER, HTTPS_LISTENER)
        .unwrap()
        .to_owned();
    let (chain2, key2) = certificate();
    controller.write("tls.yaml", &secret_yaml(&chain2, &key2));
    let log = gateway.settle(&controller, true).await;
    assert_eq!(log, [seen(SECRETS, &["shop/shop-tls"], &[])]);
    assert_ne!(gateway.version(SECRETS, "shop/shop-tls").unwrap(), before);
    assert_eq!(held_secret(&gateway).unwrap().certificate_chain, chain2);
    assert_eq!(
        gateway.version(LISTENER, HTTPS_LISTENER).unwrap(),
        listener_before
    );

    // A key of another certificate: still sent (a proxy refuses it by name and keeps serving
    // the version it holds), and reported with the Gateway API reason, without the key.
    let (_, wrong_key) = certificate();
    controller.write("tls.yaml", &secret_yaml(&chain2, &wrong_key));
    let report = controller
        .wait_status("the bad Secret reported", |r| !r.problems.is_empty())
        .await;
    let d = &report.problems[0];
    assert_eq!(
        (
            d.kind.as_str(),
            d.section.as_deref(),
            d.condition.as_str(),
            d.reason.as_str(),
            d.message.as_str()
        ),
        (
            "Gateway",
            Some("listeners[https].tls.certificateRefs[0]"),
            "ResolvedRefs",
            "InvalidCertificateRef",
            "Secret shop/shop-tls: tls.key does not match the certificate in tls.crt"
        )
    );
    gateway.nack_next = Some((
        SECRETS,
        r#"secret "shop/shop-tls": private_key: the private key does not match the certificate's public key"#
            .into(),
    ));
    gateway.settle(&controller, true).await;
    let report = controller.status().await;
    let proxy = report
        .proxies
        .iter()
        .find(|p| p.node_id == "gw-tls")
        .unwrap();
    assert!(
        proxy.types["secrets"].refused.contains_key("shop/shop-tls"),
        "{proxy:#?}"
    );
    let shown = serde_json::to_string(&report).unwrap();
    for k in [&key, &key2, &wrong_key] {
        for line in k.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "key material in /status");
        }
    }

    // A missing Secret: the HTTPS listener goes (the gateway cannot serve it), with the reason.
    std::fs::remove_file(controller.path("tls.yaml")).unwrap();
    let report = controller
        .wait_status("the missing Secret reported", |r| {
            r.problems
                .iter()
                .any(|d| d.message == "Secret shop/shop-tls does not exist")
        })
        .await;
    assert_eq!(report.problems[0].reason, "InvalidCertificateRef");
    gateway.settle(&controller, true).await;
    assert!(gateway.resource(LISTENER, HTTPS_LISTENER).is_none());
    assert!(held_secret(&gateway).is_none());
}

/// An HTTP upstream answering `x-upstream: tls-web`.
async fn upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    let mut r = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                    r.headers_mut()
                        .insert("x-upstream", http::HeaderValue::from_static("tls-web"));
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

/// HTTPS GET / for shop.example.com, trusting only `chain_pem`'s (self-signed) leaf: the
/// upstream's name, or why it failed.
async fn https_get(addr: SocketAddr, chain_pem: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("shop.example.com").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "shop.example.com")
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

/// Polls (bounded) until `https_get` trusting `chain_pem` reaches the upstream.
async fn eventually_https(addr: SocketAddr, chain_pem: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = https_get(addr, chain_pem).await;
        if last.as_deref() == Ok("tls-web") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served with that certificate: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_gateway_serves_https_from_the_manifests_and_follows_a_rotation() {
    let controller = Controller::start().await;
    let up = upstream().await;
    // The Gateway's port is fixed by its manifest: take one the kernel just handed out.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (chain, key) = certificate();
    controller.write("tls.yaml", &secret_yaml(&chain, &key));
    controller.write(
        "gateway.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  listeners:
    - name: https
      port: {port}
      protocol: HTTPS
      hostname: shop.example.com
      tls: {{certificateRefs: [{{name: shop-tls}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: tls-web, namespace: shop}}
spec:
  clusterIP: 10.96.9.9
  ports: [{{name: http, port: 80, targetPort: {up}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: tls-web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: tls-web}}
addressType: IPv4
ports: [{{name: http, port: {up}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: secure, namespace: shop}}
spec:
  parentRefs: [{{name: ingress, sectionName: https}}]
  rules: [{{backendRefs: [{{name: tls-web, port: 80}}]}}]
"
        ),
    );

    let proxy = trellis_proxy::Proxy::new();
    let settings = trellis_proxy::config::xds::XdsSettings {
        address: controller.grpc.to_string(),
        node: api::Node {
            id: "gw-https".into(),
            role: api::Role::Gateway as i32,
            namespace: "shop".into(),
            gateway_name: "ingress".into(),
            labels: [("trellis.io/bind-ip".to_owned(), "127.0.0.1".to_owned())].into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_static_tx, static_rx) = watch::channel(Arc::default());
    tokio::spawn(trellis_proxy::config::xds::Client::new(proxy.clone(), settings, static_rx).run());
    let name = format!("gateway/shop/ingress:{port}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let addr = loop {
        if let Some(addr) = proxy.listener_addr(&name).await {
            break addr;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never served: {:?}",
            proxy.store().not_serving()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eventually_https(addr, &chain).await;

    // cert-manager renews: the file is rewritten, new handshakes get the new certificate.
    let (chain2, key2) = certificate();
    controller.write("tls.yaml", &secret_yaml(&chain2, &key2));
    eventually_https(addr, &chain2).await;
    assert!(
        https_get(addr, &chain).await.is_err(),
        "a new handshake still got the old certificate"
    );

    // A bad rotation is refused by the proxy, which keeps serving the certificate it holds; the
    // controller shows the refusal.
    let (_, wrong_key) = certificate();
    controller.write("tls.yaml", &secret_yaml(&chain, &wrong_key));
    controller
        .wait_status("the proxy's refusal", |r| {
            r.proxies.iter().any(|p| {
                p.node_id == "gw-https"
                    && p.types
                        .get("secrets")
                        .is_some_and(|t| t.refused.contains_key("shop/shop-tls"))
            })
        })
        .await;
    assert_eq!(https_get(addr, &chain2).await.as_deref(), Ok("tls-web"));
}
