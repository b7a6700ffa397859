//! `trellis-control inject`: adds the Trellis sidecar and its capture init container to the pod
//! templates of workload manifests, the way `examples/sidecar/pod.yaml` shows them.
//!
//! The input is multi-document YAML. Documents are split on their `---` lines and handled one by
//! one, so every document that is not changed (other kinds, skipped or already injected
//! workloads) is copied byte for byte, comments included; an injected document is written back
//! from its parsed form. That makes the command idempotent: its output run through it again
//! comes back unchanged.

use serde_yaml::{Mapping, Value};

/// Name of the sidecar container; its presence marks a pod template as injected.
pub const SIDECAR_NAME: &str = "trellis-proxy";
/// Name of the init container that installs the capture rules.
pub const INIT_NAME: &str = "trellis-init";
/// Pod label the controller reads to know an endpoint is meshed.
pub const SIDECAR_LABEL: &str = "trellis.io/sidecar";
/// Pod template annotation: `"false"` leaves the workload alone.
pub const INJECT_ANNOTATION: &str = "trellis.io/inject";
/// The UID the sidecar runs as; the capture rules exempt its connections, so the two must agree.
pub const PROXY_UID: u32 = 1337;
/// The ConfigMap (in the workload's namespace, key `ca.crt`) with the CA of the controller's
/// TLS certificate, and the file the sidecar reads it from.
pub const CONTROL_CA_CONFIG_MAP: &str = "trellis-control-ca";
const CONTROL_CA_FILE: &str = "control-ca.crt";
/// Volume holding the pod's projected service-account token (the sidecar's proof of identity)
/// and the controller's CA.
pub const TOKEN_VOLUME: &str = "trellis-token";
/// Audience of that token: the controller asks the API server to check tokens for it.
pub const TOKEN_AUDIENCE: &str = "trellis";
/// Image the manifests and the injector name by default (`docker build -t trellis:dev .`).
pub const DEFAULT_IMAGE: &str = "trellis:dev";
/// The controller's discovery Service in `examples/kubernetes/`.
pub const DEFAULT_XDS: &str = "trellis-control.trellis-system.svc:18000";

/// What the injected containers point at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Image of the sidecar and the init container (both run `trellis-proxy`).
    pub image: String,
    /// The controller's discovery address, `host:port`.
    pub xds: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            image: DEFAULT_IMAGE.to_owned(),
            xds: DEFAULT_XDS.to_owned(),
        }
    }
}

impl Settings {
    /// Values Kubernetes would only refuse at apply time, or a sidecar only at start.
    fn check(&self) -> Result<(), InjectError> {
        let bad = |flag, value: &str, problem| {
            Err(InjectError::Setting {
                flag,
                value: value.to_owned(),
                problem,
            })
        };
        if self.image.is_empty() || self.image.chars().any(char::is_whitespace) {
            return bad(
                "image",
                &self.image,
                "an image name is not empty and has no spaces",
            );
        }
        match self.xds.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(())
            }
            _ => bad("xds", &self.xds, "expected host:port"),
        }
    }
}

/// The result of one run: the new text and what happened to each workload document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub output: String,
    pub workloads: Vec<Report>,
}

/// What happened to one workload document (other kinds are not reported).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// 1-based position of the document in the input.
    pub index: usize,
    /// `Kind namespace/name`.
    pub object: String,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Injected,
    /// The template already has the sidecar; left byte for byte as it was.
    AlreadyInjected,
    /// `trellis.io/inject: "false"` on the pod template.
    OptedOut,
    /// `hostNetwork: true`: the capture rules would redirect the node's own traffic.
    HostNetwork,
}

impl Action {
    /// A skip the user probably did not intend and should hear about.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Action::HostNetwork => Some(
                "skipped: it uses hostNetwork, where the capture rules would redirect the node's \
                 own traffic",
            ),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("document {index} (line {line}): not valid YAML: {message}")]
    Yaml {
        index: usize,
        line: usize,
        message: String,
    },
    #[error(
        "document {index} (line {line}): not a Kubernetes object: expected a mapping with \
         `kind`, found {found}"
    )]
    NotAnObject {
        index: usize,
        line: usize,
        found: &'static str,
    },
    #[error("--{flag} {value:?}: {problem}")]
    Setting {
        flag: &'static str,
        value: String,
        problem: &'static str,
    },
    #[error("document {index} ({object}, line {line}): `{field}` {problem}")]
    Field {
        index: usize,
        object: String,
        line: usize,
        field: String,
        problem: String,
    },
}

