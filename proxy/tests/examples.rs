//! Every configuration under `examples/` is valid and compiles, so the README's examples work.

use trellis_proxy::config::Compiled;

#[test]
fn examples_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        // As the proxy loads it: files it names are relative to its directory.
        let config = trellis_proxy::load_file(&path)
            .unwrap_or_else(|e| panic!("{} is invalid:\n{e}", path.display()));
        Compiled::build(config.into(), 1, None)
            .unwrap_or_else(|e| panic!("{} does not compile:\n{e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 3, "found only {checked} examples");
}
