//! Every configuration under `examples/` is valid and compiles, so the README's examples work.

use trellis_proxy::config::{Compiled, validate};

#[test]
fn examples_are_valid() {
    // Examples name files (certificates) relative to the repository root, where the README runs
    // them; this test binary holds no other test, so changing its directory affects nothing else.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root).unwrap();
    let dir = root.join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let config = validate::from_yaml(&text)
            .unwrap_or_else(|e| panic!("{} is invalid:\n{e}", path.display()));
        Compiled::build(config.into(), 1, None)
            .unwrap_or_else(|e| panic!("{} does not compile:\n{e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 3, "found only {checked} examples");
}
