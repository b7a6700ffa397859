//! The real `trellis-control` binary as an operator runs it: started on a manifests directory
//! with ports chosen by the kernel (read back from its log), stopped by a signal while a proxy's
//! discovery stream is open, and asked for `status` about manifests it cannot use.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::discovery::v1::{
    self as api, DeltaDiscoveryRequest, aggregated_discovery_client::AggregatedDiscoveryClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-control");
/// Bound on start-up and on every wait below: a test fails rather than hangs.
const WAIT: Duration = Duration::from_secs(10);
/// How soon after SIGTERM/SIGINT the controller must be gone.
const STOP_WITHIN: Duration = Duration::from_secs(3);

/// A running controller; killed on drop if a test failed before stopping it.
struct Running {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    /// The log lines after start-up, as they arrive.
    log: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts the binary on a copy of the mesh fixtures plus `extra` files, and waits for its
    /// "serving" line, which names the addresses it bound.
    fn start(extra: &[(&str, &str)]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh");
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        for (name, text) in extra {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut child = Command::new(BIN)
            .args(["serve", "--manifests"])
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("controller: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        let (grpc, admin) = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = log
                .recv_timeout(left)
                .expect("the controller logs `serving` in time");
            if line.contains(" serving") {
                break (field(&line, "listen"), field(&line, "admin"));
            }
        };
        Running {
            child,
            grpc,
            admin,
            log,
            _dir: dir,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the log has (or gets, within `WAIT`) a line containing every one of `parts`.
    fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if parts.iter().all(|p| line.contains(p)) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {parts:?}"),
            }
        }
    }
}

/// `key=value` from a log line.
fn field(line: &str, key: &str) -> SocketAddr {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 1;
    let value = line[start..].split_whitespace().next().unwrap();
    value
        .parse()
        .unwrap_or_else(|e| panic!("{key}={value}: {e}"))
}

/// Opens a discovery stream as a sidecar and waits for its first response, so the stream is
/// established and held open (the request side stays open until the returned sender drops).
async fn open_stream(
    grpc: SocketAddr,
) -> (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<api::DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(api::Node {
            id: "sidecar-held-open".into(),
            role: api::Role::Sidecar.into(),
            namespace: "shop".into(),
            ..Default::default()
        }),
        type_url: api::CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .delta_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("a first response in time")
        .expect("stream ok")
        .expect("stream open");
    assert_eq!(first.type_url, api::CLUSTER_TYPE);
    (tx, inbound)
}

async fn stops_on(signal: &str) {
    let mut controller = Running::start(&[]);
    let (_requests, mut inbound) = open_stream(controller.grpc).await;
    let sent = Instant::now();
    controller.signal(signal);
    let exit = controller.wait_exit(STOP_WITHIN);
    let took = sent.elapsed();
    let Some(exit) = exit else {
        panic!("still running {STOP_WITHIN:?} after SIG{signal} with a stream open");
    };
    eprintln!("SIG{signal}: exited {exit} after {took:?}");
    assert!(exit.success(), "SIG{signal}: exit status {exit}");
    // The stream was ended from the server side, with a status a proxy reconnects on.
    let end = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("the stream ends");
    match end {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        Ok(None) => {}
        Ok(Some(r)) => panic!("unexpected response after the stop: {r:?}"),
    }
}

#[tokio::test]
async fn sigterm_with_an_open_stream_exits_zero_promptly() {
    stops_on("TERM").await;
}

#[tokio::test]
async fn sigint_with_an_open_stream_exits_zero_promptly() {
    stops_on("INT").await;
}
