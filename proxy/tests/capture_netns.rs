//! The original destination for real: iptables REDIRECT rules (IPv4 and IPv6) in a network
//! namespace this test creates and deletes, a capture listener reading `SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST`. The namespace holds its own loopback and the service addresses
//! 10.96.0.10 and fd00::10 on it; nothing leaves it.
//!
//! The test binary runs itself again inside the namespace (`ip netns exec`), where the part
//! marked `#[ignore]` does the work; it needs root, `ip`, `iptables` and `setpriv` (a client
//! running as another user, as an application in a pod), and says why it skipped
//! without them.

mod common;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};

/// Set in the environment of the run inside the namespace.
const INSIDE: &str = "TRELLIS_CAPTURE_NETNS";
const INNER_TEST: &str = "inside_the_namespace";

/// Deletes the namespace, and the rules in it, however the test ends.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn missing(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
}

/// A TCP echo server bound to `address` in the namespace.
async fn echo_on(address: &str) -> std::net::SocketAddr {
    let listener = TcpListener::bind(address).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Redirects the namespace's outgoing TCP matching `matching` to `port` on loopback.
fn redirect(matching: &[&str], port: u16) {
    let port = port.to_string();
    let mut args = vec!["-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
    args.extend_from_slice(matching);
    args.extend_from_slice(&["-j", "REDIRECT", "--to-ports", &port]);
    run("iptables", &args).unwrap();
}

#[test]
fn original_destination_through_iptables_in_a_network_namespace() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: creating a network namespace and iptables rules needs root");
        return;
    }
    for program in ["ip", "iptables", "ip6tables", "setpriv"] {
        if missing(program) {
            println!("skipped: {program} is not installed");
            return;
        }
    }
    let ns = Namespace(format!("trellis-capture-{}", std::process::id()));
    run("ip", &["netns", "add", &ns.0]).expect("namespace created");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args([
            "--exact",
            INNER_TEST,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(INSIDE, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("test binary runs in the namespace");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.is_some_and(|s| s.success()),
        "inside the namespace: {status:?}\n{out}\n{err}"
    );
    assert!(
        out.contains(&format!("test {INNER_TEST} ... ok")) && out.contains("1 passed"),
        "the inner test did not run:\n{out}"
    );
}

#[tokio::test]
#[ignore = "runs inside the namespace made by original_destination_through_iptables_in_a_network_namespace"]
async fn inside_the_namespace() {
    if std::env::var_os(INSIDE).is_none() {
        println!("skipped: only meaningful inside the namespace the other test makes");
        return;
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", "10.96.0.10/32", "dev", "lo"],
        &["-6", "addr", "add", "fd00::10/128", "dev", "lo", "nodad"],
    ] {
        run("ip", args).unwrap();
    }
    let (web, _) = echo_upstream("web").await;
    let yaml = format!(
        r#"
listeners:
  - name: out4
    address: 127.0.0.1:0
    protocol: capture
    unknown_destination: block
    services: [{{ ip: 10.96.0.10, port: 80, cluster: web }}]
  - name: out6
    address: "[::1]:0"
    protocol: capture
    unknown_destination: block
    services: [{{ ip: "fd00::10", port: 80, cluster: web }}]
  - name: out-allow
    address: 127.0.0.1:0
    protocol: capture
  - name: in-allow
    address: 127.0.0.1:0
    protocol: capture
    direction: inbound
clusters:
  - {{ name: web, endpoints: ["{web}"] }}
"#
    );
    let (proxy, out4) = start_named(&yaml, "out4").await;
    let out6 = proxy.listener_addr("out6").await.unwrap();
    let (admin, _) = start_admin(&proxy).await;
    // Ports 80 and 81 of the service addresses go to the capture listeners; the proxy's own
    // connections (to 127.0.0.1) are not redirected.
    for (tool, dest, port) in [
        ("iptables", "10.96.0.10", out4.port()),
        ("ip6tables", "fd00::10", out6.port()),
    ] {
        run(
            tool,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                dest,
                "-m",
                "multiport",
                "--dports",
                "80,81",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port.to_string(),
            ],
        )
        .unwrap();
    }

    for url in ["http://10.96.0.10/v4", "http://[fd00::10]/v6"] {
        let (resp, body) = get(&h1_client(), url).await;
        assert_eq!(resp.status(), 200, "{url}");
        assert_eq!(seen(&body).server, "web", "{url}");
    }
    // Port 81 is redirected too but is in no table: its original port was read, so it is
    // blocked (its local address, the listener's, would not be in the table either; port 80's
    // answer above shows the table saw the original destination).
    for dest in ["10.96.0.10:81", "[fd00::10]:81"] {
        let mut s = TcpStream::connect(dest).await.expect("redirected");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed within 5s")
            .unwrap_or(0);
        assert_eq!(n, 0, "{dest} closed without a byte");
    }

    // Inbound, unknown port, allowed: to where it was going, the pod's own address, as Istio
    // does since 1.10 — never to loopback, where a socket bound to 127.0.0.1 only (a debug
    // endpoint) must stay out of reach from outside the pod. As in a pod, the proxy's own
    // connection is not redirected again: only the caller's user is.
    let app = echo_on("10.96.0.10:0").await;
    let private = echo_on("127.0.0.1:0").await;
    let in_allow = proxy.listener_addr("in-allow").await.unwrap();
    for port in [app.port(), private.port()] {
        redirect(
            &[
                "-d",
                "10.96.0.10",
                "--dport",
                &port.to_string(),
                "-m",
                "owner",
                "--uid-owner",
                "65534",
            ],
            in_allow.port(),
        );
    }
    let as_caller = |port: u16| {
        let script = format!("exec 3<>/dev/tcp/10.96.0.10/{port}; printf hello >&3; head -c 5 <&3");
        Command::new("timeout")
            .args(["10", "setpriv", "--reuid", "65534", "--regid", "65534"])
            .args(["--clear-groups", "bash", "-c", &script])
            .output()
            .expect("setpriv runs")
    };
    let (app_port, private_port) = (app.port(), private.port());
    let (reached, hidden) =
        tokio::task::spawn_blocking(move || (as_caller(app_port), as_caller(private_port)))
            .await
            .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reached.stdout),
        "hello",
        "{}",
        String::from_utf8_lossy(&reached.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&hidden.stdout),
        "",
        "a loopback-only socket is not reachable through the inbound capture"
    );

    // Outbound, unknown destination, allowed: to where it was going. As in a pod, only the
    // application's user is redirected, so the proxy's own connection to the destination is not
    // redirected again.
    let elsewhere = echo_on("10.96.0.10:0").await;
    let out_allow = proxy.listener_addr("out-allow").await.unwrap();
    redirect(
        &[
            "-d",
            "10.96.0.10",
            "--dport",
            &elsewhere.port().to_string(),
            "-m",
            "owner",
            "--uid-owner",
            "65534",
        ],
        out_allow.port(),
    );
    let script = format!(
        "exec 3<>/dev/tcp/10.96.0.10/{}; printf hello >&3; head -c 5 <&3",
        elsewhere.port()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["10", "setpriv", "--reuid", "65534", "--regid", "65534"])
            .args(["--clear-groups", "bash", "-c", &script])
            .output()
            .expect("setpriv runs")
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let samples = scrape(admin).await;
    for (listener, direction, count) in
        [("out-allow", "outbound", 1.0), ("in-allow", "inbound", 2.0)]
    {
        assert_eq!(
            metric(
                &samples,
                "trellis_capture_unknown_destination_total",
                &[("listener", listener), ("action", "allow")],
            ),
            Some(count),
            "{direction} passthrough went through the capture listener"
        );
    }
    for listener in ["out4", "out6"] {
        assert_eq!(
            metric(
                &samples,
                "trellis_protocol_detection_total",
                &[
                    ("listener", listener),
                    ("protocol", "http1"),
                    ("reason", "detected")
                ],
            ),
            Some(1.0),
            "{listener}"
        );
        assert_eq!(
            metric(
                &samples,
                "trellis_capture_unknown_destination_total",
                &[("listener", listener), ("action", "block")],
            ),
            Some(1.0),
            "{listener}"
        );
    }
}
