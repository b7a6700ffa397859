//! Simulated proxies for scale benchmarks and tests: lightweight delta-stream clients that
//! subscribe and ACK as `discovery.proto` asks (clusters, listeners and secrets by wildcard;
//! endpoints and route configurations by the names the clusters and listeners give), without
//! building any proxy state. Each one records what a benchmark needs: when it first held a full
//! configuration, when it ACKed a watched resource, bytes received, failed stream attempts.
//!
//! Also the manifest generator those benchmarks use: N Services with E endpoints each, spread
//! over namespaces, plus Gateways with HTTPRoutes and GAMMA (Service-parented) routes.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::discovery::v1::{
    self as api, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_client::AggregatedDiscoveryClient, resource::Kind,
};

/// What a simulated proxy has seen, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// When the proxy first held clusters, endpoints for each of them, listeners and every route
    /// configuration they name (`None` until then).
    pub full_at: Mutex<Option<Instant>>,
    /// Stream attempts that failed (connect refused, stream reset) before or after success.
    pub failed_attempts: AtomicU64,
    /// Encoded bytes of every response received.
    pub bytes: AtomicU64,
    pub responses: AtomicU64,
    /// The watched resource: (type, name, when set) and when a response carrying it was ACKed.
    pub watch: Mutex<Option<Watch>>,
    /// Every resource held, type → name → version; kept only when `track_versions` is set
    /// (tests compare them; at scale they would cost the benchmark gigabytes).
    pub versions: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
}

#[derive(Clone, Debug)]
pub struct Watch {
    pub type_url: String,
    pub name: String,
    /// ACK time of the first response carrying `name` after the watch was set.
    pub acked_at: Option<Instant>,
    /// Encoded bytes of responses received while the watch was open.
    pub bytes: u64,
}

impl ProxyStats {
    pub fn full_at(&self) -> Option<Instant> {
        *self.full_at.lock().unwrap()
    }

    /// Starts watching for the next response that carries `name` of `type_url`.
    pub fn watch(&self, type_url: &str, name: &str) {
        *self.watch.lock().unwrap() = Some(Watch {
            type_url: type_url.to_owned(),
            name: name.to_owned(),
            acked_at: None,
            bytes: 0,
        });
    }

    pub fn watched(&self) -> Option<Watch> {
        self.watch.lock().unwrap().clone()
    }
}

/// Options of one simulated proxy.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub node: api::Node,
    pub track_versions: bool,
    /// Delay before the first attempt (to spread or bunch connects).
    pub start_delay: Duration,
    /// Largest response accepted (the proxy's own limit, so size cliffs show up here too).
    pub max_message: usize,
}

/// Runs one simulated proxy against `addr` until `stop` fires, reconnecting (with a short
/// jittered back-off) whenever its stream fails. Returns when stopped.
pub async fn run(
    addr: SocketAddr,
    options: SimOptions,
    stats: Arc<ProxyStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::time::sleep(options.start_delay).await;
    let mut attempt: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let outcome = tokio::select! {
            outcome = stream_once(addr, &options, &stats) => outcome,
            _ = stop.changed() => return,
        };
        if let Err(e) = outcome {
            stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(node = %options.node.id, error = %e, "simulated stream failed");
        }
        attempt = attempt.saturating_add(1);
        let backoff = Duration::from_millis(50u64 << attempt.min(5));
        let jitter = Duration::from_millis(u64::from(fastrand_u32()) % 50);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A cheap per-call pseudo-random number: jitter needs no quality.
fn fastrand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u32
}

#[derive(Default)]
struct Held {
    /// By-name subscriptions not answered yet (endpoints and routes), and the ones answered.
    pending: HashSet<(bool, String)>,
    subscribed: HashSet<(bool, String)>,
    seen_clusters: bool,
    seen_listeners: bool,
}

