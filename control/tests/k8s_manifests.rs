//! `examples/kubernetes/` is consistent with itself and with the binaries it runs: Service
//! selectors find pods and their target ports; probes ask real admin paths on the admin port;
//! every flag is one the binary takes (`--help` of the built binaries); service accounts,
//! bindings, namespaces, volumes, Gateways and discovery addresses name objects that exist; the
//! gateway's grace period covers its drain; and the controller's ClusterRole grants exactly the
//! API calls the Kubernetes source makes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_yaml::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CONTROL_BIN: &str = env!("CARGO_BIN_EXE_trellis-control");

/// Flags of `trellis-control serve` the manifests use before the code exists: the Kubernetes API
/// source. Printed by the test so a reader sees what is not checked against a binary.
const NOT_YET_BUILT: &[&str] = &["--kubernetes"];

/// The API calls the Kubernetes source makes, as (API group, resource, verbs): watches (list +
/// watch, get on a single object) of what it translates, status writes on the Gateway API objects
/// it owns, its leader Lease, and TokenReviews for sidecar identity. The source's code keeps this
/// table next to its calls; the ClusterRole must grant all of it and nothing more.
const API_CALLS: &[(&str, &str, &[&str])] = &[
    ("", "services", READ),
    ("", "pods", READ),
    ("", "namespaces", READ),
    ("", "secrets", READ),
    ("discovery.k8s.io", "endpointslices", READ),
    (GATEWAY, "gatewayclasses", READ),
    (GATEWAY, "gateways", READ),
    (GATEWAY, "httproutes", READ),
    (GATEWAY, "grpcroutes", READ),
    (GATEWAY, "tlsroutes", READ),
    (GATEWAY, "tcproutes", READ),
    (GATEWAY, "referencegrants", READ),
    (GATEWAY, "backendtlspolicies", READ),
    (GATEWAY, "gatewayclasses/status", STATUS),
    (GATEWAY, "gateways/status", STATUS),
    (GATEWAY, "httproutes/status", STATUS),
    (GATEWAY, "grpcroutes/status", STATUS),
    (GATEWAY, "tlsroutes/status", STATUS),
    (GATEWAY, "tcproutes/status", STATUS),
    ("trellis.io", "authorizationpolicies", READ),
    (
        "coordination.k8s.io",
        "leases",
        &["create", "get", "update"],
    ),
    ("authentication.k8s.io", "tokenreviews", &["create"]),
];
const GATEWAY: &str = "gateway.networking.k8s.io";
const READ: &[&str] = &["get", "list", "watch"];
const STATUS: &[&str] = &["patch", "update"];

/// Kinds that are not namespaced.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "GatewayClass",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[derive(Debug)]
struct Object {
    file: String,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.doc["metadata"]["namespace"].as_str().unwrap_or("")
    }
    fn id(&self) -> String {
        format!(
            "{}: {} {}/{}",
            self.file,
            self.kind(),
            self.namespace(),
            self.name()
        )
    }
    /// The pod template of a workload (the object itself for a Pod).
    fn template(&self) -> Option<&Value> {
        match self.kind() {
            "Pod" => Some(&self.doc),
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => {
                Some(&self.doc["spec"]["template"])
            }
            "CronJob" => Some(&self.doc["spec"]["jobTemplate"]["spec"]["template"]),
            _ => None,
        }
    }
}

fn load() -> Vec<Object> {
    let dir = root().join("examples/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "manifests in {}", dir.display());
    let mut objects = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, d) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc: Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{file}: document {}: {e}", i + 1));
            if doc.is_null() {
                continue;
            }
            let o = Object {
                file: file.clone(),
                doc,
            };
            assert!(
                o.doc["apiVersion"].is_string() && !o.kind().is_empty() && !o.name().is_empty(),
                "{file}: document {} needs apiVersion, kind and metadata.name",
                i + 1
            );
            objects.push(o);
        }
    }
    objects
}

fn find<'a>(objects: &'a [Object], kind: &str, namespace: &str, name: &str) -> Option<&'a Object> {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.namespace() == namespace && o.name() == name)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn labels(v: &Value) -> BTreeMap<&str, &str> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap(), v.as_str().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<&str, &str>, labels: &BTreeMap<&str, &str>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn containers(template: &Value) -> impl Iterator<Item = &Value> {
    let spec = &template["spec"];
    spec["initContainers"]
        .as_sequence()
        .into_iter()
        .chain(spec["containers"].as_sequence())
        .flatten()
}

