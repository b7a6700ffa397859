//! Hostile bootstrap files (an alias bomb, deeply nested brackets, a huge or endless file) are
//! refused quickly with an error naming the file and the limit, at start and on reload, without
//! aborting the process or stalling the requests a single-worker proxy is serving.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{
    process::{Running, capped, output_within},
    *,
};
use http_body_util::{BodyExt, Full};

/// 1 GiB of address space: ample for the proxy, far below what an unbounded expansion takes.
const MEMORY_CAP_KIB: u64 = 1024 * 1024;

/// About 1 MB of YAML whose aliases expand to billions of values: ten levels of ten-fold
/// references, then lines of references to the top level. Everything sits inside one cluster
/// endpoint, which is buffered whole before its shape is checked, so the expansion happens.
fn alias_bomb() -> String {
    let mut yaml = String::from(
        "listeners: []\nclusters:\n  - name: c\n    endpoints:\n      - - &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for level in 1..10 {
        let refs = vec![format!("*a{}", level - 1); 10].join(", ");
        yaml.push_str(&format!("        - &a{level} [{refs}]\n"));
    }
    while yaml.len() < 1_000_000 {
        yaml.push_str("        - [*a9, *a9, *a9, *a9, *a9, *a9, *a9, *a9, *a9, *a9]\n");
    }
    yaml
}

/// 100,000 nested flow sequences.
fn deep_brackets() -> String {
    format!(
        "listeners: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    )
}

/// Runs the binary on `path` under the memory cap; returns its exit status, stderr and how long
/// it took.
fn run_capped(path: &Path) -> (std::process::ExitStatus, String, Duration) {
    let started = Instant::now();
    let out = output_within(
        capped(MEMORY_CAP_KIB)
            .args(["--config", path.to_str().unwrap(), "--workers", "1"])
            .args(["--admin", "127.0.0.1:0"]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status, stderr, started.elapsed())
}

fn assert_refused_at_start(path: &Path, want: &str) {
    let (status, stderr, took) = run_capped(path);
    assert_eq!(
        status.code(),
        Some(1),
        "refused with exit code 1, not killed or started ({status:?}):\n{stderr}"
    );
    let named = format!("error: {}: ", path.display());
    assert!(stderr.contains(&named), "want {named:?} in:\n{stderr}");
    assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    // Generous for an unoptimised build on a busy machine: the walk of a million values takes
    // 5 s there on an idle core, 14 s with the other tests running; unbounded, the walk ran for
    // minutes and the memory cap ended it.
    assert!(took < Duration::from_secs(30), "took {took:?} to refuse");
    println!("{}: refused in {took:?}", path.display());
}

#[test]
fn an_alias_bomb_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.yaml");
    std::fs::write(&path, alias_bomb()).unwrap();
    assert_refused_at_start(&path, "aliases expand to more than 1000000 values");
}

#[test]
fn deeply_nested_brackets_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.yaml");
    std::fs::write(&path, deep_brackets()).unwrap();
    assert_refused_at_start(&path, "flow collections nested deeper than 64 levels");
}

#[test]
fn a_file_over_the_size_limit_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    // Comments only: valid YAML, so only the size can refuse it.
    let line = format!("# {}\n", "x".repeat(1021));
    std::fs::write(&path, line.repeat(17 * 1024)).unwrap();
    assert_refused_at_start(&path, "larger than the 16 MiB limit");
}

#[test]
fn an_endless_file_is_read_with_a_bound() {
    assert_refused_at_start(Path::new("/dev/zero"), "larger than the 16 MiB limit");
}

/// One GET with its own deadline; `None` if it failed or took longer.
async fn answered_within(client: &TestClient, url: &str, limit: Duration) -> Option<Vec<u8>> {
    let req = http::Request::get(url).body(Full::default()).unwrap();
    let resp = tokio::time::timeout(limit, client.request(req))
        .await
        .ok()?
        .ok()?;
    let body = tokio::time::timeout(limit, resp.into_body().collect())
        .await
        .ok()?
        .ok()?;
    Some(body.to_bytes().to_vec())
}

