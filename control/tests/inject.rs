//! `trellis-control inject`: every workload kind gets the sidecar, the init container, the label
//! and the token volume; everything else passes through byte for byte; a second run changes
//! nothing; opt-outs and hostNetwork pods are skipped; bad input is an error that names the
//! document and the field.

use std::process::{Command, Stdio};

use serde_yaml::Value;
use trellis_control::inject::{
    self, Action, INIT_NAME, SIDECAR_LABEL, SIDECAR_NAME, Settings, TOKEN_VOLUME,
};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-control");

const SERVICE: &str = "\
# The Service is not a workload: copied as written, comments and flow style included.
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }   # a trailing comment
spec: { selector: { app: web }, ports: [{ port: 80, targetPort: 8080 }] }
";

fn pod_spec(extra: &str) -> String {
    format!(
        "    spec:
      serviceAccountName: web
{extra}      containers:
        - name: app
          image: registry.example/web:1.0
"
    )
}

/// A workload of `kind` whose pod template (at `indent` spaces) carries `extra` spec lines.
fn workload(kind: &str, extra: &str) -> String {
    let template = format!(
        "  template:
    metadata:
      labels: {{ app: web }}
{}",
        pod_spec(extra)
    );
    match kind {
        "Pod" => format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {{ app: web }}
{}",
            unindent(&pod_spec(extra), 4)
        ),
        "CronJob" => format!(
            "apiVersion: batch/v1
kind: CronJob
metadata: {{ name: web, namespace: shop }}
spec:
  schedule: \"*/5 * * * *\"
  jobTemplate:
    spec:
{}",
            indent(&template, 4)
        ),
        "Job" => format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata: {{ name: web, namespace: shop }}\nspec:\n{template}"
        ),
        _ => format!(
            "apiVersion: apps/v1
kind: {kind}
metadata: {{ name: web, namespace: shop }}
spec:
  selector: {{ matchLabels: {{ app: web }} }}
{template}"
        ),
    }
}

fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn unindent(text: &str, n: usize) -> String {
    text.lines().map(|l| format!("{}\n", &l[n..])).collect()
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// The pod template (metadata + spec) of a parsed workload.
fn template(doc: &Value) -> &Value {
    match doc["kind"].as_str().unwrap() {
        "Pod" => doc,
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"],
        _ => &doc["spec"]["template"],
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_sequence()
        .map(|s| s.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn run(text: &str) -> inject::Outcome {
    inject::inject(text, &Settings::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

const KINDS: [&str; 6] = [
    "Pod",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
];

#[test]
fn every_workload_kind_gets_the_sidecar_and_other_kinds_pass_through() {
    let mut input = SERVICE.to_owned();
    for kind in KINDS {
        input.push_str("---\n");
        input.push_str(&workload(kind, "      initContainers:\n        - { name: migrate, image: registry.example/migrate:1 }\n"));
    }
    let outcome = run(&input);
    let actions: Vec<_> = outcome
        .workloads
        .iter()
        .map(|r| (r.index, r.object.as_str(), r.action))
        .collect();
    let expected: Vec<_> = KINDS
        .iter()
        .enumerate()
        .map(|(i, k)| (i + 2, format!("{k} shop/web"), Action::Injected))
        .collect();
    assert_eq!(
        actions,
        expected
            .iter()
            .map(|(i, o, a)| (*i, o.as_str(), *a))
            .collect::<Vec<_>>()
    );
    assert!(
        outcome.output.starts_with(SERVICE),
        "the Service is copied byte for byte:\n{}",
        outcome.output
    );

    let docs = documents(&outcome.output);
    assert_eq!(docs.len(), 7);
    for (doc, kind) in docs[1..].iter().zip(KINDS) {
        let t = template(doc);
        let spec = &t["spec"];
        assert_eq!(
            t["metadata"]["labels"][SIDECAR_LABEL], "true",
            "{kind}: the meshed label"
        );
        assert_eq!(t["metadata"]["labels"]["app"], "web", "{kind}: labels kept");
        // The application's own init container runs first, before capture.
        let job = matches!(kind, "Job" | "CronJob");
        if job {
            assert_eq!(
                names(&spec["initContainers"]),
                ["migrate", INIT_NAME, SIDECAR_NAME],
                "{kind}: a native sidecar, so the job can complete"
            );
            assert_eq!(spec["initContainers"][2]["restartPolicy"], "Always");
            assert_eq!(names(&spec["containers"]), ["app"]);
        } else {
            assert_eq!(
                names(&spec["initContainers"]),
                ["migrate", INIT_NAME],
                "{kind}"
            );
            assert_eq!(names(&spec["containers"]), ["app", SIDECAR_NAME], "{kind}");
            assert!(spec["containers"][1].get("restartPolicy").is_none());
        }
        assert_eq!(names(&spec["volumes"]), [TOKEN_VOLUME], "{kind}");
        let sidecar = spec["containers"]
            .as_sequence()
            .into_iter()
            .chain(spec["initContainers"].as_sequence())
            .flatten()
            .find(|c| c["name"] == SIDECAR_NAME)
            .unwrap();
        assert_eq!(sidecar["image"], inject::DEFAULT_IMAGE);
        assert_eq!(sidecar["securityContext"]["runAsUser"], 1337);
        let args: Vec<_> = sidecar["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"--label=app=web"), "{kind}: {args:?}");
        assert!(args.contains(&"--service-account=$(POD_SERVICE_ACCOUNT)"));
        let env = names(&sidecar["env"]);
        assert_eq!(env, ["POD_NAME", "POD_NAMESPACE", "POD_SERVICE_ACCOUNT"]);
        assert_eq!(
            sidecar["env"][2]["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.serviceAccountName"
        );
        let init = spec["initContainers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == INIT_NAME)
            .unwrap();
        assert_eq!(init["args"][0], "iptables");
        assert_eq!(init["args"][1], "--proxy-uid=1337");
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            Value::from(vec!["NET_ADMIN", "NET_RAW"])
        );
    }
}

#[test]
fn a_second_run_changes_nothing() {
    let mut input = SERVICE.to_owned();
    for kind in KINDS {
        input.push_str("---\n");
        input.push_str(&workload(kind, ""));
    }
    let once = run(&input).output;
    let twice = run(&once);
    assert_eq!(twice.output, once, "byte for byte");
    assert!(
        twice
            .workloads
            .iter()
            .all(|r| r.action == Action::AlreadyInjected),
        "{:?}",
        twice.workloads
    );
    assert_eq!(twice.workloads.len(), KINDS.len());
}

#[test]
fn settings_reach_both_containers() {
    let settings = Settings {
        image: "registry.example/trellis:1.2".into(),
        xds: "control.mesh:18000".into(),
    };
    let out = inject::inject(&workload("Deployment", ""), &settings).unwrap();
    let doc = &documents(&out.output)[0];
    let spec = &template(doc)["spec"];
    assert_eq!(
        spec["initContainers"][0]["image"],
        "registry.example/trellis:1.2"
    );
    assert_eq!(
        spec["containers"][1]["image"],
        "registry.example/trellis:1.2"
    );
    assert_eq!(spec["containers"][1]["args"][0], "--xds=control.mesh:18000");
}

#[test]
fn bad_settings_are_refused() {
    let text = workload("Pod", "");
    for (image, xds, expected) in [
        (
            "",
            inject::DEFAULT_XDS,
            "--image \"\": an image name is not empty",
        ),
        ("a b", inject::DEFAULT_XDS, "--image \"a b\""),
        (
            inject::DEFAULT_IMAGE,
            "control",
            "--xds \"control\": expected host:port",
        ),
        (inject::DEFAULT_IMAGE, "control:x", "--xds \"control:x\""),
        (inject::DEFAULT_IMAGE, ":18000", "--xds \":18000\""),
    ] {
        let settings = Settings {
            image: image.into(),
            xds: xds.into(),
        };
        let err = inject::inject(&text, &settings).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn opted_out_and_host_network_workloads_are_left_alone() {
    let opted_out = workload("Deployment", "").replace(
        "      labels: { app: web }\n",
        "      labels: { app: web }\n      annotations: { trellis.io/inject: \"false\" }\n",
    );
    let host = workload("DaemonSet", "      hostNetwork: true\n");
    let opted_in = workload("StatefulSet", "").replace(
        "      labels: { app: web }\n",
        "      labels: { app: web }\n      annotations: { trellis.io/inject: \"true\" }\n",
    );
    let input = format!("{opted_out}---\n{host}---\n{opted_in}");
    let outcome = run(&input);
    let actions: Vec<_> = outcome.workloads.iter().map(|r| r.action).collect();
    assert_eq!(
        actions,
        [Action::OptedOut, Action::HostNetwork, Action::Injected]
    );
    assert!(
        outcome
            .output
            .starts_with(&format!("{opted_out}---\n{host}---\n")),
        "skipped documents are copied byte for byte"
    );
    assert_eq!(Action::OptedOut.warning(), None);
    assert!(
        Action::HostNetwork
            .warning()
            .unwrap()
            .contains("hostNetwork")
    );
}

#[test]
fn bad_input_names_the_document_and_the_field() {
    let deployment = workload("Deployment", "");
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{SERVICE}---\nkind: [unclosed\n"),
            "document 2 (line 8): not valid YAML: did not find expected ',' or ']' at line 8 column 1, \
             while parsing a flow sequence at line 7 column 7",
        ),
        (
            deployment.replace(
                "      containers:\n        - name: app\n          image: registry.example/web:1.0\n",
                "      containers: { name: app }\n",
            ),
            "document 1 (Deployment shop/web, line 1): `spec.template.spec.containers` must be a \
             list, not a mapping",
        ),
        (
            format!("{SERVICE}---\n{}", deployment.replace("  template:\n", "  tmpl:\n")),
            "document 2 (Deployment shop/web, line 6): `spec.template` is missing",
        ),
        (
            deployment.replace("- name: app", "- name: 7"),
            "`spec.template.spec.containers[0].name` must be a string",
        ),
        (
            deployment.replace("labels: { app: web }\n    spec", "labels: { app: 3 }\n    spec"),
            "`spec.template.metadata.labels.\"app\"` label values must be strings, not 3",
        ),
        (
            deployment.replace(
                "      labels: { app: web }\n",
                "      labels: { app: web }\n      annotations: { trellis.io/inject: false }\n",
            ),
            "`spec.template.metadata.annotations.trellis.io/inject` must be the string \"true\" \
             or \"false\", not false",
        ),
        (
            workload("Pod", "      hostNetwork: \"yes\"\n"),
            "document 1 (Pod shop/web, line 1): `spec.hostNetwork` must be true or false, not \"yes\"",
        ),
        (
            "metadata: { name: x }\n".to_owned(),
            "document 1 (object x, line 1): `kind` is missing",
        ),
        (
            format!("{SERVICE}---\n- a\n- b\n"),
            "document 2 (line 6): not a Kubernetes object: expected a mapping with `kind`, found a list",
        ),
        (
            workload("Job", "      volumes: [{ name: trellis-token, emptyDir: {} }]\n"),
            "`spec.template.spec.volumes` already has a volume named trellis-token",
        ),
        (
            workload("Deployment", "").replace(
                "      containers:\n        - name: app\n          image: registry.example/web:1.0\n",
                "      containers: []\n",
            ),
            "`spec.template.spec.containers` must list at least one container",
        ),
    ];
    for (input, expected) in cases {
        let err = inject::inject(&input, &Settings::default())
            .expect_err(&format!("must be refused:\n{input}"))
            .to_string();
        assert!(
            err.contains(expected),
            "error {err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn the_command_reads_a_file_or_stdin_warns_and_writes_nothing_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("app.yaml");
    let output = dir.path().join("out.yaml");
    let text = format!(
        "{}---\n{}",
        workload("Deployment", ""),
        workload("DaemonSet", "      hostNetwork: true\n")
    );
    std::fs::write(&input, &text).unwrap();

    let run = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(
        stderr.contains("warning: document 2 (DaemonSet shop/web): skipped: it uses hostNetwork"),
        "{stderr}"
    );
    let written = std::fs::read_to_string(&output).unwrap();
    assert_eq!(
        written,
        inject::inject(&text, &Settings::default()).unwrap().output
    );

    // Standard input to standard output; the file just written is already injected.
    let mut child = Command::new(BIN)
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), written.as_bytes()).unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success());
    assert_eq!(String::from_utf8(piped.stdout).unwrap(), written);

    let bad = dir.path().join("bad.yaml");
    let refused = dir.path().join("refused.yaml");
    std::fs::write(&bad, "kind: Pod\nspec: [\n").unwrap();
    let run = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(&bad)
        .arg("-o")
        .arg(&refused)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("document 1 (line"),
        "{stderr}"
    );
    assert!(
        !refused.exists(),
        "nothing is written when a document is refused"
    );
}

/// The sample application of `examples/kubernetes/` is exactly what `inject` writes: taking the
/// injected parts out and injecting again gives the same pod template back.
#[test]
fn the_kubernetes_example_app_is_what_inject_writes() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/kubernetes/sample-app.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let outcome = run(&text);
    assert_eq!(outcome.output, text, "already injected");
    let docs = documents(&text);
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment in the sample app");
    let mut bare = deployment.clone();
    let t = &mut bare["spec"]["template"];
    t["metadata"]["labels"]
        .as_mapping_mut()
        .unwrap()
        .remove(SIDECAR_LABEL);
    let spec = t["spec"].as_mapping_mut().unwrap();
    for (key, name) in [
        ("containers", SIDECAR_NAME),
        ("initContainers", INIT_NAME),
        ("volumes", TOKEN_VOLUME),
    ] {
        let list = spec.get_mut(key).unwrap().as_sequence_mut().unwrap();
        let before = list.len();
        list.retain(|c| c["name"] != name);
        assert_eq!(list.len(), before - 1, "{key} holds {name}");
        if list.is_empty() {
            spec.remove(key);
        }
    }
    let again = run(&serde_yaml::to_string(&bare).unwrap());
    assert_eq!(again.workloads[0].action, Action::Injected);
    assert_eq!(
        template(&documents(&again.output)[0]),
        template(deployment),
        "the sample's pod template differs from what inject writes"
    );
}
