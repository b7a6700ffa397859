//! Hosts on the real kernel for sidecar tests: a "node" network namespace and "pods" joined to it
//! by veth pairs (10.200.0.0/24, inside those namespaces only), long-running processes in them
//! with their logs, and small clients and servers that the test binary runs inside a namespace
//! when started again with a role in an environment variable. Everything is removed on drop,
//! panic or not.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The proxy's UID, which the capture rules leave alone.
pub const PROXY_UID: u32 = 1337;

/// Why this machine cannot run a namespace test (not root, a tool missing), if it cannot.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    let uid = std::fs::metadata("/proc/self").map_or(1, |m| m.uid());
    if uid != 0 {
        return Some("needs root (network namespaces and iptables)".into());
    }
    tools
        .iter()
        .find(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|tool| format!("needs {tool} (install iproute2, iptables, util-linux and curl)"))
}

/// A pod: its namespace, its address, and the node's address on its veth (its gateway).
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub ns: String,
    pub ip: String,
    pub gateway: String,
}

/// The namespaces, the processes in them and their logs.
pub struct Lab {
    pub node: String,
    pub pods: Vec<Pod>,
    pub dir: tempfile::TempDir,
    /// The test that runs helper roles, and the variable naming the role.
    helper: (&'static str, &'static str),
    children: Vec<(String, Child)>,
    created: Vec<String>,
}