async fn stream_once(
    addr: SocketAddr,
    options: &SimOptions,
    stats: &ProxyStats,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut client = AggregatedDiscoveryClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(options.max_message);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(options.node.clone()),
        type_url: api::CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await?;
    for t in [api::LISTENER_TYPE, api::SECRET_TYPE] {
        tx.send(DeltaDiscoveryRequest {
            type_url: t.into(),
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = client
        .delta_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut held = Held::default();
    while let Some(response) = inbound.message().await? {
        handle(&tx, &response, options, stats, &mut held).await?;
    }
    Err("stream closed by the controller".into())
}

async fn handle(
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    r: &DeltaDiscoveryResponse,
    options: &SimOptions,
    stats: &ProxyStats,
    held: &mut Held,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let len = r.encoded_len() as u64;
    stats.bytes.fetch_add(len, Ordering::Relaxed);
    stats.responses.fetch_add(1, Ordering::Relaxed);
    let mut endpoints = Vec::new();
    let mut routes = Vec::new();
    for x in &r.resources {
        match &x.kind {
            Some(Kind::Cluster(c)) => endpoints.push(c.name.clone()),
            Some(Kind::Listener(l)) => match &l.kind {
                Some(api::listener::Kind::Http(h)) => routes.push(h.route_config.clone()),
                Some(api::listener::Kind::Capture(c)) => routes.extend(
                    c.services
                        .iter()
                        .filter(|s| !s.route_config.is_empty())
                        .map(|s| s.route_config.clone()),
                ),
                _ => {}
            },
            _ => {}
        }
        if r.type_url == api::CLUSTER_LOAD_ASSIGNMENT_TYPE {
            held.pending.remove(&(false, x.name.clone()));
        } else if r.type_url == api::ROUTE_CONFIGURATION_TYPE {
            held.pending.remove(&(true, x.name.clone()));
        }
    }
    match r.type_url.as_str() {
        api::CLUSTER_TYPE => held.seen_clusters = true,
        api::LISTENER_TYPE => held.seen_listeners = true,
        _ => {}
    }
    if options.track_versions {
        let mut versions = stats.versions.lock().unwrap();
        let of_type = versions.entry(r.type_url.clone()).or_default();
        for x in &r.resources {
            of_type.insert(x.name.clone(), x.version.clone());
        }
        for name in &r.removed_resources {
            of_type.remove(name);
        }
    }
    // Subscriptions go before the ACK, as a real proxy sends them.
    for (is_route, names) in [(false, endpoints), (true, routes)] {
        let new: Vec<String> = names
            .into_iter()
            .filter(|n| held.subscribed.insert((is_route, n.clone())))
            .collect();
        if new.is_empty() {
            continue;
        }
        for n in &new {
            held.pending.insert((is_route, n.clone()));
        }
        let type_url = if is_route {
            api::ROUTE_CONFIGURATION_TYPE
        } else {
            api::CLUSTER_LOAD_ASSIGNMENT_TYPE
        };
        tx.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: new,
            ..Default::default()
        })
        .await?;
    }
    tx.send(DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await?;
    let now = Instant::now();
    if held.seen_clusters && held.seen_listeners && held.pending.is_empty() {
        let mut full = stats.full_at.lock().unwrap();
        if full.is_none() {
            *full = Some(now);
        }
    }
    if let Some(w) = stats.watch.lock().unwrap().as_mut() {
        w.bytes += len;
        if w.acked_at.is_none()
            && r.type_url == w.type_url
            && r.resources.iter().any(|x| x.name == w.name)
        {
            w.acked_at = Some(now);
        }
    }
    Ok(())
}

/// A sidecar node in `namespace`.
pub fn sidecar_node(id: &str, namespace: &str) -> api::Node {
    api::Node {
        id: id.into(),
        role: api::Role::Sidecar.into(),
        namespace: namespace.into(),
        service_account: "default".into(),
        ..Default::default()
    }
}

/// A gateway node serving `namespace/gateway`.
pub fn gateway_node(id: &str, namespace: &str, gateway: &str) -> api::Node {
    api::Node {
        id: id.into(),
        role: api::Role::Gateway.into(),
        namespace: namespace.into(),
        gateway_name: format!("{namespace}/{gateway}"),
        ..Default::default()
    }
}

/// The shape of a generated catalog.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub namespaces: usize,
    /// Gateways (one per namespace, up to this many), each with an HTTPS-less HTTP listener and
    /// one HTTPRoute per `route_every`-th service of its namespace.
    pub gateways: usize,
    /// Every this-many-th service gets an HTTPRoute on its namespace's gateway and a GAMMA route.
    pub route_every: usize,
}

impl Catalog {
    pub fn namespace(&self, service: usize) -> String {
        format!("ns-{}", service % self.namespaces.max(1))
    }

    pub fn service_name(&self, service: usize) -> String {
        format!("svc-{service}")
    }

    /// The file holding service `i` (its Service and EndpointSlice).
    pub fn file_of(&self, service: usize) -> String {
        format!("svc-{service}.yaml")
    }

    /// Name of the cluster (and endpoint assignment) of service `i`.
    pub fn cluster_of(&self, service: usize) -> String {
        format!(
            "{}/{}:80",
            self.namespace(service),
            self.service_name(service)
        )
    }

    /// Writes one file per service (Service + EndpointSlice, with `generation` folded into the
    /// endpoint addresses so a rewrite changes them), plus `gateways.yaml` and `routes.yaml`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        for i in 0..self.services {
            std::fs::write(dir.join(self.file_of(i)), self.service_yaml(i, 0))?;
        }
        let mut gateways = String::new();
        let mut routes = String::new();
        for g in 0..self.gateways.min(self.namespaces.max(1)) {
            let _ = write!(
                gateways,
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: ns-{g}}}\nspec:\n  gatewayClassName: trellis\n  listeners:\n    - {{name: http, protocol: HTTP, port: 8080}}\n---\n"
            );
        }
        for i in (0..self.services).step_by(self.route_every.max(1)) {
            let ns = self.namespace(i);
            let name = self.service_name(i);
            let n = i % self.namespaces.max(1);
            if n < self.gateways {
                let _ = write!(
                    routes,
                    "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}-gw, namespace: {ns}}}\nspec:\n  parentRefs: [{{name: gw}}]\n  hostnames: [{name}.example.test]\n  rules:\n    - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n      backendRefs: [{{name: {name}, port: 80}}]\n---\n"
                );
            }
            let _ = write!(
                routes,
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}-mesh, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: 80}}]\n  rules:\n    - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]\n      backendRefs: [{{name: {name}, port: 80}}]\n---\n"
            );
        }
        if !gateways.is_empty() {
            std::fs::write(dir.join("gateways.yaml"), gateways)?;
        }
        if !routes.is_empty() {
            std::fs::write(dir.join("routes.yaml"), routes)?;
        }
        Ok(())
    }

    /// Service `i` with its EndpointSlice; `generation` shifts the endpoint addresses.
    pub fn service_yaml(&self, i: usize, generation: u32) -> String {
        let ns = self.namespace(i);
        let name = self.service_name(i);
        // Addresses are data here, but a real proxy fed this catalog could dial them: keep them
        // on loopback. ClusterIPs from 127.128.0.0, endpoints from 127.0.0.0 (unique while
        // services × endpoints < 2^23).
        let ip = |high: usize, n: usize| {
            format!(
                "127.{}.{}.{}",
                high + ((n >> 16) & 127),
                (n >> 8) & 255,
                n & 255
            )
        };
        let mut out = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {}\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            ip(128, i)
        );
        for e in 0..self.endpoints_per_service {
            let n = i * self.endpoints_per_service + e + generation as usize;
            let _ = writeln!(
                out,
                "  - addresses: [{}]\n    conditions: {{ready: true}}",
                ip(0, n)
            );
        }
        out
    }
}

