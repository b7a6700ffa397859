//! Fails when the checked-in generated code no longer matches the `.proto` files.

use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "trellis/echo/v1/echo.proto",
    "trellis/discovery/v1/discovery.proto",
    "trellis/discovery/v1/cluster.proto",
    "trellis/discovery/v1/endpoint.proto",
    "trellis/discovery/v1/listener.proto",
    "trellis/discovery/v1/reserved.proto",
    "trellis/discovery/v1/resilience.proto",
    "trellis/discovery/v1/route.proto",
    "trellis/identity/v1/identity.proto",
];

fn generate(out_dir: &Path) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root]).expect("the .proto files compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out_dir)
        .compile_fds(fds)
        .expect("code generation succeeds");
}

#[test]
fn generated_code_matches_protos() {
    let checked_in = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    if std::env::var_os("TRELLIS_REGENERATE").is_some() {
        generate(&checked_in);
        return;
    }
    let fresh = tempfile::tempdir().unwrap();
    generate(fresh.path());
    for entry in std::fs::read_dir(fresh.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let want = std::fs::read_to_string(entry.path()).unwrap();
        let have = std::fs::read_to_string(checked_in.join(&name)).unwrap_or_default();
        assert!(
            want == have,
            "proto/src/gen/{} is stale: run `TRELLIS_REGENERATE=1 cargo test -p trellis-proto --test codegen`",
            name.to_string_lossy()
        );
    }
}