/// Injects every workload of `text`; the first bad document stops the run (nothing is written).
pub fn inject(text: &str, settings: &Settings) -> Result<Outcome, InjectError> {
    settings.check()?;
    let mut output = String::with_capacity(text.len() + 4096);
    let mut workloads = Vec::new();
    for (i, chunk) in split_documents(text).into_iter().enumerate() {
        let doc = Doc {
            index: i + 1,
            line: chunk.line,
            object: String::new(),
        };
        match inject_document(&doc, chunk.raw, settings)? {
            Some((report, Some(value))) => {
                output.push_str(&chunk.raw[..chunk.separator_len]);
                let body = serde_yaml::to_string(&value).map_err(|e| InjectError::Yaml {
                    index: doc.index,
                    line: doc.line,
                    message: e.to_string(),
                })?;
                output.push_str(&body);
                workloads.push(report);
            }
            Some((report, None)) => {
                output.push_str(chunk.raw);
                workloads.push(report);
            }
            None => output.push_str(chunk.raw),
        }
    }
    Ok(Outcome { output, workloads })
}

/// One document of the input: its raw text (separator line included) and where it starts.
struct Chunk<'a> {
    raw: &'a str,
    separator_len: usize,
    /// 1-based line of the first line of `raw`.
    line: usize,
}

/// Splits on `---` lines. A block scalar's lines are indented, so a `---` at column 0 is always
/// a document marker in a Kubernetes manifest.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut start_line, mut separator_len) = (0, 1, 0);
    let (mut offset, mut line_no) = (0, 1);
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        let is_separator = content
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if is_separator {
            // The text before the first marker is a document only if it holds something.
            if offset > start || separator_len > 0 {
                chunks.push(Chunk {
                    raw: &text[start..offset],
                    separator_len,
                    line: start_line,
                });
            }
            (start, start_line, separator_len) = (offset, line_no, line.len());
        }
        offset += line.len();
        line_no += 1;
    }
    if offset > start || separator_len > 0 {
        chunks.push(Chunk {
            raw: &text[start..],
            separator_len,
            line: start_line,
        });
    }
    chunks
}

/// Context for error messages.
struct Doc {
    index: usize,
    line: usize,
    object: String,
}

