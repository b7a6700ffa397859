//! Mesh identity end to end on the real kernel: a "node" network namespace and three "pod"
//! namespaces (A, B, C) joined by veth pairs (10.200.0.0/24, inside those namespaces only), the
//! capture rules of `trellis-proxy iptables` in each pod, a sidecar `trellis-proxy` as UID 1337 in
//! each that obtains its SPIFFE certificate from the real `trellis-control` in the node namespace
//! (a CA in `--ca-dir`, per-account tokens in `--identity-tokens`, the discovery and identity
//! channel over TLS because the controller is reached on a namespace address, not loopback).
//!
//! Checked: A→B is mTLS (B's inbound handshake counter grows by one per new connection) and B's
//! application sees A's SPIFFE ID in `x-trellis-client-identity`, which nobody can spoof;
//! permissive takes plaintext; strict refuses plaintext (from the node, from A's UID 1337, from
//! A's sidecar towards an endpoint not marked meshed) and every mesh handshake whose client
//! certificate is missing, from another CA, expired or of another trust domain, while a valid one
//! made by the same CA passes; an AuthorizationPolicy allowing only A on `GET /public` lets A
//! through and denies C and A's `POST` with 403 `x-trellis-error: forbidden`.
//!
//! Figures (`FIGURE` lines on stderr; run with `--nocapture`): added latency p50/p99 and sidecar
//! CPU per request of mTLS vs plaintext between the same two sidecars in the same run, and new
//! mTLS vs plaintext connections per second.
//!
//! Needs root (CI runs as root), iproute2, iptables, util-linux's setpriv and curl; skipped with
//! the reason printed otherwise. Clients and applications inside the namespaces are this test
//! binary run again with `TRELLIS_MESH_HELPER` saying what to be.

#[path = "common/netns.rs"]
mod netns;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use netns::{
    Lab, PROXY_UID, Pod, connect, connection_rate, control_binary, copy_back, cpu_seconds, latency,
    read_response, skip_reason, sum,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};

const PROXY: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const TEST_NAME: &str = "mesh_identity_in_network_namespaces";
const HELPER_ENV: &str = "TRELLIS_MESH_HELPER";
const CERTS_ENV: &str = "TRELLIS_MESH_CERTS";