/// The value of `--name=value` among a container's arguments.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    strings(&container["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix(prefix.as_str()))
}

/// A container port by name or number: its number.
fn container_port(template: &Value, port: &Value) -> Option<u64> {
    containers(template)
        .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
        .find(|p| match port {
            Value::String(name) => p["name"].as_str() == Some(name),
            Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
            _ => false,
        })
        .and_then(|p| p["containerPort"].as_u64())
}

fn workloads(objects: &[Object]) -> impl Iterator<Item = (&Object, &Value)> {
    objects.iter().filter_map(|o| o.template().map(|t| (o, t)))
}

/// The image's entrypoint, which runs when a container names no command.
fn entrypoint() -> String {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let line = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("the Dockerfile has an ENTRYPOINT");
    let words: Vec<String> = serde_json::from_str(line).expect("ENTRYPOINT in exec form");
    words[0].clone()
}

/// Which Trellis binary a container runs, or None for an application container.
fn binary(container: &Value, entrypoint: &str) -> Option<String> {
    let image = container["image"].as_str().unwrap_or("");
    if !image.starts_with("trellis:") {
        return None;
    }
    assert_eq!(
        image,
        trellis_control::inject::DEFAULT_IMAGE,
        "one documented image name everywhere"
    );
    Some(
        strings(&container["command"])
            .first()
            .map_or(entrypoint.to_owned(), |c| (*c).to_owned()),
    )
}

#[test]
fn every_namespaced_object_has_its_namespace() {
    let objects = load();
    for o in &objects {
        if CLUSTER_SCOPED.contains(&o.kind()) {
            assert!(o.namespace().is_empty(), "{} is cluster-scoped", o.id());
        } else {
            assert!(
                find(&objects, "Namespace", "", o.namespace()).is_some(),
                "{}: its namespace is not among the manifests",
                o.id()
            );
        }
    }
}

#[test]
fn services_select_pods_and_their_target_ports() {
    let objects = load();
    for svc in objects.iter().filter(|o| o.kind() == "Service") {
        let selector = labels(&svc.doc["spec"]["selector"]);
        let selected: Vec<_> = workloads(&objects)
            .filter(|(w, t)| {
                w.namespace() == svc.namespace()
                    && selects(&selector, &labels(&t["metadata"]["labels"]))
            })
            .collect();
        assert!(!selected.is_empty(), "{} selects no pod", svc.id());
        for port in svc.doc["spec"]["ports"].as_sequence().unwrap() {
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            for (w, t) in &selected {
                assert!(
                    container_port(t, target).is_some(),
                    "{}: targetPort {target:?} is no container port of {}",
                    svc.id(),
                    w.id()
                );
            }
        }
    }
    for (w, t) in workloads(&objects) {
        if let Some(selector) = w.doc["spec"]["selector"].get("matchLabels") {
            assert!(
                selects(&labels(selector), &labels(&t["metadata"]["labels"])),
                "{}: the selector does not match its own pod template",
                w.id()
            );
        }
    }
    for pdb in objects.iter().filter(|o| o.kind() == "PodDisruptionBudget") {
        let selector = labels(&pdb.doc["spec"]["selector"]["matchLabels"]);
        assert!(
            workloads(&objects).any(|(w, t)| w.namespace() == pdb.namespace()
                && selects(&selector, &labels(&t["metadata"]["labels"]))),
            "{} covers no pod",
            pdb.id()
        );
    }
}