impl Doc {
    fn field(&self, field: impl Into<String>, problem: impl Into<String>) -> InjectError {
        InjectError::Field {
            index: self.index,
            object: self.object.clone(),
            line: self.line,
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// `None` for a document that is not a workload; otherwise the report and, when it changed,
/// the new value.
fn inject_document(
    doc: &Doc,
    raw: &str,
    settings: &Settings,
) -> Result<Option<(Report, Option<Value>)>, InjectError> {
    let has_content = raw.lines().any(|l| {
        let t = l.trim();
        !(t.is_empty() || t.starts_with('#') || t.starts_with("---") || t == "...")
    });
    if !has_content {
        return Ok(None);
    }
    // Blank lines in front make the parser's own line numbers count from the top of the file.
    let padded = format!("{}{raw}", "\n".repeat(doc.line - 1));
    let mut value: Value = serde_yaml::from_str(&padded).map_err(|e| InjectError::Yaml {
        index: doc.index,
        line: e.location().map_or(doc.line, |l| l.line()),
        message: e.to_string(),
    })?;
    let Value::Mapping(object) = &mut value else {
        return Err(InjectError::NotAnObject {
            index: doc.index,
            line: doc.line,
            found: type_name(&value),
        });
    };
    let untyped = Doc {
        object: describe("object", object),
        ..*doc
    };
    let kind = match object.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(other) => {
            return Err(untyped.field(
                "kind",
                format!("must be a string, not {}", type_name(other)),
            ));
        }
        None => return Err(untyped.field("kind", "is missing")),
    };
    let doc = Doc {
        object: describe(&kind, object),
        ..*doc
    };
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(path) = template_path(&kind, api_version) else {
        return Ok(None);
    };
    let report = |action| Report {
        index: doc.index,
        object: doc.object.clone(),
        action,
    };
    let action = inject_template(&doc, object, path, &kind, settings)?;
    let changed = action == Action::Injected;
    Ok(Some((report(action), changed.then_some(value))))
}

/// Where the pod template sits in each workload kind (empty: the object is the pod).
fn template_path(kind: &str, api_version: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") | ("batch", "Job") => {
            Some(&["spec", "template"])
        }
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_template(
    doc: &Doc,
    object: &mut Mapping,
    path: &[&str],
    kind: &str,
    settings: &Settings,
) -> Result<Action, InjectError> {
    let mut template = object;
    let mut at = String::new();
    for key in path {
        at = join(&at, key);
        template = match template.get_mut(*key) {
            Some(Value::Mapping(m)) => m,
            Some(other) => {
                return Err(doc.field(at, format!("must be a mapping, not {}", type_name(other))));
            }
            None => return Err(doc.field(at, "is missing")),
        };
    }
    let spec_at = join(&at, "spec");
    let metadata_at = join(&at, "metadata");
    let spec = match template.get("spec") {
        Some(Value::Mapping(m)) => m,
        Some(other) => {
            return Err(doc.field(
                spec_at,
                format!("must be a mapping, not {}", type_name(other)),
            ));
        }
        None => return Err(doc.field(spec_at, "is missing")),
    };
    let containers = container_names(doc, spec, &spec_at, "containers")?;
    if containers.is_empty() {
        return Err(doc.field(
            join(&spec_at, "containers"),
            "must list at least one container",
        ));
    }
    let init_containers = container_names(doc, spec, &spec_at, "initContainers")?;
    if containers
        .iter()
        .chain(&init_containers)
        .any(|n| n == SIDECAR_NAME)
    {
        return Ok(Action::AlreadyInjected);
    }
    let metadata = match template.get("metadata") {
        Some(Value::Mapping(m)) => Some(m),
        Some(Value::Null) | None => None,
        Some(other) => {
            return Err(doc.field(
                metadata_at,
                format!("must be a mapping, not {}", type_name(other)),
            ));
        }
    };
    let annotation = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(INJECT_ANNOTATION));
    match annotation {
        None => {}
        Some(Value::String(s)) if s == "false" => return Ok(Action::OptedOut),
        Some(Value::String(s)) if s == "true" => {}
        Some(other) => {
            return Err(doc.field(
                format!("{metadata_at}.annotations.{INJECT_ANNOTATION}"),
                format!(
                    "must be the string \"true\" or \"false\", not {}",
                    show(other)
                ),
            ));
        }
    }
    match spec.get("hostNetwork") {
        Some(Value::Bool(true)) => return Ok(Action::HostNetwork),
        Some(Value::Bool(false)) | None => {}
        Some(other) => {
            return Err(doc.field(
                join(&spec_at, "hostNetwork"),
                format!("must be true or false, not {}", show(other)),
            ));
        }
    }

    // The pod's labels: the label that marks it meshed, then the sidecar's --label flags, which
    // the controller matches against Service selectors.
    let metadata = mapping_entry(doc, template, "metadata", &metadata_at)?;
    let labels_at = join(&metadata_at, "labels");
    let labels = mapping_entry(doc, metadata, "labels", &labels_at)?;
    labels.insert(SIDECAR_LABEL.into(), "true".into());
    let mut label_args = Vec::with_capacity(labels.len());
    for (k, v) in labels.iter() {
        match (k, v) {
            (Value::String(k), Value::String(v)) => label_args.push(format!("--label={k}={v}")),
            _ => {
                return Err(doc.field(
                    format!("{labels_at}.{}", show(k)),
                    format!("label values must be strings, not {}", show(v)),
                ));
            }
        }
    }

    let spec = mapping_entry(doc, template, "spec", &spec_at)?;
    let volumes_at = join(&spec_at, "volumes");
    let volumes = sequence_entry(doc, spec, "volumes", &volumes_at)?;
    if volumes
        .iter()
        .any(|v| v.get("name").and_then(Value::as_str) == Some(TOKEN_VOLUME))
    {
        return Err(doc.field(
            volumes_at,
            format!("already has a volume named {TOKEN_VOLUME}, the name the sidecar's token uses"),
        ));
    }
    volumes.push(token_volume());

    let mut sidecar = sidecar_container(settings, label_args);
    let init_at = join(&spec_at, "initContainers");
    let inits = sequence_entry(doc, spec, "initContainers", &init_at)?;
    // Last among the init containers: the ones before it run without capture, so one that
    // fetches something before the proxy runs still reaches the network.
    inits.push(init_container(settings));
    // A Job's pod completes when its containers exit, and the sidecar never does on its own: as a
    // native sidecar (an init container that keeps running) it is stopped once the job's
    // containers have finished.
    if matches!(kind, "Job" | "CronJob") {
        sidecar.insert("restartPolicy".into(), "Always".into());
        inits.push(Value::Mapping(sidecar));
    } else {
        let containers_at = join(&spec_at, "containers");
        sequence_entry(doc, spec, "containers", &containers_at)?.push(Value::Mapping(sidecar));
    }
    Ok(Action::Injected)
}

/// Names of the containers in `spec[key]` (absent = none), checking the shape on the way.
fn container_names(
    doc: &Doc,
    spec: &Mapping,
    spec_at: &str,
    key: &str,
) -> Result<Vec<String>, InjectError> {
    let at = join(spec_at, key);
    let list = match spec.get(key) {
        Some(Value::Sequence(s)) => s,
        Some(Value::Null) | None => return Ok(Vec::new()),
        Some(other) => {
            return Err(doc.field(at, format!("must be a list, not {}", type_name(other))));
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, c)| match c.get("name") {
            Some(Value::String(n)) => Ok(n.clone()),
            _ if !c.is_mapping() => Err(doc.field(
                format!("{at}[{i}]"),
                format!("must be a mapping, not {}", type_name(c)),
            )),
            _ => Err(doc.field(format!("{at}[{i}].name"), "must be a string")),
        })
        .collect()
}

/// `parent[key]` as a mapping, created when absent or null.
fn mapping_entry<'a>(
    doc: &Doc,
    parent: &'a mut Mapping,
    key: &str,
    at: &str,
) -> Result<&'a mut Mapping, InjectError> {
    let entry = parent
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    match entry {
        Value::Mapping(m) => Ok(m),
        other => Err(doc.field(at, format!("must be a mapping, not {}", type_name(other)))),
    }
}

