//! TCP and TLS Gateway listeners through the real controller on a manifests directory and a
//! real gateway proxy it feeds: a `TLS` listener with `mode: Terminate` and a TCPRoute
//! terminates TLS (the certificate from a `kubernetes.io/tls` Secret) and forwards the
//! cleartext to a TCP echo upstream; a `mode: Passthrough` listener with two TLSRoutes sends
//! each ClientHello, untouched, to the TLS upstream of its server name. A route that binds to
//! no listener is shown in status. Certificates are generated here with rcgen.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use base64::Engine;
use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_proto::discovery::v1 as api;

fn certificate(name: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A port the kernel just handed out: a Gateway's port is fixed by its manifest.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP upstream echoing what it reads.
async fn echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A TLS upstream with a certificate for `name` that writes `name` after the handshake.
async fn tls_upstream(name: &'static str, chain: &str, key: &str) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(chain.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(name.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    port
}

/// A TLS client trusting only `chain_pem`'s self-signed leaf, sending `server_name`.
fn connector(chain_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A gateway proxy fed by the controller as Gateway shop/edge; returns the address of its
/// listener for `port` once it serves it, with the proxy (which serves while it is held).
async fn gateway(
    controller: &Controller,
    id: &str,
    port: u16,
) -> (Arc<trellis_proxy::Proxy>, SocketAddr) {
    let proxy = trellis_proxy::Proxy::new();
    let settings = trellis_proxy::config::xds::XdsSettings {
        address: controller.grpc.to_string(),
        node: api::Node {
            id: id.into(),
            role: api::Role::Gateway as i32,
            namespace: "shop".into(),
            gateway_name: "edge".into(),
            labels: [("trellis.io/bind-ip".to_owned(), "127.0.0.1".to_owned())].into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_static_tx, static_rx) = watch::channel(Arc::default());
    tokio::spawn(trellis_proxy::config::xds::Client::new(proxy.clone(), settings, static_rx).run());
    let name = format!("gateway/shop/edge:{port}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(addr) = proxy.listener_addr(&name).await {
            return (proxy, addr);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never served: {:?}",
            proxy.store().not_serving()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Service `name` on `port` with one endpoint 127.0.0.1:`port`.
fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  ports: [{{port: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{port: {port}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_tls_listener_forwards_a_tcp_route_to_an_echo_upstream() {
    let controller = Controller::start().await;
    let up = echo().await;
    let port = free_port();
    let (chain, key) = certificate("db.example.com");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    controller.write(
        "edge.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  listeners:
    - name: db
      port: {port}
      protocol: TLS
      tls: {{mode: Terminate, certificateRefs: [{{name: db-tls}}]}}
---
apiVersion: v1
kind: Secret
metadata: {{name: db-tls, namespace: shop}}
type: kubernetes.io/tls
data: {{tls.crt: {}, tls.key: {}}}
---
{}---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: db, namespace: shop}}
spec:
  parentRefs: [{{name: edge, sectionName: db}}]
  rules: [{{backendRefs: [{{name: echo, port: {up}}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: stray, namespace: shop}}
spec:
  parentRefs: [{{name: edge, sectionName: nope}}]
  rules: [{{backendRefs: [{{name: echo, port: {up}}}]}}]
",
            b64(&chain),
            b64(&key),
            service("echo", up)
        ),
    );
    let (_proxy, addr) = gateway(&controller, "gw-tcp", port).await;

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio::time::timeout(
        WAIT,
        connector(&chain).connect(ServerName::try_from("db.example.com").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("the gateway's certificate is the Secret's");
    tls.write_all(b"select 1;").await.unwrap();
    let mut got = [0u8; 9];
    tokio::time::timeout(WAIT, tls.read_exact(&mut got))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&got, b"select 1;");

    // The route bound to no listener is in status with the Gateway API reason.
    let report = controller
        .wait_status("the stray route reported", |r| {
            r.problems.iter().any(|d| d.name == "stray")
        })
        .await;
    let d = report.problems.iter().find(|d| d.name == "stray").unwrap();
    assert_eq!(
        (
            d.kind.as_str(),
            d.condition.as_str(),
            d.reason.as_str(),
            d.message.as_str()
        ),
        (
            "TCPRoute",
            "Accepted",
            "NoMatchingParent",
            "Gateway shop/edge has no listener named \"nope\""
        )
    );
    assert!(
        !report
            .problems
            .iter()
            .any(|d| d.name == "db" || d.name == "edge"),
        "{:#?}",
        report.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_listener_routes_two_hostnames_to_two_tls_upstreams() {
    let controller = Controller::start().await;
    let (chain_a, key_a) = certificate("a.example.com");
    let (chain_b, key_b) = certificate("b.example.com");
    let up_a = tls_upstream("a", &chain_a, &key_a).await;
    let up_b = tls_upstream("b", &chain_b, &key_b).await;
    let port = free_port();
    let route = |name: &str, host: &str, up: u16| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: {name}, namespace: shop}}
spec:
  parentRefs: [{{name: edge, port: {port}}}]
  hostnames: [{host}]
  rules: [{{backendRefs: [{{name: {name}, port: {up}}}]}}]
"
        )
    };
    controller.write(
        "edge.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  listeners:
    - {{name: pass, port: {port}, protocol: TLS, hostname: \"*.example.com\", tls: {{mode: Passthrough}}}}
---
{}---
{}---
{}---
{}",
            service("api-a", up_a),
            service("api-b", up_b),
            route("api-a", "a.example.com", up_a),
            route("api-b", "b.example.com", up_b),
        ),
    );
    let (_proxy, addr) = gateway(&controller, "gw-sni", port).await;

    for (name, chain, want) in [
        ("a.example.com", &chain_a, "a"),
        ("b.example.com", &chain_b, "b"),
    ] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        // The client trusts only that upstream's own certificate: the TLS is end to end.
        let mut tls = tokio::time::timeout(
            WAIT,
            connector(chain).connect(ServerName::try_from(name).unwrap(), tcp),
        )
        .await
        .expect("handshake in time")
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut got = String::new();
        tokio::time::timeout(WAIT, tls.read_to_string(&mut got))
            .await
            .expect("the answer in time")
            .unwrap();
        assert_eq!(got, want, "{name}");
    }

    // A server name no route has: the gateway closes the connection.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = tokio::time::timeout(
        WAIT,
        connector(&chain_a).connect(ServerName::try_from("c.example.com").unwrap(), tcp),
    )
    .await
    .expect("an answer in time");
    assert!(refused.is_err(), "an unknown server name was forwarded");
}

/// A client CA named by the Gateway's `spec.tls.frontend`: the real gateway asks for client
/// certificates and lets in only a client whose certificate that CA signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_validation_from_the_gateway_requires_a_client_certificate() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let controller = Controller::start().await;
    let up = echo().await;
    let port = free_port();
    let (chain, key) = certificate("db.example.com");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().unwrap();
    let client_cert = leaf.signed_by(&client_key, &ca).unwrap();
    let indented: String = ca.pem().lines().map(|l| format!("    {l}\n")).collect();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    controller.write(
        "edge.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  tls:
    frontend:
      default:
        validation: {{caCertificateRefs: [{{kind: ConfigMap, name: clients}}]}}
  listeners:
    - name: db
      port: {port}
      protocol: TLS
      tls: {{mode: Terminate, certificateRefs: [{{name: db-tls}}]}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: clients, namespace: shop}}
data:
  ca.crt: |
{indented}---
apiVersion: v1
kind: Secret
metadata: {{name: db-tls, namespace: shop}}
type: kubernetes.io/tls
data: {{tls.crt: {}, tls.key: {}}}
---
{}---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: db, namespace: shop}}
spec:
  parentRefs: [{{name: edge}}]
  rules: [{{backendRefs: [{{name: echo, port: {up}}}]}}]
",
            b64(&chain),
            b64(&key),
            service("echo", up)
        ),
    );
    let (_proxy, addr) = gateway(&controller, "gw-mtls", port).await;

    let client = |with_certificate: bool| {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(chain.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = if with_certificate {
            builder
                .with_client_auth_cert(
                    vec![client_cert.der().clone()],
                    PrivateKeyDer::from_pem_slice(client_key.serialize_pem().as_bytes()).unwrap(),
                )
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        TlsConnector::from(Arc::new(config))
    };
    // One echo exchange; TLS 1.3 reports a refused client only on the first read.
    let exchange = |with_certificate: bool| async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = tokio::time::timeout(
            WAIT,
            client(with_certificate).connect(ServerName::try_from("db.example.com").unwrap(), tcp),
        )
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut got = [0u8; 4];
        tokio::time::timeout(WAIT, tls.read_exact(&mut got))
            .await
            .map_err(|_| "no echo in time".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(got)
    };
    assert_eq!(exchange(true).await, Ok(*b"ping"));
    let refused = exchange(false).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through: {refused:?}"
    );
}