/// A `trellis-control serve` child process on a manifests directory, on ports it picks itself
/// (read back from its "serving" log line). Killed when dropped.
pub struct ControllerProcess {
    pub child: std::process::Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProcess {
    /// Starts `bin serve --manifests dir` on 127.0.0.1 and waits (bounded) for its addresses.
    pub fn spawn(bin: &str, dir: &Path) -> ControllerProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--manifests"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--log", "warn,trellis_control=info"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting trellis-control");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining stderr after the addresses, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && line.contains("serving") {
                    let field = |key: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(key))
                            .and_then(|v| v.trim_matches('"').parse::<SocketAddr>().ok())
                    };
                    let _ = tx.send((field("listen="), field("admin=")));
                    sent = true;
                }
            }
        });
        let (grpc, admin) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the controller logs its addresses");
        ControllerProcess {
            child,
            grpc: grpc.expect("listen= in the serving line"),
            admin: admin.expect("admin= in the serving line"),
        }
    }

    /// Whether `/ready` answers 200.
    pub async fn ready(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(self.admin).await else {
            return false;
        };
        let _ = s
            .write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf.starts_with(b"HTTP/1.1 200")
    }

    /// User + system CPU seconds the controller has used.
    pub fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after the last ')';
        // utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Peak resident memory (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}