/// `parent[key]` as a list, created when absent or null.
fn sequence_entry<'a>(
    doc: &Doc,
    parent: &'a mut Mapping,
    key: &str,
    at: &str,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let entry = parent
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if entry.is_null() {
        *entry = Value::Sequence(Vec::new());
    }
    match entry {
        Value::Sequence(s) => Ok(s),
        other => Err(doc.field(at, format!("must be a list, not {}", type_name(other)))),
    }
}

/// The init container of `examples/sidecar/pod.yaml`: root with NET_ADMIN/NET_RAW, once.
fn init_container(settings: &Settings) -> Value {
    let mut c: Mapping = parse_template(&format!(
        r#"
name: {INIT_NAME}
command: ["trellis-proxy"]
args:
  - iptables
  - --proxy-uid={PROXY_UID}
  - --outbound-port=15001
  - --inbound-port=15006
  - --admin-port=15000
  - --exclude-outbound-cidrs=169.254.169.254/32
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  capabilities:
    drop: ["ALL"]
    add: ["NET_ADMIN", "NET_RAW"]
"#
    ));
    c.insert("image".into(), settings.image.clone().into());
    move_to(&mut c, "image", 1);
    Value::Mapping(c)
}

/// The sidecar of `examples/sidecar/pod.yaml`, with the pod's identity from the downward API.
fn sidecar_container(settings: &Settings, label_args: Vec<String>) -> Mapping {
    let mut c: Mapping = parse_template(&format!(
        r#"
name: {SIDECAR_NAME}
env:
  - name: POD_NAME
    valueFrom: {{ fieldRef: {{ fieldPath: metadata.name }} }}
  - name: POD_NAMESPACE
    valueFrom: {{ fieldRef: {{ fieldPath: metadata.namespace }} }}
  - name: POD_SERVICE_ACCOUNT
    valueFrom: {{ fieldRef: {{ fieldPath: spec.serviceAccountName }} }}
readinessProbe:
  exec:
    command: ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:15000/ready"]
  periodSeconds: 2
livenessProbe:
  exec:
    command: ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:15000/live"]
  periodSeconds: 10
volumeMounts:
  - {{ name: {TOKEN_VOLUME}, mountPath: /var/run/trellis, readOnly: true }}
securityContext:
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ drop: ["ALL"] }}
"#
    ));
    let mut args: Vec<Value> = vec![
        format!("--xds={}", settings.xds).into(),
        "--role=sidecar".into(),
        "--node-id=$(POD_NAME).$(POD_NAMESPACE)".into(),
        "--namespace=$(POD_NAMESPACE)".into(),
        "--service-account=$(POD_SERVICE_ACCOUNT)".into(),
        "--identity-token-file=/var/run/trellis/token".into(),
        // The token travels only over TLS: the CA of the controller's certificate.
        format!("--xds-ca-file=/var/run/trellis/{CONTROL_CA_FILE}").into(),
    ];
    args.extend(label_args.into_iter().map(Value::from));
    c.insert("image".into(), settings.image.clone().into());
    c.insert("args".into(), Value::Sequence(args));
    move_to(&mut c, "image", 1);
    move_to(&mut c, "args", 2);
    c
}

