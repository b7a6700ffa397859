//! A bootstrap file that gives the proxy nothing to serve (no listeners and no control plane) is
//! refused at start and on reload, instead of a proxy that reports ready and serves nothing.

mod common;

use std::{process::Command, time::Duration};

use common::{
    process::{BIN, Running, output_within},
    *,
};

fn direct(body: &str) -> String {
    config(
        &format!("          - {{ name: d, direct_response: {{ status: 200, body: \"{body}\" }} }}"),
        "  []",
    )
}

#[test]
fn a_file_with_nothing_to_serve_is_refused_at_start() {
    let cases = [
        ("empty", ""),
        ("comments only", "# nothing here yet\n"),
        ("null document", "~\n"),
        (
            "clusters only",
            "clusters: [{ name: c, endpoints: [\"127.0.0.1:1\"] }]\n",
        ),
        ("xds without an address", "xds: { node_id: n }\n"),
    ];
    for (what, yaml) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = output_within(
            Command::new(BIN).args(["--config", path.to_str().unwrap(), "--admin", "127.0.0.1:0"]),
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: must be refused:\n{stderr}"
        );
        let want = format!("error: {}: nothing to serve: ", path.display());
        assert!(
            stderr.contains(&want),
            "{what}: want {want:?} in:\n{stderr}"
        );
    }
}

#[test]
fn a_file_without_listeners_is_enough_with_a_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, "").unwrap();
    // Nothing listens on port 1: the proxy keeps trying, which is all this test needs.
    let proxy = Running::start(&path, &["--xds", "127.0.0.1:1"]);
    proxy.wait_for("using the control plane");
    proxy.wait_for("trellis-proxy started");
}

#[tokio::test]
async fn a_reload_to_a_file_with_nothing_to_serve_keeps_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, direct("one")).unwrap();
    let mut proxy = Running::start(&path, &[]);
    let url = format!("http://{}/", proxy.listener_addr());
    let client = h1_client();
    assert_eq!(&get(&client, &url).await.1[..], b"one");

    std::fs::write(&path, "").unwrap();
    proxy.signal("-HUP");
    let rejected = proxy.wait_for("reload rejected");
    assert!(rejected.contains("nothing to serve"), "{rejected}");
    assert_eq!(&get(&client, &url).await.1[..], b"one");
    assert!(proxy.alive());
}
