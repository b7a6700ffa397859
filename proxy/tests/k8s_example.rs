//! `examples/k8s/pod-drain.yaml` fits the drain sequence: the grace period outlasts the drain
//! delay, the drain timeout and the cut, the flags are ones the proxy takes, and the proxy
//! configuration it mounts is valid.

use std::time::Duration;

use serde_yaml::Value;
use trellis_proxy::config::{duration::parse_duration, validate};

fn documents() -> Vec<Value> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/k8s/pod-drain.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in the example"))
}

/// The value of `--name=value` in the container's arguments.
fn flag(args: &[Value], name: &str) -> Duration {
    let prefix = format!("--{name}=");
    let value = args
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} among {args:?}"));
    parse_duration(value).unwrap()
}

#[test]
fn the_grace_period_outlasts_the_drain() {
    let docs = documents();
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let args = pod["containers"][0]["args"].as_sequence().unwrap();
    let delay = flag(args, "drain-delay");
    let timeout = flag(args, "drain-timeout");
    // The cut and the exit take up to a second after the timeout.
    assert!(
        delay + timeout + Duration::from_secs(1) < grace,
        "{delay:?} + {timeout:?} + 1s must stay under the {grace:?} grace period"
    );
    assert!(
        delay > Duration::ZERO,
        "a drain delay gives endpoints time to update"
    );
}

#[test]
fn the_mounted_configuration_is_valid() {
    let docs = documents();
    let text = kind(&docs, "ConfigMap")["data"]["proxy.yaml"]
        .as_str()
        .unwrap();
    validate::from_yaml(text).unwrap_or_else(|e| panic!("proxy.yaml is invalid:\n{e}"));
    let file: trellis_proxy::config::bootstrap::File = serde_yaml::from_str(text).unwrap();
    assert_eq!(
        file.drain_delay.as_deref().map(parse_duration),
        Some(Ok(Duration::from_secs(5)))
    );
}