/// A projected token for the controller's audience, rotated by the kubelet.
fn token_volume() -> Value {
    Value::Mapping(parse_template(&format!(
        r#"
name: {TOKEN_VOLUME}
projected:
  sources:
    - serviceAccountToken:
        audience: {TOKEN_AUDIENCE}
        expirationSeconds: 3600
        path: token
    - configMap:
        name: {CONTROL_CA_CONFIG_MAP}
        items: [{{ key: ca.crt, path: {CONTROL_CA_FILE} }}]
"#
    )))
}

/// The templates above are constants (user values are inserted afterwards, never formatted in),
/// so a parse failure is a bug that the unit test below catches.
fn parse_template(text: &str) -> Mapping {
    serde_yaml::from_str(text).expect("the injection templates are valid YAML mappings")
}

/// Moves `key` to `position` so the written YAML reads name, image, args, … like a hand-written
/// container.
fn move_to(m: &mut Mapping, key: &str, position: usize) {
    let entries: Vec<(Value, Value)> = std::mem::take(m).into_iter().collect();
    let (mut moved, mut rest): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(k, _)| k.as_str() == Some(key));
    let at = position.min(rest.len());
    let tail = rest.split_off(at);
    rest.append(&mut moved);
    rest.extend(tail);
    m.extend(rest);
}

fn describe(kind: &str, object: &Mapping) -> String {
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    match metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A short rendering of a scalar for messages.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        let s = Settings::default();
        assert_eq!(init_container(&s)["name"], INIT_NAME);
        assert_eq!(init_container(&s)["image"], DEFAULT_IMAGE);
        let sidecar = sidecar_container(&s, vec!["--label=a=b".into()]);
        assert_eq!(sidecar["name"], SIDECAR_NAME);
        let keys: Vec<_> = sidecar.keys().take(3).filter_map(Value::as_str).collect();
        assert_eq!(keys, ["name", "image", "args"]);
        assert_eq!(token_volume()["name"], TOKEN_VOLUME);
    }

    #[test]
    fn documents_split_on_marker_lines_only() {
        let text = "a: 1\n---\nb: |\n  ---\n--- # c\n---x: 1\n";
        let chunks = split_documents(text);
        let raws: Vec<_> = chunks.iter().map(|c| c.raw).collect();
        assert_eq!(raws, ["a: 1\n", "---\nb: |\n  ---\n", "--- # c\n---x: 1\n"]);
        let lines: Vec<_> = chunks.iter().map(|c| c.line).collect();
        assert_eq!(lines, [1, 2, 5]);
        assert_eq!(split_documents("---\na: 1\n").len(), 1);
        assert_eq!(split_documents("").len(), 0);
    }
}
