//! The manifests directory reads what the watcher names, however it spells the directory.

use std::{collections::HashSet, sync::Arc};

use trellis_control::{source::file::ManifestDir, status::Registry};

const WEB: &str = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 127.0.0.10\n  ports: [{name: http, port: 80}]\n";

/// notify reports absolute paths; `--manifests ./manifests` is relative. An edit named that way
/// must be read at once, not at the next full rescan.
#[test]
fn an_event_with_an_absolute_path_is_read_for_a_relative_directory() {
    let dir = tempfile::tempdir_in(".").unwrap();
    let name = dir.path().file_name().unwrap().to_owned();
    let relative = std::path::Path::new(".").join(&name);
    let mut manifests = ManifestDir::new(&relative, Arc::new(Registry::default()));
    assert!(!manifests.scan(), "an empty directory holds nothing");

    let file = dir.path().join("web.yaml");
    std::fs::write(&file, WEB).unwrap();
    let absolute = std::fs::canonicalize(&file).unwrap();
    assert!(
        manifests.scan_paths(&HashSet::from([absolute])),
        "the new file is read"
    );
    assert_eq!(manifests.catalog().services.len(), 1);

    // A hidden path (an editor's temporary file) stands for any change: a full scan.
    std::fs::remove_file(&file).unwrap();
    let hidden = dir.path().join(".web.yaml.swp");
    assert!(manifests.scan_paths(&HashSet::from([hidden])));
    assert!(manifests.catalog().services.is_empty());
}
