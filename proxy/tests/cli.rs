//! The `trellis-proxy` binary: invalid files and flags are refused naming the value, SIGHUP
//! reloads, a bad reload keeps the old config, SIGTERM exits 0.

mod common;

use std::process::Command;

use common::{
    process::{BIN, Running},
    *,
};

fn run_invalid(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an invalid file must not start the proxy"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invalid_files_name_the_field_and_value() {
    let base = |route: &str| {
        format!(
            r#"
listeners: [{{ name: main, address: "127.0.0.1:0" }}]
clusters: [{{ name: c, endpoints: ["127.0.0.1:1"] }}]
route_configs:
  - name: rc
    virtual_hosts:
      - name: v
        domains: ["*"]
        routes:
          - {route}
"#
        )
    };
    let cases = [
        (
            base(r#"{ match: { path: { regex: "(" } }, forward: { cluster: c } }"#),
            r#"route_configs[0].virtual_hosts[0].routes[0].match.path.regex: regex "(" does not compile"#,
        ),
        (
            base("{ forward: { cluster: missing } }"),
            r#"route_configs[0].virtual_hosts[0].routes[0].forward.cluster: cluster "missing" is not defined"#,
        ),
        (
            base("{ redirect: { path: /x, status: 200 } }"),
            "route_configs[0].virtual_hosts[0].routes[0].redirect.status: 200 is not a redirect status",
        ),
        (
            base("{ forward: { cluster: c }, timeout: 5 }"),
            r#"route_configs[0].virtual_hosts[0].routes[0].timeout: "5" is not a duration"#,
        ),
        (
            base("{ match: { path: { exact: nope } }, forward: { cluster: c } }"),
            r#"route_configs[0].virtual_hosts[0].routes[0].match.path.exact: "nope" must start with "/""#,
        ),
        (
            base("{ match: { headers: [{ name: x, regex: \"[\" }] }, forward: { cluster: c } }"),
            r#"route_configs[0].virtual_hosts[0].routes[0].match.headers[0].regex: regex "[" does not compile"#,
        ),
        (
            base("{ forward: { cluster: c }, direct_response: { status: 200 } }"),
            "route_configs[0].virtual_hosts[0].routes[0]: a route needs exactly one of",
        ),
        (
            base(
                "{ forward: { cluster: c }, filters: { rewrite: { prefix: / } }, match: { path: { exact: /a } } }",
            ),
            "route_configs[0].virtual_hosts[0].routes[0].filters.rewrite.prefix: replacing a prefix needs",
        ),
        (
            base("{ forward: { cluster: c }, frobnicate: true }"),
            "unknown field `frobnicate`",
        ),
        (
            r#"listeners: [{ name: main, address: "localhost:80" }]"#.to_owned(),
            r#"listeners[0].address: "localhost:80" is not an IP:port socket address"#,
        ),
        (
            r#"clusters: [{ name: c, endpoints: ["127.0.0.1:1"], protocol: http3 }]"#.to_owned(),
            r#"clusters[0].protocol: unknown protocol "http3""#,
        ),
    ];
    for (yaml, want) in cases {
        let stderr = run_invalid(&yaml);
        assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let stderr = run_invalid(
        r#"
listeners: [{ name: main, address: "nope", route_config: missing }]
clusters: [{ name: c, endpoints: ["1.2.3"], connect_timeout: fast }]
"#,
    );
    for want in [
        "listeners[0].address",
        "listeners[0].route_config",
        "clusters[0].endpoints[0]",
        "clusters[0].connect_timeout",
    ] {
        assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    }
}

#[test]
fn a_drain_timeout_without_a_unit_is_refused() {
    let out = Command::new(BIN)
        .args(["--config", "unused.yaml", "--drain-timeout", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--drain-timeout") && stderr.contains(r#""5" is not a duration"#),
        "{stderr}"
    );
}

fn direct(body: &str) -> String {
    config(
        &format!("          - {{ name: d, direct_response: {{ status: 200, body: \"{body}\" }} }}"),
        "  []",
    )
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_reload_keeps_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, direct("one")).unwrap();
    let mut proxy = Running::start(&path, &[]);
    let line = proxy.wait_for("listening");
    let addr = line
        .split("local=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("listening line names the address")
        .to_owned();
    let url = format!("http://{addr}/");
    let client = h1_client();
    assert_eq!(&get(&client, &url).await.1[..], b"one");

    std::fs::write(&path, direct("two")).unwrap();
    proxy.signal("-HUP");
    proxy.wait_for("configuration reloaded");
    assert_eq!(&get(&client, &url).await.1[..], b"two");

    std::fs::write(&path, "listeners: [{ name: main, address: nope }]").unwrap();
    proxy.signal("-HUP");
    let rejected = proxy.wait_for("reload rejected");
    assert!(rejected.contains("listeners[0].address"), "{rejected}");
    assert_eq!(&get(&client, &url).await.1[..], b"two");

    proxy.signal("-TERM");
    let status = tokio::task::spawn_blocking(move || proxy.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
}
