//! Sidecar mode end to end on the real kernel: a "node" network namespace and two "pod"
//! namespaces joined by veth pairs (10.200.0.0/24, inside those namespaces only), the capture
//! rules of `trellis-proxy iptables` in each pod, a sidecar `trellis-proxy` running as UID 1337
//! in each, and the real `trellis-control` in the node namespace whose manifests give service B a
//! ClusterIP (10.96.0.10) that exists nowhere but in Trellis's tables. Pod A's application calls
//! B through both sidecars with plain clients. Needs root (CI runs as root); skipped otherwise.
//!
//! The applications and clients inside the namespaces are this test binary run again (`ip netns
//! exec ... <this test> --exact <this test>`) with `TRELLIS_NETNS_HELPER` saying what to be,
//! so the test needs nothing but iproute2, iptables, util-linux's setpriv and curl.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const PROXY: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const TEST_NAME: &str = "sidecar_mode_in_network_namespaces";
const HELPER_ENV: &str = "TRELLIS_NETNS_HELPER";

const NODE_A: &str = "10.200.0.1";
const POD_A: &str = "10.200.0.2";
const NODE_B: &str = "10.200.0.5";
const POD_B: &str = "10.200.0.6";
const CLUSTER_IP: &str = "10.96.0.10";
/// Application ports in pod B: HTTP, TCP echo, a server-speaks-first banner; and HTTP and echo
/// on ports the rules exclude on both sides, for the direct pod-to-pod comparison.
const HTTP: u16 = 8080;
const ECHO: u16 = 7000;
const BANNER: u16 = 7100;
const DIRECT_HTTP: u16 = 18080;
const DIRECT_ECHO: u16 = 17000;
const CONTROL_PORT: u16 = 18000;
/// The application's UID: anything but the proxy's.
const APP_UID: &str = "1000";
const PROXY_UID: &str = "1337";
/// Requests and round trips measured on each path.
const SAMPLES: usize = 1000;
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn sidecar_mode_in_network_namespaces() {
    if let Ok(role) = std::env::var(HELPER_ENV) {
        helper(&role);
        return;
    }
    dry_run_changes_nothing();
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!("skipped: {TEST_NAME} needs root (network namespaces and iptables)");
        return;
    }
    for tool in ["ip", "setpriv", "curl", "iptables-legacy", "iptables-nft"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: install iproute2, iptables, util-linux and curl"
        );
    }
    let mut lab = Lab::new();
    lab.build();

    // The controller in the node namespace, reachable from each pod on its gateway address.
    let manifests = lab.dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("b.yaml"), MANIFESTS).unwrap();
    let control = control_binary();
    lab.spawn(
        "controller",
        &lab.node.clone(),
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
        ],
        &[],
    );

    // The init containers' work: the real binary writes the rules, with Debian's two backends
    // (pod A legacy, pod B nft). Pod A leaves the direct ports alone on the way out, pod B on the
    // way in. A second run in pod B replaces its rules rather than adding to them.
    let direct_ports = format!("{DIRECT_HTTP},{DIRECT_ECHO}");
    for (pod, backend, exclude, runs) in [
        (lab.pod_a.clone(), "legacy", "--exclude-outbound-ports", 1),
        (lab.pod_b.clone(), "nft", "--exclude-inbound-ports", 2),
    ] {
        let argv = [
            PROXY,
            "iptables",
            "--backend",
            backend,
            exclude,
            &direct_ports,
        ];
        for _ in 0..runs {
            lab.run_ok(&pod, &argv);
        }
        let saved = lab.run_ok(&pod, &[&format!("iptables-{backend}-save"), "-t", "nat"]);
        let jumps = saved.matches("-A OUTPUT -p tcp -j TRELLIS_OUTPUT").count();
        assert_eq!(
            jumps, 1,
            "{backend}: one jump to our chain expected:\n{saved}"
        );
    }

    // Applications: pod B's, and a server outside the mesh in the node namespace.
    let me = std::env::current_exe().unwrap();
    let me = me.to_str().unwrap().to_owned();
    let helper_args = [&me, "--exact", TEST_NAME, "--nocapture", "--test-threads=1"];
    lab.spawn(
        "app-b",
        &lab.pod_b.clone(),
        None,
        &helper_args,
        &[(HELPER_ENV, "app pod-b")],
    );
    lab.spawn(
        "outside",
        &lab.node.clone(),
        None,
        &helper_args,
        &[(HELPER_ENV, "app outside")],
    );

    let pod_a = lab.pod_a.clone();
    let pod_b = lab.pod_b.clone();
    let sidecar_a = lab.sidecar(&pod_a, "pod-a", "a", NODE_A, &[]);
    let sidecar_b = lab.sidecar(&pod_b, "pod-b", "b", NODE_B, &[]);

    // curl from pod A's application to B's ClusterIP, once both sidecars have their
    // configuration (polled, bounded).
    let url = format!("http://{CLUSTER_IP}:80/");
    let body = lab.poll_curl(&url);
    assert_eq!(body, "hello from pod-b\n");

    let echo = lab.helper(&pod_a, APP_UID, &format!("echo {CLUSTER_IP}:{ECHO} 20"));
    assert!(echo.starts_with("ok"), "echo through the mesh: {echo}");
    let started = Instant::now();
    let banner = lab.helper(&pod_a, APP_UID, &format!("banner {CLUSTER_IP}:{BANNER}"));
    assert_eq!(
        banner, "220 pod-b banner",
        "server-speaks-first through the mesh"
    );
    eprintln!(
        "banner after {:?} (the detection timeouts of both sidecars)",
        started.elapsed()
    );
    // Outside the mesh: passed through to where it was going (default allow).
    let outside = lab.helper(&pod_a, APP_UID, &format!("reach {NODE_A}:{ECHO}"));
    assert_eq!(
        outside, "ok",
        "a destination outside the mesh is allowed by default"
    );
    let allowed = [
        "trellis_capture_unknown_destination_total",
        "action=\"allow\"",
    ];

    // Both sidecars saw the traffic on the right listener, and detection counted outcomes.
    let metrics_a = lab.metrics(&pod_a);
    let metrics_b = lab.metrics(&pod_b);
    for (who, metrics, listener) in [
        ("pod A", &metrics_a, "capture/outbound"),
        ("pod B", &metrics_b, "capture/inbound"),
    ] {
        let on_listener = sum(metrics, &[&format!("listener=\"{listener}\"")]);
        assert!(
            on_listener > 0.0,
            "{who}: nothing counted on {listener}:\n{metrics}"
        );
        if listener == "capture/outbound" {
            let n = sum(metrics, &allowed);
            assert!(
                n > 0.0,
                "{who}: the outside connection was not counted:\n{metrics}"
            );
        }
        let detected = sum(metrics, &["trellis_protocol_detection_total"]);
        assert!(
            detected > 0.0,
            "{who}: trellis_protocol_detection_total is 0:\n{metrics}"
        );
    }

    // Figures for the record: RSS at rest, then latency through both sidecars vs direct.
    std::thread::sleep(Duration::from_millis(500)); // let the traffic above settle: "at rest"
    for (name, pid) in [("pod A", sidecar_a), ("pod B", sidecar_b)] {
        eprintln!("FIGURE sidecar RSS at rest, {name}: {} KiB", rss_kib(pid));
    }
    for (what, mesh, direct) in [
        (
            "http",
            format!("http {CLUSTER_IP}:80"),
            format!("http {POD_B}:{DIRECT_HTTP}"),
        ),
        (
            "tcp echo",
            format!("echo {CLUSTER_IP}:{ECHO}"),
            format!("echo {POD_B}:{DIRECT_ECHO}"),
        ),
    ] {
        let mesh = lab.helper(&pod_a, APP_UID, &format!("{mesh} {SAMPLES}"));
        let direct = lab.helper(&pod_a, APP_UID, &format!("{direct} {SAMPLES}"));
        assert!(
            mesh.starts_with("ok") && direct.starts_with("ok"),
            "{what}: {mesh}; {direct}"
        );
        eprintln!("FIGURE {what}, {SAMPLES} sequential: two sidecars {mesh}; direct {direct}");
    }

    // Block unknown destinations: the same pod's sidecar restarted with the node label.
    lab.stop("sidecar-pod-a");
    lab.sidecar(
        &pod_a,
        "pod-a",
        "a",
        NODE_A,
        &["trellis.io/outbound-policy=block"],
    );
    assert_eq!(lab.poll_curl(&url), "hello from pod-b\n");
    let outside = lab.helper(&pod_a, APP_UID, &format!("reach {NODE_A}:{ECHO}"));
    assert_ne!(
        outside, "ok",
        "outbound-policy block let an outside connection through"
    );
    let blocked = [
        "trellis_capture_unknown_destination_total",
        "action=\"block\"",
    ];
    let metrics = lab.metrics(&pod_a);
    assert!(
        sum(&metrics, &blocked) > 0.0,
        "the block was not counted:\n{metrics}"
    );
}

