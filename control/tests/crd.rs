//! The AuthorizationPolicy CRD schema in `examples/mesh` and the controller's parser accept the
//! same fields: for every object the schema describes, a field the parser does not know is
//! refused naming the fields it does know, and those are exactly the schema's properties. A
//! full example policy (every field set) parses, is valid, and sets every schema property.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::Value;
use trellis_control::{catalog::Catalog, source::manifest::parse_documents, translate};

const FULL: &str = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: public-get, namespace: shop}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - name: a-may-get
    from: {identities: ['spiffe://cluster.local/ns/shop/sa/a'], cidrs: [10.0.0.0/8]}
    to: {ports: [8080], methods: [GET], paths: [{prefix: /public}, {exact: /health}]}
status: {}
";

fn crd() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/mesh/authorization-policy-crd.yaml"
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Path in the example (`spec.rules.0.to`) → property names of the schema object there.
fn schema_objects(schema: &Value, path: &str, out: &mut BTreeMap<String, BTreeSet<String>>) {
    let Some(Value::Mapping(properties)) = schema.get("properties") else {
        return;
    };
    let mut names = BTreeSet::new();
    for (name, sub) in properties {
        let name = name.as_str().unwrap().to_owned();
        let at = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        match sub.get("type").and_then(Value::as_str) {
            Some("object") => schema_objects(sub, &at, out),
            Some("array") => schema_objects(&sub["items"], &format!("{at}.0"), out),
            _ => {}
        }
        names.insert(name);
    }
    out.insert(path.to_owned(), names);
}

fn at_mut<'a>(doc: &'a mut Value, path: &str) -> &'a mut Value {
    let mut v = doc;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        v = match part.parse::<usize>() {
            Ok(i) => &mut v[i],
            Err(_) => &mut v[part],
        };
    }
    v
}

/// The field names serde lists after "unknown field `zzz`, expected ...".
fn expected_fields(reason: &str) -> BTreeSet<String> {
    let (_, expected) = reason
        .split_once("expected")
        .unwrap_or_else(|| panic!("{reason}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn leaf_paths(v: &Value, path: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, sub) in m {
                let at = format!("{path}.{}", k.as_str().unwrap());
                out.insert(at.trim_start_matches('.').to_owned());
                leaf_paths(sub, &at, out);
            }
        }
        Value::Sequence(s) => {
            // Every element counts as the schema's one `items`.
            for sub in s {
                leaf_paths(sub, &format!("{path}.0"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_crd_schema_and_the_parser_accept_the_same_fields() {
    let crd = crd();
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    assert_eq!(crd["spec"]["group"], "trellis.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "AuthorizationPolicy");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let mut objects = BTreeMap::new();
    schema_objects(&version["schema"]["openAPIV3Schema"], "", &mut objects);
    // `metadata` is Kubernetes' own; `selector.matchLabels` and `status` are maps of any keys.
    assert_eq!(
        objects.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "",
            "spec",
            "spec.rules.0",
            "spec.rules.0.from",
            "spec.rules.0.to",
            "spec.rules.0.to.paths.0",
            "spec.selector"
        ]
    );

    let full: Value = serde_yaml::from_str(FULL).unwrap();
    let manifests = parse_documents(FULL).expect("the full example parses");
    assert_eq!(manifests.len(), 1);
    let diagnostics = translate::object_diagnostics(&Catalog::from_manifests(&manifests));
    assert!(diagnostics.is_empty(), "{diagnostics:?}");

    for (path, names) in &objects {
        let mut doc = full.clone();
        let Value::Mapping(m) = at_mut(&mut doc, path) else {
            panic!("{path} is not an object in the example")
        };
        m.insert("zzz".into(), 1.into());
        let text = serde_yaml::to_string(&doc).unwrap();
        let err = parse_documents(&text).expect_err(path);
        assert!(
            err.reason.contains("unknown field `zzz`"),
            "{path}: {}",
            err.reason
        );
        assert_eq!(&expected_fields(&err.reason), names, "{path}");
    }

    // The example sets every field of the schema, so it exercises all of them.
    let mut set = BTreeSet::new();
    leaf_paths(&full, "", &mut set);
    for (path, names) in &objects {
        for name in names {
            let at = format!("{path}.{name}");
            let at = at.trim_start_matches('.');
            assert!(set.contains(at), "the example does not set {at}");
        }
    }
}