impl Lab {
    /// Builds the node and `pods` pods: pod `i` at 10.200.0.(4i+2) via the node at
    /// 10.200.0.(4i+1), with IP forwarding on the node. Namespace names start with `prefix`.
    /// `helper` is (the test's name, the environment variable that gives its role).
    pub fn new(prefix: &str, pods: usize, helper: (&'static str, &'static str)) -> Lab {
        let id = std::process::id();
        let mut lab = Lab {
            node: format!("{prefix}{id}n"),
            pods: (0..pods)
                .map(|i| Pod {
                    ns: format!("{prefix}{id}p{i}"),
                    ip: format!("10.200.0.{}", 4 * i + 2),
                    gateway: format!("10.200.0.{}", 4 * i + 1),
                })
                .collect(),
            dir: tempfile::tempdir().unwrap(),
            helper,
            children: Vec::new(),
            created: Vec::new(),
        };
        let node = lab.node.clone();
        let all: Vec<String> = std::iter::once(node.clone())
            .chain(lab.pods.iter().map(|p| p.ns.clone()))
            .collect();
        for ns in all {
            ip(&["netns", "add", &ns]);
            lab.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        for (i, pod) in lab.pods.iter().enumerate() {
            let veth = format!("{prefix}v{i}{id}");
            ip(&[
                "link", "add", &veth, "netns", &node, "type", "veth", "peer", "name", "eth0",
                "netns", &pod.ns,
            ]);
            let node_cidr = format!("{}/30", pod.gateway);
            ip(&["-n", &node, "addr", "add", &node_cidr, "dev", &veth]);
            ip(&["-n", &node, "link", "set", &veth, "up"]);
            let pod_cidr = format!("{}/30", pod.ip);
            ip(&["-n", &pod.ns, "addr", "add", &pod_cidr, "dev", "eth0"]);
            ip(&["-n", &pod.ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &pod.ns,
                "route",
                "add",
                "default",
                "via",
                &pod.gateway,
            ]);
        }
        lab.run_ok(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lab
    }

    /// Runs `argv` in `ns` and returns its stdout; fails the test on a non-zero exit.
    pub fn run_ok(&self, ns: &str, argv: &[&str]) -> String {
        let out = command(ns, None, argv, &[]).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process in `ns`, its stderr logged to `<name>.log`; returns its pid
    /// (`ip netns exec` and `setpriv` exec, so it is the program's own).
    pub fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        uid: Option<&str>,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = command(ns, uid, argv, env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        pid
    }

    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Fails at once when a long-running process has exited (a refused flag, a crash), rather
    /// than at the end of a wait for it.
    pub fn all_running(&mut self) {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited: {status}");
            }
        }
    }

    /// Runs this test binary in `ns` (as `uid`, or root) with helper `role` and returns its
    /// `RESULT` line.
    pub fn helper(&self, ns: &str, uid: Option<&str>, role: &str, env: &[(&str, &str)]) -> String {
        let me = std::env::current_exe().unwrap();
        let me = me.to_str().unwrap();
        let (test, role_env) = self.helper;
        let argv = [me, "--exact", test, "--nocapture", "--test-threads=1"];
        let mut env = env.to_vec();
        env.push((role_env, role));
        let out = command(ns, uid, &argv, &env).output().unwrap();
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

    /// Starts this test binary in `ns` as a long-running helper `role` (an application).
    pub fn spawn_helper(&mut self, name: &str, ns: &str, uid: Option<&str>, role: &str) -> u32 {
        let me = std::env::current_exe().unwrap();
        let me = me.to_str().unwrap().to_owned();
        let (test, role_env) = self.helper;
        let argv = [&me, "--exact", test, "--nocapture", "--test-threads=1"];
        self.spawn(name, ns, uid, &argv, &[(role_env, role)])
    }

    /// One curl from `ns` as `uid`: "<status> <body>", with the `x-trellis-error` (or, relayed
    /// from a proxy further on, `x-trellis-upstream-error`) header line between them when there
    /// is one, or "curl failed: ..." when no response came.
    pub fn curl(&self, ns: &str, uid: &str, url: &str, args: &[&str]) -> String {
        // The head goes to stdout too: a user other than root cannot reopen the test's pipes
        // through /dev/stderr.
        let mut argv = vec!["curl", "-sS", "--max-time", "5", "-D", "-"];
        argv.extend(["-w", "\n%{http_code}"]);
        argv.extend(args);
        argv.push(url);
        let out = command(ns, Some(uid), &argv, &[]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return format!(
                "curl failed: {} {stdout}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let (head, rest) = stdout.split_once("\r\n\r\n").unwrap_or(("", &stdout));
        // `-w` prints the status after the body: move it to the front.
        let (body, code) = rest.rsplit_once('\n').unwrap_or(("", rest));
        let error = head
            .to_ascii_lowercase()
            .lines()
            .find(|l| {
                l.starts_with("x-trellis-error:") || l.starts_with("x-trellis-upstream-error:")
            })
            .map(|l| format!("{} ", l.trim()))
            .unwrap_or_default();
        format!("{code} {error}{body}")
    }

    /// The sidecar's metrics in `ns`, from its admin port on the pod's loopback.
    pub fn metrics(&self, ns: &str) -> String {
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

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `argv` in network namespace `ns`, as `uid` when given (root otherwise).
pub fn command(ns: &str, uid: Option<&str>, argv: &[&str], env: &[(&str, &str)]) -> Command {
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

/// The `trellis-control` binary next to `proxy` (this build's), built first when missing.
pub fn control_binary(proxy: &str) -> PathBuf {
    let dir = Path::new(proxy).parent().unwrap();
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

/// Sum of the samples on the lines of Prometheus text containing every one of `needles`.
pub fn sum(metrics: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// User plus system CPU seconds of the sidecar `pid`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "trellis-proxy", "pid {pid} is not a sidecar");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let per_second: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0);
    ticks as f64 / per_second
}

// ---- clients and servers for inside a namespace ----

pub fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub fn copy_back(mut s: TcpStream) {
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

pub fn echo_round_trip(s: &mut TcpStream) -> Result<(), String> {
    let msg = [b'x'; 64];
    s.write_all(&msg).map_err(|e| e.to_string())?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).map_err(|e| e.to_string())?;
    if back != msg {
        return Err("echo changed the bytes".into());
    }
    Ok(())
}

/// `n` operations on one connection, timed one by one: "ok p50=..us p99=..us".
pub fn latency(n: &str, op: impl Fn(&mut TcpStream) -> Result<(), String>, addr: &str) -> String {
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
    percentiles(samples)
}

pub fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!(
        "ok p50={}us p99={}us",
        at(0.50).as_micros(),
        at(0.99).as_micros()
    )
}

/// `n` connections one after another, each with one echo round trip:
/// "ok p50=..us p99=..us rate=../s".
pub fn connection_rate(addr: &str, n: &str) -> String {
    let n: usize = n.parse().unwrap();
    let started = Instant::now();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let mut s = match connect(addr) {
            Ok(s) => s,
            Err(e) => return format!("connection {i} to {addr}: {e}"),
        };
        if let Err(e) = echo_round_trip(&mut s) {
            return format!("connection {i} to {addr}: {e}");
        }
        samples.push(start.elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    format!("{} rate={rate:.0}/s", percentiles(samples))
}

/// Status and body of one HTTP/1.1 response with a content-length.
pub fn read_response(s: &mut impl Read) -> Result<(u16, String), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) if head.is_empty() => return Err("closed before a response".into()),
            Ok(_) => return Err("closed in the response head".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("response {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
