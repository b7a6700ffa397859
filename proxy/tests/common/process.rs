//! The `trellis-proxy` binary as a child process, for tests of signals, flags and exit codes.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

/// A command that runs the binary under `ulimit -v cap_kib`; arguments added to it go to the
/// binary.
pub fn capped(cap_kib: u64) -> Command {
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!("ulimit -v {cap_kib} && exec \"$0\" \"$@\""),
        BIN,
    ]);
    command
}

/// Runs `command` to its exit, with stderr captured, for at most `limit`; a process still running
/// then is killed and the test fails, so a proxy that starts when it should refuse cannot hang
/// the test.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let text = reader.join().unwrap();
            panic!(
                "still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: reader.join().unwrap(),
    }
}

/// A running binary with its stderr read line by line on a thread.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// Starts the binary on a config file with one worker and the admin API on a free port,
    /// plus `extra` arguments.
    pub fn start(config: &Path, extra: &[&str]) -> Self {
        Self::spawn(Command::new(BIN), config, extra)
    }

    /// Like [`Running::start`], with the process's address space capped at `cap_kib` KiB (`ulimit
    /// -v` in a shell that then execs the binary), so a runaway allocation aborts it instead of
    /// swapping the machine.
    pub fn start_with_memory_cap(config: &Path, extra: &[&str], cap_kib: u64) -> Self {
        Self::spawn(capped(cap_kib), config, extra)
    }

    fn spawn(mut command: Command, config: &Path, extra: &[&str]) -> Self {
        let mut child = command
            .args([
                "--config",
                config.to_str().unwrap(),
                "--workers",
                "1",
                // Port 0: never collide with another proxy on this machine.
                "--admin",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// Starts the binary on `yaml` and returns it with its listener's address.
    pub fn with_config(yaml: &str, extra: &[&str]) -> (Self, SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, yaml).unwrap();
        let running = Running::start(&path, extra);
        let line = running.wait_for("listening");
        let addr = line
            .split("local=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("listening line names the address")
            .parse()
            .unwrap();
        (running, addr, dir)
    }

    /// Waits for the "listening" log line and returns the address it names.
    pub fn listener_addr(&self) -> SocketAddr {
        let line = self.wait_for("listening");
        line.split("local=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("listening line names the address")
            .parse()
            .unwrap()
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The first log line already written that contains `needle`, without waiting; lines read
    /// on the way are dropped.
    pub fn logged(&self, needle: &str) -> Option<String> {
        self.lines.try_iter().find(|line| line.contains(needle))
    }

    /// Waits (at most 10 s) for a log line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no log line containing {needle:?} within 10s"),
            }
        }
    }

    /// Sends a signal, e.g. `-HUP`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Waits (at most `limit`) for the process to exit; returns its status and when it did.
    pub async fn exited_within(mut self, limit: Duration) -> (std::process::ExitStatus, Instant) {
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return Some((status, Instant::now()));
                }
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap();
        waited.unwrap_or_else(|| panic!("the process did not exit within {limit:?}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