const NODE_A: &str = "10.200.0.1";
const POD_A: &str = "10.200.0.2";
const NODE_B: &str = "10.200.0.5";
const POD_B: &str = "10.200.0.6";
const NODE_C: &str = "10.200.0.9";
const POD_C: &str = "10.200.0.10";
/// Service b: its endpoint is pod B, a meshed Pod. Service b-plain: the same pod, but its
/// EndpointSlice names no Pod, so sidecars reach it in plaintext (the comparison path).
const MESHED_IP: &str = "10.96.0.10";
const PLAIN_IP: &str = "10.96.0.11";
const HTTP: u16 = 8080;
const ECHO: u16 = 7000;
/// An HTTP port of pod B's application that no Service names (a debug or metrics port).
const UNNAMED: u16 = 9090;
const CONTROL_PORT: u16 = 18000;
/// The name in the controller's serving certificate besides the node addresses.
const CONTROL_NAME: &str = "control.trellis.test";
const APP_UID: &str = "1000";
const NAMESPACE: &str = "demo";
const ID_A: &str = "spiffe://cluster.local/ns/demo/sa/a";
const ID_C: &str = "spiffe://cluster.local/ns/demo/sa/c";
/// An identity no sidecar has: the test's own valid client certificate names it.
const ID_TESTER: &str = "spiffe://cluster.local/ns/demo/sa/tester";
const HANDSHAKES_OK: [&str; 3] = [
    "trellis_mesh_tls_handshakes_total",
    "direction=\"inbound\"",
    "result=\"ok\"",
];
/// B's sidecar denies with `x-trellis-error: forbidden`; the caller's sidecar relays it renamed,
/// as it does every upstream's own `x-trellis-error`.
const FORBIDDEN: &str = "x-trellis-upstream-error: forbidden";
/// Requests and connections measured on each path.
const SAMPLES: usize = 1000;
const CONNECTIONS: usize = 300;
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn mesh_identity_in_network_namespaces() {
    if let Ok(role) = std::env::var(HELPER_ENV) {
        helper(&role);
        return;
    }
    let tools = ["ip", "setpriv", "curl", "iptables-legacy", "iptables-nft"];
    if let Some(reason) = skip_reason(&tools) {
        eprintln!("skipped: {TEST_NAME} {reason}");
        return;
    }
    let mut lab = Lab::new("trm", 3, (TEST_NAME, HELPER_ENV));
    let (pa, pb, pc) = (
        lab.pods[0].clone(),
        lab.pods[1].clone(),
        lab.pods[2].clone(),
    );
    // The manifests and the controller's certificate name these addresses.
    assert_eq!(
        [
            &pa.ip,
            &pa.gateway,
            &pb.ip,
            &pb.gateway,
            &pc.ip,
            &pc.gateway
        ],
        [POD_A, NODE_A, POD_B, NODE_B, POD_C, NODE_C]
    );
    let (pod_a, pod_b, pod_c, node) = (
        pa.ns.clone(),
        pb.ns.clone(),
        pc.ns.clone(),
        lab.node.clone(),
    );
    let dir = lab.dir.path().to_owned();
    // The sidecars run as UID 1337 and read their token and the channel's CA from here.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The channel's own CA and the controller's serving certificate: the node addresses (the
    // proxies' default server name is the host they dial) and a DNS name for --xds-server-name.
    let channel = Pki::ca("trellis channel test CA");
    let (control_cert, control_key) = channel.leaf(
        vec![
            SanType::DnsName(CONTROL_NAME.try_into().unwrap()),
            SanType::IpAddress(NODE_A.parse().unwrap()),
            SanType::IpAddress(NODE_B.parse().unwrap()),
            SanType::IpAddress(NODE_C.parse().unwrap()),
        ],
        Validity::Current,
    );
    let xds_ca = write(&dir, "xds-ca.pem", channel.cert_pem.as_bytes(), 0o644);
    let tls_cert = write(&dir, "control.pem", control_cert.as_bytes(), 0o600);
    let tls_key = write(&dir, "control-key.pem", control_key.as_bytes(), 0o600);

    // Tokens: the controller's directory, and each sidecar's copy readable by it alone.
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(tokens.join(NAMESPACE)).unwrap();
    for sa in ["a", "b", "c"] {
        let token = format!("token-{sa}-{}", std::process::id());
        write(&tokens.join(NAMESPACE), sa, token.as_bytes(), 0o600);
        let own = write(&dir, &format!("{sa}.token"), token.as_bytes(), 0o600);
        std::os::unix::fs::chown(&own, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }

    let manifests = dir.join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("services.yaml"), SERVICES).unwrap();
    std::fs::write(manifests.join("pods.yaml"), pods(None)).unwrap();
    let ca_dir = dir.join("ca");
    let control = control_binary(PROXY);
    lab.spawn(
        "controller",
        &node,
        None,
        &[
            control.to_str().unwrap(),
            "serve",
            "--manifests",
            manifests.to_str().unwrap(),
            "--listen",
            &format!("0.0.0.0:{CONTROL_PORT}"),
            "--admin",
            "127.0.0.1:18001",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--identity-tokens",
            tokens.to_str().unwrap(),
            "--tls-cert",
            tls_cert.to_str().unwrap(),
            "--tls-key",
            tls_key.to_str().unwrap(),
        ],
        &[],
    );

    // The init containers' work, with both iptables backends.
    for (pod, backend) in [(&pod_a, "legacy"), (&pod_b, "nft"), (&pod_c, "nft")] {
        lab.run_ok(pod, &[PROXY, "iptables", "--backend", backend]);
    }

    // Pod B's application: tells who called it, as the sidecar said.
    lab.spawn_helper("app-b", &pod_b, Some(APP_UID), "app pod-b");

    let xds_ca = xds_ca.to_str().unwrap().to_owned();
    let sidecar_a = sidecar(&mut lab, &pa, "a", &xds_ca, &[]);
    let sidecar_b = sidecar(&mut lab, &pb, "b", &xds_ca, &[]);
    // C names the controller by its DNS name instead of the address it dials.
    sidecar(
        &mut lab,
        &pc,
        "c",
        &xds_ca,
        &["--xds-server-name", CONTROL_NAME],
    );

    // ---- A → B over mTLS, permissive B ----
    let whoami = format!("http://{MESHED_IP}/whoami");
    let body = poll_curl(&mut lab, &pa, &whoami, &[]);
    assert_eq!(
        body,
        format!("pod-b GET /whoami identity={ID_A}\n"),
        "B's application sees A's identity"
    );
    let ok_b = sum(&lab.metrics(&pod_b), &HANDSHAKES_OK);
    assert!(ok_b >= 1.0, "B counted no inbound mesh handshake");
    let outbound_a = sum(
        &lab.metrics(&pod_a),
        &[
            "trellis_mesh_tls_handshakes_total",
            "direction=\"outbound\"",
            "result=\"ok\"",
        ],
    );
    assert!(outbound_a >= 1.0, "A counted no outbound mesh handshake");

    // The header cannot be spoofed: replaced on the mesh hop, removed on a plaintext one.
    let spoof = [
        "-H",
        "x-trellis-client-identity: spiffe://cluster.local/ns/demo/sa/admin",
    ];
    let body = lab.curl(&pod_a, APP_UID, &whoami, &spoof);
    assert_eq!(body, format!("200 pod-b GET /whoami identity={ID_A}\n"));
    let plain_whoami = format!("http://{PLAIN_IP}/whoami");
    let body = poll_curl(&mut lab, &pa, &plain_whoami, &spoof);
    assert_eq!(
        body, "pod-b GET /whoami identity=-\n",
        "a plaintext hop carries no identity, whatever the caller wrote"
    );
    // Permissive takes plaintext straight to the pod too: from the node and from A's UID 1337
    // (which A's own capture leaves alone).
    let direct = format!("get {POD_B}:{HTTP}");
    assert_eq!(
        lab.helper(&node, None, &direct, &[]),
        "200 pod-b GET /whoami identity=-"
    );
    assert_eq!(
        lab.helper(&pod_a, Some("1337"), &direct, &[]),
        "200 pod-b GET /whoami identity=-"
    );

    // Each new opaque TCP connection A → B is its own mTLS handshake; the plain path adds none.
    let before = sum(&lab.metrics(&pod_b), &HANDSHAKES_OK);
    let n = 20;
    let meshed = lab.helper(
        &pod_a,
        Some(APP_UID),
        &format!("connect {MESHED_IP}:{ECHO} {n}"),
        &[],
    );
    assert!(meshed.starts_with("ok"), "{meshed}");
    let after_meshed = sum(&lab.metrics(&pod_b), &HANDSHAKES_OK);
    assert!(
        after_meshed - before >= n as f64,
        "{n} meshed connections, {} handshakes on B",
        after_meshed - before
    );
    let plain = lab.helper(
        &pod_a,
        Some(APP_UID),
        &format!("connect {PLAIN_IP}:{ECHO} {n}"),
        &[],
    );
    assert!(plain.starts_with("ok"), "{plain}");
    assert_eq!(
        sum(&lab.metrics(&pod_b), &HANDSHAKES_OK),
        after_meshed,
        "the plaintext path did mesh handshakes"
    );

    // ---- Figures: the same two sidecars, mTLS vs plaintext, in the same run ----
    for (what, role) in [
        ("http keep-alive", "http"),
        ("new tcp connections", "connect"),
    ] {
        let count = if role == "http" { SAMPLES } else { CONNECTIONS };
        let mut line = Vec::new();
        for (path, ip) in [("mtls", MESHED_IP), ("plaintext", PLAIN_IP)] {
            let port = if role == "http" { 80 } else { ECHO };
            let cpu_before = cpu_seconds(sidecar_a) + cpu_seconds(sidecar_b);
            let result = lab.helper(
                &pod_a,
                Some(APP_UID),
                &format!("{role} {ip}:{port} {count}"),
                &[],
            );
            let cpu = cpu_seconds(sidecar_a) + cpu_seconds(sidecar_b) - cpu_before;
            assert!(result.starts_with("ok"), "{what} {path}: {result}");
            let per = cpu * 1e6 / count as f64;
            line.push(format!(
                "{path}: {} sidecar-cpu={per:.0}us/op",
                &result[3..]
            ));
        }
        eprintln!(
            "FIGURE {what}, {count} sequential, A→B through both sidecars: {}",
            line.join("; ")
        );
    }

    // ---- Strict B ----
    lab.stop("sidecar-b");
    std::fs::write(manifests.join("pods.yaml"), pods(Some("strict"))).unwrap();
    sidecar(
        &mut lab,
        &pb,
        "b",
        &xds_ca,
        &["--label", "trellis.io/mtls=strict"],
    );
    // Once B's sidecar serves again (the mesh path works), plaintext is refused everywhere.
    let body = poll_curl(&mut lab, &pa, &whoami, &[]);
    assert_eq!(body, format!("pod-b GET /whoami identity={ID_A}\n"));
    for (who, ns, uid) in [
        ("the node", &node, None),
        ("A's UID 1337", &pod_a, Some("1337")),
    ] {
        let got = lab.helper(ns, uid, &direct, &[]);
        assert!(
            got.starts_with("refused"),
            "strict B took plaintext from {who}: {got}"
        );
    }
    let got = lab.curl(&pod_a, APP_UID, &plain_whoami, &[]);
    assert!(
        !got.starts_with("200"),
        "strict B took plaintext from A's sidecar (endpoint not meshed): {got}"
    );

    // Mesh handshakes straight to pod B, client certificates made here: only the valid one passes.
    let mesh_ca = MeshCa::read(&ca_dir);
    let certs = dir.join("certs");
    std::fs::create_dir(&certs).unwrap();
    let stranger = Pki::ca("another mesh CA");
    for (kind, pki, id, validity) in [
        ("valid", &mesh_ca.pki, ID_TESTER, Validity::Current),
        ("other-ca", &stranger, ID_A, Validity::Current),
        ("expired", &mesh_ca.pki, ID_A, Validity::Expired),
        (
            "wrong-id",
            &mesh_ca.pki,
            "spiffe://elsewhere.test/ns/demo/sa/a",
            Validity::Current,
        ),
    ] {
        let (cert, key) = pki.leaf_der(id, validity);
        write(&certs, &format!("{kind}.der"), &cert, 0o600);
        write(&certs, &format!("{kind}-key.der"), &key, 0o600);
    }
    let certs_env = certs.to_str().unwrap().to_owned();
    let tls_to = |lab: &Lab, port: u16, kind: &str| {
        lab.helper(
            &node,
            None,
            &format!("tls {POD_B}:{port} {kind}"),
            &[(CERTS_ENV, &certs_env)],
        )
    };
    let tls = |lab: &Lab, kind: &str| tls_to(lab, HTTP, kind);
    assert_eq!(
        tls(&lab, "valid"),
        format!("200 pod-b GET /whoami identity={ID_TESTER}"),
        "a certificate of the mesh CA passes (the control for the refusals below)"
    );
    for kind in ["none", "other-ca", "expired", "wrong-id"] {
        let got = tls(&lab, kind);
        assert!(
            got.starts_with("refused"),
            "strict B accepted a mesh handshake with client certificate {kind}: {got}"
        );
    }
    // A caller's ALPN does not decide whether its headers are checked: on a port declared HTTP,
    // mesh TCP is served as HTTP and the forged identity is replaced by the verified one.
    let opaque = lab.helper(
        &node,
        None,
        &format!("tls-opaque {POD_B}:{HTTP} valid"),
        &[(CERTS_ENV, &certs_env)],
    );
    assert_eq!(
        opaque,
        format!("200 pod-b GET /whoami identity={ID_TESTER}"),
        "mesh TCP to an HTTP port passed a forged identity"
    );
    // A port no Service names: mesh mTLS is terminated there too (strict B takes it), and the
    // application gets plaintext.
    assert_eq!(
        tls_to(&lab, UNNAMED, "valid"),
        "200 pod-b GET /whoami identity=-",
        "mesh mTLS to a port no Service names"
    );
    let failed = sum(
        &lab.metrics(&pod_b),
        &["trellis_mesh_tls_handshakes_total", "direction=\"inbound\""],
    ) - sum(&lab.metrics(&pod_b), &HANDSHAKES_OK);
    assert!(
        failed >= 4.0,
        "B counted {failed} failed inbound handshakes"
    );

    // ---- Authorization: only A, only GET /public ----
    std::fs::write(manifests.join("policy.yaml"), POLICY).unwrap();
    let public = format!("http://{MESHED_IP}/public/page");
    // C is let through until the policy reaches B; then it is denied.
    let deadline = Instant::now() + WAIT;
    loop {
        let got = lab.curl(&pod_c, APP_UID, &public, &[]);
        if got.starts_with("403") {
            assert!(got.contains(FORBIDDEN), "{got}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C's GET /public was never denied; last: {got}"
        );
        assert_eq!(
            got,
            format!("200 pod-b GET /public/page identity={ID_C}\n"),
            "C before the policy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = lab.curl(&pod_a, APP_UID, &public, &[]);
    assert_eq!(got, format!("200 pod-b GET /public/page identity={ID_A}\n"));
    for (what, args, url) in [
        ("A's POST /public", vec!["-X", "POST"], public.clone()),
        ("A's GET of another path", vec![], whoami.clone()),
    ] {
        let got = lab.curl(&pod_a, APP_UID, &url, &args);
        assert!(
            got.starts_with("403") && got.contains(FORBIDDEN),
            "{what}: {got}"
        );
    }
    let metrics = lab.metrics(&pod_b);
    let decisions = |d: &str| {
        sum(
            &metrics,
            &[
                "trellis_authz_decisions_total",
                "only-a-reads-public",
                &format!("decision=\"{d}\""),
            ],
        )
    };
    assert!(decisions("allow") >= 1.0, "no allow counted:\n{metrics}");
    let denied = sum(
        &metrics,
        &["trellis_authz_decisions_total", "decision=\"deny\""],
    );
    assert!(denied >= 3.0, "{denied} denials counted:\n{metrics}");
    // Policies hold on a port no Service names too: the ALLOW policy's rule is an HTTP rule,
    // which never matches the bytes passed through there, so the default is deny.
    let got = tls_to(&lab, UNNAMED, "valid");
    assert!(
        got.starts_with("refused"),
        "a port no Service names escaped the policy: {got}"
    );
}

const SERVICES: &str = "
kind: Service
metadata: {name: b, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: b}
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: echo, port: 7000}
---
kind: EndpointSlice
metadata:
  name: b-1
  namespace: demo
  labels: {kubernetes.io/service-name: b}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: echo, port: 7000}]