#[test]
fn accounts_volumes_gateways_and_discovery_addresses_exist() {
    let objects = load();
    for (w, t) in workloads(&objects) {
        let spec = &t["spec"];
        let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
        assert!(
            find(&objects, "ServiceAccount", w.namespace(), sa).is_some(),
            "{}: no ServiceAccount {sa}",
            w.id()
        );
        let volumes: BTreeSet<_> = spec["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for c in containers(t) {
            for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                let name = m["name"].as_str().unwrap();
                assert!(volumes.contains(name), "{}: no volume {name}", w.id());
            }
            if let Some(xds) = flag(c, "xds") {
                let (host, port) = xds.rsplit_once(':').unwrap();
                let parts: Vec<_> = host.split('.').collect();
                assert!(
                    matches!(parts[..], [_, _, "svc"] | [_, _, "svc", "cluster", "local"]),
                    "{}: --xds={xds} is not a Service address",
                    w.id()
                );
                let svc = find(&objects, "Service", parts[1], parts[0])
                    .unwrap_or_else(|| panic!("{}: --xds={xds}: no such Service", w.id()));
                assert!(
                    svc.doc["spec"]["ports"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|p| p["port"].as_u64().map(|p| p.to_string()).as_deref() == Some(port)),
                    "{}: --xds={xds}: the Service has no port {port}",
                    w.id()
                );
            }
            if let Some(name) = flag(c, "gateway") {
                let gw = find(&objects, "Gateway", w.namespace(), name)
                    .unwrap_or_else(|| panic!("{}: --gateway={name}: no such Gateway", w.id()));
                let class = gw.doc["spec"]["gatewayClassName"].as_str().unwrap();
                assert!(
                    find(&objects, "GatewayClass", "", class).is_some(),
                    "{}: no GatewayClass {class}",
                    gw.id()
                );
                for l in gw.doc["spec"]["listeners"].as_sequence().unwrap() {
                    assert!(
                        container_port(t, &l["port"]).is_some(),
                        "{}: listener port {:?} is no container port of {}",
                        gw.id(),
                        l["port"],
                        w.id()
                    );
                }
            }
        }
    }
    for b in objects.iter().filter(|o| o.kind() == "ClusterRoleBinding") {
        let role = b.doc["roleRef"]["name"].as_str().unwrap();
        assert!(
            find(&objects, "ClusterRole", "", role).is_some(),
            "{}: no ClusterRole {role}",
            b.id()
        );
        for s in b.doc["subjects"].as_sequence().unwrap() {
            let (ns, name) = (
                s["namespace"].as_str().unwrap(),
                s["name"].as_str().unwrap(),
            );
            assert!(
                find(&objects, "ServiceAccount", ns, name).is_some(),
                "{}: no ServiceAccount {ns}/{name}",
                b.id()
            );
        }
    }
}

/// Flags a binary prints in its `--help` (for a subcommand when given).
fn help_flags(bin: &Path, subcommand: Option<&str>) -> BTreeSet<String> {
    let out = Command::new(bin)
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {} --help: {e}", bin.display()));
    assert!(out.status.success(), "{} --help: {out:?}", bin.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

/// The built `trellis-proxy`: `cargo test --workspace` builds it beside `trellis-control`. A
/// missing or older-than-its-sources binary fails the test rather than checking stale flags.
fn proxy_bin() -> PathBuf {
    let bin = Path::new(CONTROL_BIN).with_file_name("trellis-proxy");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build it first (cargo build -p trellis-proxy, or run cargo test --workspace)",
                bin.display()
            )
        });
    let newest = newest_source(&root().join("proxy/src"));
    assert!(
        newest <= built,
        "{} is older than proxy/src: rebuild it (cargo build -p trellis-proxy)",
        bin.display()
    );
    bin
}

fn newest_source(dir: &Path) -> std::time::SystemTime {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                newest_source(&e.path())
            } else {
                e.metadata().unwrap().modified().unwrap()
            }
        })
        .max()
        .unwrap_or(std::time::UNIX_EPOCH)
}