#[tokio::test]
async fn hostile_reloads_are_refused_while_a_single_worker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let good = config(
        "          - { name: d, direct_response: { status: 200, body: \"one\" } }",
        "  []",
    );
    std::fs::write(&path, &good).unwrap();
    let mut proxy = Running::start_with_memory_cap(&path, &[], MEMORY_CAP_KIB);
    let url = format!("http://{}/", proxy.listener_addr());
    let client = h1_client();
    assert_eq!(
        answered_within(&client, &url, Duration::from_secs(5))
            .await
            .as_deref(),
        Some(&b"one"[..])
    );

    let hostile = [
        (
            "deep brackets",
            deep_brackets(),
            "nested deeper than 64 levels",
        ),
        ("alias bomb", alias_bomb(), "aliases expand to more than"),
    ];
    for (what, yaml, want) in hostile {
        std::fs::write(&path, yaml).unwrap();
        proxy.signal("-HUP");
        let started = Instant::now();
        let mut requests = 0;
        let rejected = loop {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{what}: no rejection within 60s"
            );
            let body = answered_within(&client, &url, Duration::from_secs(2)).await;
            requests += 1;
            assert_eq!(
                body.as_deref(),
                Some(&b"one"[..]),
                "{what}: request {requests} not answered within 2s ({:?} after SIGHUP)",
                started.elapsed()
            );
            assert!(proxy.alive(), "{what}: the proxy exited");
            if let Some(line) = proxy.logged("reload rejected") {
                break line;
            }
        };
        assert!(
            rejected.contains(want),
            "{what}: want {want:?} in {rejected}"
        );
        println!(
            "{what}: {requests} requests answered while the reload was refused in {:?}",
            started.elapsed()
        );
    }
    assert!(proxy.alive());

    // The serving path is intact: a good reload still applies.
    std::fs::write(&path, good.replace("\"one\"", "\"two\"")).unwrap();
    proxy.signal("-HUP");
    proxy.wait_for("configuration reloaded");
    assert_eq!(
        answered_within(&client, &url, Duration::from_secs(5))
            .await
            .as_deref(),
        Some(&b"two"[..])
    );
}

#[tokio::test]
async fn a_reload_blocked_on_a_named_pipe_holds_up_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        config(
            "          - { name: d, direct_response: { status: 200, body: \"one\" } }",
            "  []",
        ),
    )
    .unwrap();
    let mut proxy = Running::start(&path, &[]);
    let url = format!("http://{}/", proxy.listener_addr());
    let client = h1_client();

    // Opening a pipe nobody writes to blocks the reader until a writer comes, which here is never.
    std::fs::remove_file(&path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    proxy.signal("-HUP");
    proxy.signal("-HUP");
    for request in 0..50 {
        let body = answered_within(&client, &url, Duration::from_secs(2)).await;
        assert_eq!(body.as_deref(), Some(&b"one"[..]), "request {request}");
    }
    assert!(proxy.alive());

    // Shutting down does not wait for the blocked read either.
    proxy.terminate();
    let (status, _) = proxy.exited_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}

#[test]
fn every_example_is_within_the_limits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            if let Err(e) = trellis_proxy::read_bootstrap(&path) {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "found only {checked} examples");
}

#[tokio::test]
async fn a_sighup_during_start_up_does_not_kill_the_proxy() {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    let mut proxy = Running::start(&path, &[]);

    // Opening a pipe's write end without blocking succeeds only once a reader has it open: then
    // the proxy is in the middle of loading its file.
    const O_NONBLOCK: i32 = 0o4000; // Linux
    let started = Instant::now();
    let mut pipe = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&path)
        {
            Ok(pipe) => break pipe,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                assert!(proxy.alive(), "the proxy exited before reading its file");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the proxy never opened its file: {e}"),
        }
    };
    proxy.signal("-HUP");
    let yaml = config(
        "          - { name: d, direct_response: { status: 200, body: \"one\" } }",
        "  []",
    );
    pipe.write_all(yaml.as_bytes()).unwrap();
    drop(pipe);

    let url = format!("http://{}/", proxy.listener_addr());
    let client = h1_client();
    let body = answered_within(&client, &url, Duration::from_secs(5)).await;
    assert_eq!(body.as_deref(), Some(&b"one"[..]));
    assert!(proxy.alive());
}