endpoints:
  - addresses: [10.200.0.6]
    targetRef: {kind: Pod, name: b, namespace: demo}
---
kind: Service
metadata: {name: b-plain, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: echo, port: 7000}
---
kind: EndpointSlice
metadata:
  name: b-plain-1
  namespace: demo
  labels: {kubernetes.io/service-name: b-plain}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: echo, port: 7000}]
endpoints:
  - addresses: [10.200.0.6]
";

/// The three Pods with sidecars; pod B with `trellis.io/mtls: <mode>` when given.
fn pods(b_mode: Option<&str>) -> String {
    let mut out = String::new();
    for name in ["a", "b", "c"] {
        let mtls = match (name, b_mode) {
            ("b", Some(mode)) => format!(", trellis.io/mtls: {mode}"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "---
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {{app: {name}, trellis.io/sidecar: \"true\"{mtls}}}
spec:
  serviceAccountName: {name}
"
        ));
    }
    out
}

const POLICY: &str = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-a-reads-public, namespace: demo}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
    - name: a-may-get-public
      from: {identities: [\"spiffe://cluster.local/ns/demo/sa/a\"]}
      to: {methods: [GET], paths: [{prefix: /public}]}
";

fn write(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[derive(Clone, Copy)]
enum Validity {
    Current,
    Expired,
}

/// A CA made here with rcgen, for the channel's certificate and the refused client certificates.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Pki {
    fn ca(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        }
    }

    /// A leaf for `sans`: certificate and key in PEM.
    fn leaf(&self, sans: Vec<SanType>, validity: Validity) -> (String, String) {
        let (cert, key) = self.sign(sans, validity);
        (cert.pem(), key.serialize_pem())
    }

    /// A mesh client certificate naming `spiffe_id`: certificate and PKCS#8 key in DER.
    fn leaf_der(&self, spiffe_id: &str, validity: Validity) -> (Vec<u8>, Vec<u8>) {
        let (cert, key) = self.sign(vec![SanType::URI(spiffe_id.try_into().unwrap())], validity);
        (cert.der().to_vec(), key.serialize_der())
    }

    fn sign(&self, sans: Vec<SanType>, validity: Validity) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (date_time_ymd(2020, 1, 1), date_time_ymd(4000, 1, 1)),
            Validity::Expired => (date_time_ymd(2020, 1, 1), date_time_ymd(2020, 1, 2)),
        };
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert, key)
    }
}