#[test]
fn container_flags_are_ones_the_binaries_take() {
    let objects = load();
    let entrypoint = entrypoint();
    println!("flags of the Kubernetes source, not built yet, not checked: {NOT_YET_BUILT:?}");
    let proxy = proxy_bin();
    let mut helps: BTreeMap<(String, Option<String>), BTreeSet<String>> = BTreeMap::new();
    let mut checked = 0;
    for (w, t) in workloads(&objects) {
        for c in containers(t) {
            let Some(bin) = binary(c, &entrypoint) else {
                continue;
            };
            let args = strings(&c["args"]);
            let (path, subcommand) = match (bin.as_str(), args.first()) {
                ("trellis-control", Some(&sub)) => (PathBuf::from(CONTROL_BIN), Some(sub)),
                ("trellis-proxy", Some(&"iptables")) => (proxy.clone(), Some("iptables")),
                ("trellis-proxy", _) => (proxy.clone(), None),
                other => panic!("{}: container {:?} runs {other:?}", w.id(), c["name"]),
            };
            let known = helps
                .entry((bin.clone(), subcommand.map(str::to_owned)))
                .or_insert_with(|| help_flags(&path, subcommand));
            let flags = &args[usize::from(subcommand.is_some())..];
            for arg in flags {
                let name = arg.split_once('=').map_or(*arg, |(n, _)| n);
                assert!(
                    name.starts_with("--"),
                    "{}: argument {arg:?} of {bin} is not a --flag=value",
                    w.id()
                );
                let allowed = bin == "trellis-control" && NOT_YET_BUILT.contains(&name);
                assert!(
                    known.contains(name) || allowed,
                    "{}: {bin}{} does not take {name}",
                    w.id(),
                    subcommand.map(|s| format!(" {s}")).unwrap_or_default()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} flags checked");
}

/// `GET path` on a local admin server: the status code.
async fn get(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .expect("admin answered within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&resp);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Probes hit the admin port of their container and a path its admin server serves (asked of
/// the real admin servers, run here: anything but 404 is a path they know).
#[tokio::test]
async fn probes_ask_real_admin_paths_on_the_admin_port() {
    let objects = load();
    let entrypoint = entrypoint();
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();

    let proxy_admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy_admin.local_addr().unwrap();
    let _proxy = trellis_proxy::admin::Admin::new(
        trellis_proxy::Proxy::new(),
        std::sync::Arc::new(trellis_proxy::admin::Lifecycle::default()),
    )
    .spawn(proxy_admin);
    let control_admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = control_admin.local_addr().unwrap();
    let _control = tokio::spawn(trellis_control::admin::serve(
        control_admin,
        Default::default(),
    ));
    // Both answer 404 for what they do not serve: the check below can fail.
    assert_eq!(get(proxy_addr, "/healthz").await, 404);
    assert_eq!(get(control_addr, "/healthz").await, 404);

    let mut probes = 0;
    for (w, t) in workloads(&objects) {
        for c in containers(t) {
            let Some(bin) = binary(c, &entrypoint) else {
                continue;
            };
            let (admin_port, local) = match bin.as_str() {
                "trellis-proxy" => {
                    let addr = flag(c, "admin").unwrap_or(trellis_proxy::admin::DEFAULT_ADDRESS);
                    (
                        addr.rsplit_once(':').unwrap().1.parse::<u64>().unwrap(),
                        proxy_addr,
                    )
                }
                _ => {
                    let addr = flag(c, "admin")
                        .unwrap_or_else(|| panic!("{}: the controller needs --admin", w.id()));
                    (
                        addr.rsplit_once(':').unwrap().1.parse().unwrap(),
                        control_addr,
                    )
                }
            };
            for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let probe = &c[kind];
                if probe.is_null() {
                    continue;
                }
                let (port, path) = if let Some(http) = probe.get("httpGet") {
                    let port = container_port(t, &http["port"]).unwrap_or_else(|| {
                        panic!(
                            "{}: {kind} port {:?} is no container port",
                            w.id(),
                            http["port"]
                        )
                    });
                    (port, http["path"].as_str().unwrap().to_owned())
                } else {
                    let cmd = strings(&probe["exec"]["command"]);
                    assert_eq!(cmd.first(), Some(&"wget"), "{}: {kind}", w.id());
                    assert!(
                        dockerfile.contains("wget"),
                        "{}: {kind} runs wget, which the image must hold",
                        w.id()
                    );
                    let url = cmd.last().unwrap();
                    let rest = url
                        .strip_prefix("http://127.0.0.1:")
                        .unwrap_or_else(|| panic!("{}: {kind} asks {url}, not loopback", w.id()));
                    let (port, path) = rest.split_once('/').unwrap();
                    (port.parse().unwrap(), format!("/{path}"))
                };
                assert_eq!(
                    port,
                    admin_port,
                    "{}: {kind} of {bin} asks port {port}, its admin port is {admin_port}",
                    w.id()
                );
                let status = get(local, &path).await;
                assert!(
                    status == 200 || status == 503,
                    "{}: {kind} asks {path}, which {bin}'s admin server answers {status}",
                    w.id()
                );
                probes += 1;
            }
        }
    }
    assert!(probes >= 6, "only {probes} probes found");
}

#[test]
fn the_gateway_grace_period_outlasts_its_drain() {
    use trellis_proxy::config::duration::parse_duration;
    let objects = load();
    let mut gateways = 0;
    for (w, t) in workloads(&objects) {
        for c in containers(t) {
            if flag(c, "role") != Some("gateway") {
                continue;
            }
            let grace =
                Duration::from_secs(t["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap());
            let delay = parse_duration(flag(c, "drain-delay").expect("--drain-delay")).unwrap();
            let timeout =
                parse_duration(flag(c, "drain-timeout").expect("--drain-timeout")).unwrap();
            assert!(
                delay > Duration::ZERO && delay + timeout + Duration::from_secs(1) < grace,
                "{}: {delay:?} + {timeout:?} + 1s must stay under the {grace:?} grace period",
                w.id()
            );
            gateways += 1;
        }
    }
    assert_eq!(gateways, 1);
}

#[test]
fn the_controller_role_grants_exactly_its_api_calls() {
    let objects = load();
    let controller = objects
        .iter()
        .find(|o| {
            o.kind() == "Deployment"
                && o.template().is_some_and(|t| {
                    containers(t)
                        .any(|c| strings(&c["command"]).first() == Some(&"trellis-control"))
                })
        })
        .expect("a controller Deployment");
    assert_eq!(controller.doc["spec"]["replicas"], 2);
    let sa = controller.template().unwrap()["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for b in objects.iter().filter(|o| o.kind() == "ClusterRoleBinding") {
        let bound = b.doc["subjects"].as_sequence().unwrap().iter().any(|s| {
            s["kind"] == "ServiceAccount"
                && s["name"] == sa
                && s["namespace"] == controller.namespace()
        });
        if !bound {
            continue;
        }
        let role = find(
            &objects,
            "ClusterRole",
            "",
            b.doc["roleRef"]["name"].as_str().unwrap(),
        )
        .unwrap();
        for rule in role.doc["rules"].as_sequence().unwrap() {
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        assert!(
                            !(g == "*" || r == "*" || v == "*"),
                            "{}: wildcards grant more than the controller needs",
                            role.id()
                        );
                        granted.insert((g.to_owned(), r.to_owned(), v.to_owned()));
                    }
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String)> = API_CALLS
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(|v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect();
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(missing.is_empty(), "the ClusterRole lacks {missing:?}");
    assert!(
        extra.is_empty(),
        "the ClusterRole grants more than needed: {extra:?}"
    );
}

/// The flags that may not go together pass together nowhere: a sidecar that sends its token
/// names the controller's CA (a token over plaintext off loopback is refused at start), and a
/// controller that issues certificates on a pod address serves TLS (refused at start too).
#[test]
fn tokens_travel_only_over_tls() {
    let objects = load();
    let entrypoint = entrypoint();
    let mut sidecars = 0;
    let mut controllers = 0;
    for (object, template) in workloads(&objects) {
        for c in containers(template) {
            let what = format!("{} {}", object.id(), c["name"].as_str().unwrap_or("?"));
            match binary(c, &entrypoint).as_deref() {
                Some("trellis-proxy") if flag(c, "identity-token-file").is_some() => {
                    sidecars += 1;
                    let https = flag(c, "xds").is_some_and(|x| x.starts_with("https://"));
                    assert!(
                        https || flag(c, "xds-ca-file").is_some(),
                        "{what}: --identity-token-file over a plaintext --xds"
                    );
                }
                Some("trellis-control") if flag(c, "ca-cert").is_some() => {
                    controllers += 1;
                    assert!(
                        flag(c, "tls-cert").is_some() && flag(c, "tls-key").is_some(),
                        "{what}: a CA on {:?} without --tls-cert/--tls-key",
                        flag(c, "listen")
                    );
                }
                _ => {}
            }
        }
    }
    assert!(
        sidecars >= 1 && controllers >= 1,
        "{sidecars} sidecars, {controllers} controllers checked"
    );
}