const MANIFESTS: &str = "
kind: Service
metadata: {name: b, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: b}
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: echo, port: 7000}
    - {name: banner, port: 7100}
---
kind: EndpointSlice
metadata:
  name: b-1
  namespace: demo
  labels: {kubernetes.io/service-name: b}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: echo, port: 7000}, {name: banner, port: 7100}]
endpoints:
  - addresses: [10.200.0.6]
";

/// `trellis-proxy iptables --dry-run` prints the rules and changes nothing (no root needed: it
/// runs no iptables at all); a bad flag is named.
fn dry_run_changes_nothing() {
    let out = Command::new(PROXY)
        .args(["iptables", "--dry-run", "--backend", "nft", "--ipv6"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("# iptables-nft-restore --noflush\n*nat\n"),
        "{text}"
    );
    assert!(
        text.contains("# ip6tables-nft-restore --noflush\n*nat\n"),
        "{text}"
    );
    assert!(text.contains("-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
    let out = Command::new(PROXY)
        .args(["iptables", "--exclude-outbound-cidrs", "10.0.0.0/40"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--exclude-outbound-cidrs"), "{err}");
    // Without the binaries: a clear error, not a panic.
    let out = Command::new(PROXY)
        .args(["iptables"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot run iptables"), "{err}");
}

/// `examples/sidecar/pod.yaml` fits: the init container's arguments are ones `trellis-proxy
/// iptables` takes and exclude the sidecar's UID, the sidecar's flags exist, and only the init
/// container has capabilities.
#[test]
fn the_sidecar_pod_example_fits() {
    use serde_yaml::Value;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sidecar/pod.yaml");
    let pod: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let spec = &pod["spec"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let init = &spec["initContainers"][0];
    let mut args = strings(&init["args"]);
    args.push("--dry-run".into());
    let out = Command::new(PROXY).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8_lossy(&out.stdout);
    let sidecar = spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "trellis-proxy")
        .expect("a trellis-proxy container");
    let uid = sidecar["securityContext"]["runAsUser"].as_u64().unwrap();
    assert!(
        rules.contains(&format!("--uid-owner {uid} -j RETURN")),
        "{rules}"
    );
    let caps = &init["securityContext"]["capabilities"]["add"];
    assert_eq!(strings(caps), ["NET_ADMIN", "NET_RAW"]);
    for c in spec["containers"].as_sequence().unwrap() {
        assert!(
            c["securityContext"]["capabilities"]["add"].is_null(),
            "{:?} adds capabilities",
            c["name"]
        );
    }
    let help = Command::new(PROXY).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in strings(&sidecar["args"]) {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")),
            "{flag} is not a trellis-proxy flag"
        );
    }
}

/// The `trellis-control` binary of this build, built first when this test runs alone.
fn control_binary() -> PathBuf {
    let dir = Path::new(PROXY).parent().unwrap();
    let bin = dir.join("trellis-control");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "trellis-control",
            "--manifest-path",
            manifest,
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cannot build trellis-control"
        );
    }
    bin
}

/// The namespaces, the processes in them and their logs; all removed on drop, panic or not.
struct Lab {
    node: String,
    pod_a: String,
    pod_b: String,
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    created: Vec<String>,
}

impl Lab {
    fn new() -> Self {
        let id = std::process::id();
        Lab {
            node: format!("trl{id}n"),
            pod_a: format!("trl{id}a"),
            pod_b: format!("trl{id}b"),
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
            created: Vec::new(),
        }
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Node and pods, a veth pair per pod, a default route in each pod via the node.
    fn build(&mut self) {
        for ns in [self.node.clone(), self.pod_a.clone(), self.pod_b.clone()] {
            self.ip(&["netns", "add", &ns]);
            self.created.push(ns.clone());
            self.ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let id = std::process::id();
        let node = self.node.clone();
        for (pod, tag, node_ip, pod_ip) in [
            (self.pod_a.clone(), "a", NODE_A, POD_A),
            (self.pod_b.clone(), "b", NODE_B, POD_B),
        ] {
            let veth = format!("tn{tag}{id}");
            self.ip(&[
                "link", "add", &veth, "netns", &node, "type", "veth", "peer", "name", "eth0",
                "netns", &pod,
            ]);
            self.ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{node_ip}/30"),
                "dev",
                &veth,
            ]);
            self.ip(&["-n", &node, "link", "set", &veth, "up"]);
            self.ip(&[
                "-n",
                &pod,
                "addr",
                "add",
                &format!("{pod_ip}/30"),
                "dev",
                "eth0",
            ]);
            self.ip(&["-n", &pod, "link", "set", "eth0", "up"]);
            self.ip(&["-n", &pod, "route", "add", "default", "via", node_ip]);
        }
        self.run_ok(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    }

    /// Runs `argv` in `ns` and returns its stdout; fails the test on a non-zero exit.
    fn run_ok(&mut self, ns: &str, argv: &[&str]) -> String {
        let out = self.run(ns, None, argv, &[]);
        assert!(
            out.status.success(),
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn command(ns: &str, uid: Option<&str>, argv: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            cmd.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        cmd.args(argv);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&mut self, ns: &str, uid: Option<&str>, argv: &[&str], env: &[(&str, &str)]) -> Output {
        Self::command(ns, uid, argv, env).output().unwrap()
    }

    /// Starts a long-running process in `ns`, its output logged to a file; returns its pid
    /// (`ip netns exec` and `setpriv` exec, so it is the program's own).
    fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        uid: Option<&str>,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Self::command(ns, uid, argv, env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        pid
    }

    fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A sidecar as UID 1337 in `ns`, fed by the controller on the node's address.
    fn sidecar(&mut self, ns: &str, id: &str, app: &str, control: &str, labels: &[&str]) -> u32 {
        let xds = format!("{control}:{CONTROL_PORT}");
        let app_label = format!("app={app}");
        let mut argv = vec![
            PROXY,
            "--xds",
            &xds,
            "--role",
            "sidecar",
            "--namespace",
            "demo",
            "--node-id",
            id,
            "--label",
            &app_label,
            "--workers",
            "1",
        ];
        for l in labels {
            argv.extend(["--label", l]);
        }
        self.spawn(&format!("sidecar-{id}"), ns, Some(PROXY_UID), &argv, &[])
    }

    /// Runs this binary as a helper in `ns` as `uid` and returns its `RESULT` line.
    fn helper(&mut self, ns: &str, uid: &str, role: &str) -> String {
        let me = std::env::current_exe().unwrap();
        let me = me.to_str().unwrap();
        let argv = [me, "--exact", TEST_NAME, "--nocapture", "--test-threads=1"];
        let out = self.run(ns, Some(uid), &argv, &[(HELPER_ENV, role)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout
            .lines()
            .find_map(|l| Some(l.split_once("RESULT ")?.1))
        {
            Some(r) => r.to_owned(),
            None => panic!(
                "helper {role:?} gave no result: {}\n{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// curl from pod A's application until it answers 200 (bounded); returns the body.
    fn poll_curl(&mut self, url: &str) -> String {
        let pod_a = self.pod_a.clone();
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.run(
                &pod_a,
                Some(APP_UID),
                &["curl", "-sS", "-f", "--max-time", "5", url],
                &[],
            );
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "curl {url} from pod A never succeeded: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn metrics(&mut self, ns: &str) -> String {
        self.run_ok(
            ns,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:15000/metrics",
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for (name, _) in &self.children {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")));
                let log = log.unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- {name} (last lines) ---");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Deleting a namespace deletes its end of each veth pair, and so the pair.
        for ns in &self.created {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Sum of the samples on the lines of Prometheus text containing every one of `needles`.
fn sum(metrics: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "trellis-proxy", "pid {pid} is not the sidecar");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

// ---- the helper: what this binary does inside a namespace ----

fn helper(role: &str) {
    let words: Vec<&str> = role.split_whitespace().collect();
    let result = match words[..] {
        ["app", name] => app(name),
        ["http", addr, n] => latency(n, |s| http_get(s, addr), addr),
        ["echo", addr, n] => latency(n, echo_round_trip, addr),
        ["banner", addr] => banner(addr),
        ["reach", addr] => reach(addr),
        _ => format!("unknown helper role {role:?}"),
    };
    // On its own line: the test harness has printed "test ... " before it.
    println!("\nRESULT {result}");
}

/// The application: HTTP and echo on the mesh ports and the direct ones, and the banner.
fn app(name: &str) -> String {
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    let mut threads = Vec::new();
    for (port, kind) in [
        (HTTP, "http"),
        (DIRECT_HTTP, "http"),
        (ECHO, "echo"),
        (DIRECT_ECHO, "echo"),
        (BANNER, "banner"),
    ] {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || serve(s, kind, name));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    "app exited".into()
}

fn serve(mut s: TcpStream, kind: &str, name: &str) {
    let _ = s.set_nodelay(true);
    match kind {
        "http" => {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let body = format!("hello from {name}\n");
            loop {
                // The request head; these clients send no body.
                let mut line = String::new();
                let mut got_any = false;
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == "\r\n" && got_any {
                        break;
                    }
                    got_any = true;
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        }
        "banner" => {
            let _ = s.write_all(format!("220 {name} banner\r\n").as_bytes());
            copy_back(s);
        }
        _ => copy_back(s),
    }
}

fn copy_back(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `n` operations on one connection, timed one by one: "ok p50=..us p99=..us".
fn latency(n: &str, op: impl Fn(&mut TcpStream) -> Result<(), String>, addr: &str) -> String {
    let n: usize = n.parse().unwrap();
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("connect {addr}: {e}"),
    };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        if let Err(e) = op(&mut s) {
            return format!("operation {i} on {addr}: {e}");
        }
        samples.push(start.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!(
        "ok p50={}us p99={}us",
        at(0.50).as_micros(),
        at(0.99).as_micros()
    )
}

fn http_get(s: &mut TcpStream, addr: &str) -> Result<(), String> {
    let req = format!("GET / HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // Read the head byte by byte up to the blank line, then content-length bytes.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err("closed in the response head".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(format!("response {head:?}"));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    if !body.starts_with(b"hello from ") {
        return Err(format!("body {:?}", String::from_utf8_lossy(&body)));
    }
    Ok(())
}

fn echo_round_trip(s: &mut TcpStream) -> Result<(), String> {
    let msg = [b'x'; 64];
    s.write_all(&msg).map_err(|e| e.to_string())?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).map_err(|e| e.to_string())?;
    if back != msg {
        return Err("echo changed the bytes".into());
    }
    Ok(())
}

/// Connects and, sending nothing, waits for the server's first line.
fn banner(addr: &str) -> String {
    let s = match connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("connect {addr}: {e}"),
    };
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(_) => line.trim_end().to_owned(),
        Err(e) => format!("read {addr}: {e}"),
    }
}

/// "ok" when a round trip to the echo server at `addr` works.
fn reach(addr: &str) -> String {
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(e) => return format!("connect {addr}: {e}"),
    };
    match echo_round_trip(&mut s) {
        Ok(()) => {
            let _ = s.shutdown(Shutdown::Both);
            "ok".into()
        }
        Err(e) => format!("round trip {addr}: {e}"),
    }
}