/// The controller's mesh CA, read from its `--ca-dir` once it has written it.
struct MeshCa {
    pki: Pki,
}

impl MeshCa {
    fn read(dir: &Path) -> MeshCa {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let deadline = Instant::now() + WAIT;
        while !(cert.exists() && key.exists()) {
            assert!(
                Instant::now() < deadline,
                "the controller never wrote its CA to {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let cert_pem = std::fs::read_to_string(cert).unwrap();
        let key = KeyPair::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).unwrap();
        MeshCa {
            pki: Pki { issuer, cert_pem },
        }
    }
}

/// The sidecar of the pod running as service account `sa` (also its app label) as UID 1337, with
/// its identity token, fed over TLS by the controller on the pod's gateway.
fn sidecar(lab: &mut Lab, pod: &Pod, sa: &str, xds_ca: &str, extra: &[&str]) -> u32 {
    let xds = format!("{}:{CONTROL_PORT}", pod.gateway);
    let app_label = format!("app={sa}");
    let node_id = format!("pod-{sa}");
    let token = lab.dir.path().join(format!("{sa}.token"));
    let token = token.to_str().unwrap().to_owned();
    let mut argv = vec![
        PROXY,
        "--xds",
        &xds,
        "--xds-ca-file",
        xds_ca,
        "--role",
        "sidecar",
        "--namespace",
        NAMESPACE,
        "--service-account",
        sa,
        "--identity-token-file",
        &token,
        "--node-id",
        &node_id,
        "--label",
        &app_label,
        "--label",
        "trellis.io/sidecar=true",
        "--workers",
        "1",
    ];
    argv.extend(extra);
    let uid = PROXY_UID.to_string();
    lab.spawn(&format!("sidecar-{sa}"), &pod.ns, Some(&uid), &argv, &[])
}

/// curl from the application of `pod` until it answers 200 (bounded); returns the body.
fn poll_curl(lab: &mut Lab, pod: &Pod, url: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        lab.all_running();
        let got = lab.curl(&pod.ns, APP_UID, url, args);
        if let Some(body) = got.strip_prefix("200 ") {
            return body.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "curl {url} from {} never answered 200; last: {got}",
            pod.ns
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- the helper: what this binary does inside a namespace ----

fn helper(role: &str) {
    let words: Vec<&str> = role.split_whitespace().collect();
    let result = match words[..] {
        ["app", name] => app(name),
        ["http", addr, n] => latency(n, |s| http_get(s, addr), addr),
        ["connect", addr, n] => connection_rate(addr, n),
        ["get", addr] => plain_get(addr),
        ["tls", addr, kind] => mesh_get(addr, kind, b"trellis-mesh/1+http/1.1", WHOAMI),
        // The mesh ALPN of opaque TCP, carrying an HTTP request with a forged identity.
        ["tls-opaque", addr, kind] => mesh_get(addr, kind, b"trellis-mesh/1", WHOAMI_SPOOFED),
        _ => format!("unknown helper role {role:?}"),
    };
    // On its own line: the test harness has printed "test ... " before it.
    println!("\nRESULT {result}");
}

/// Pod B's application: HTTP on 8080 answering "<name> <method> <path> identity=<header>", and
/// a TCP echo on 7000.
fn app(name: &str) -> String {
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    let mut threads = Vec::new();
    for (port, http) in [(HTTP, true), (ECHO, false), (UNNAMED, true)] {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    if http {
                        serve_http(s, name)
                    } else {
                        copy_back(s)
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    "app exited".into()
}

fn serve_http(mut s: TcpStream, name: &str) {
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s.try_clone().unwrap());
    loop {
        let mut request_line = String::new();
        match r.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("?").to_owned(),
            parts.next().unwrap_or("?").to_owned(),
        );
        let mut identities = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("x-trellis-client-identity:") {
                identities.push(v.trim().to_owned());
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut discard = vec![0u8; length];
        if r.read_exact(&mut discard).is_err() {
            return;
        }
        let identity = if identities.is_empty() {
            "-".to_owned()
        } else {
            identities.join(",")
        };
        let body = format!("{name} {method} {path} identity={identity}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn http_get(s: &mut TcpStream, addr: &str) -> Result<(), String> {
    let req = format!("GET / HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let (status, body) = read_response(s)?;
    if status != 200 || !body.starts_with("pod-b ") {
        return Err(format!("{status} {body:?}"));
    }
    Ok(())
}

const WHOAMI: &str = "GET /whoami HTTP/1.1\r\nhost: b\r\n\r\n";
const WHOAMI_SPOOFED: &str = "GET /whoami HTTP/1.1\r\nhost: b\r\n\
    x-trellis-client-identity: spiffe://cluster.local/ns/demo/sa/admin\r\n\r\n";

/// A plaintext request (with a forged identity header) straight to `addr`: "<status> <body>" or
/// "refused: ...".
fn plain_get(addr: &str) -> String {
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("refused: connect: {e}"),
    };
    if let Err(e) = s.write_all(WHOAMI_SPOOFED.as_bytes()) {
        return format!("refused: write: {e}");
    }
    match read_response(&mut s) {
        Ok((status, body)) => format!("{status} {}", body.trim_end()),
        Err(e) => format!("refused: {e}"),
    }
}

/// A mesh handshake (mesh ALPN, no SNI, TLS 1.3) straight to `addr` with the client certificate
/// `kind` from the directory in `TRELLIS_MESH_CERTS` ("none": no certificate), then a request:
/// "<status> <body>", or "refused: ..." when the server ends the connection instead.
fn mesh_get(addr: &str, kind: &str, alpn: &[u8], request: &str) -> String {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let dir = PathBuf::from(std::env::var(CERTS_ENV).unwrap());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = if kind == "none" {
        builder.with_no_client_auth()
    } else {
        let cert = std::fs::read(dir.join(format!("{kind}.der"))).unwrap();
        let key = std::fs::read(dir.join(format!("{kind}-key.der"))).unwrap();
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from(cert)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap()
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_sni = false;
    let name = ServerName::try_from("mesh.trellis.invalid").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = match connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("refused: connect: {e}"),
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    if let Err(e) = tls.write_all(request.as_bytes()).and_then(|()| tls.flush()) {
        return format!("refused: handshake or write: {e}");
    }
    match read_response(&mut tls) {
        Ok((status, body)) => format!("{status} {}", body.trim_end()),
        Err(e) => format!("refused: {e}"),
    }
}

/// Trusts any server: these clients test what B's sidecar refuses, not B's certificate.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `examples/mesh/` is what the controller reads: every document of its manifests is a kind the
/// controller parses (none skipped as unknown), none is reported as unusable, each Pod's service
/// account has a token file in the layout `--identity-tokens` expects, and the CRD names the
/// AuthorizationPolicy kind the policies use.
#[test]
fn the_mesh_example_fits() {
    use serde::Deserialize;
    use serde_yaml::Value;
    use trellis_control::{source::file::ManifestDir, source::manifest, status::Registry};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let crd = "authorization-policy-crd.yaml";
    let mut accounts = Vec::new();
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") || name == crd {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = manifest::parse_documents(&text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|d| !d.is_null())
            .collect();
        assert_eq!(
            parsed.len(),
            documents.len(),
            "{name}: a document of a kind the controller does not read"
        );
        for d in &documents {
            kinds.push(d["kind"].as_str().unwrap().to_owned());
            if d["kind"] == "Pod" {
                let ns = d["metadata"]["namespace"].as_str().unwrap().to_owned();
                let sa = d["spec"]["serviceAccountName"].as_str().unwrap().to_owned();
                accounts.push((ns, sa));
            }
        }
    }
    for kind in [
        "Namespace",
        "Pod",
        "Service",
        "EndpointSlice",
        "AuthorizationPolicy",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in the example");
    }
    let registry = Arc::new(Registry::default());
    let mut source = ManifestDir::new(&dir, registry.clone());
    source.scan();
    let problems = trellis_control::translate::object_diagnostics(&source.catalog());
    assert!(problems.is_empty(), "{problems:#?}");
    let report = registry.report();
    assert!(report.source_errors.is_empty(), "{report:?}");
    assert!(!accounts.is_empty());
    for (ns, sa) in accounts {
        let token = dir.join("tokens").join(&ns).join(&sa);
        let text =
            std::fs::read_to_string(&token).unwrap_or_else(|e| panic!("{}: {e}", token.display()));
        assert!(!text.trim().is_empty(), "{} is empty", token.display());
    }
    let crd: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join(crd)).unwrap()).unwrap();
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    assert_eq!(crd["spec"]["names"]["kind"], "AuthorizationPolicy");
    assert_eq!(crd["spec"]["group"], "trellis.io");
}
