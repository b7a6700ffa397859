//! `trellis-control`: the Trellis controller.
//!
//! The control plane (manifest watching, translation and the discovery stream) is not built yet;
//! until it is, this binary only says so, and proxies run from their bootstrap file.

use clap::Parser;

/// Trellis controller.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of Kubernetes-style manifests to watch.
    #[arg(long)]
    manifests: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let _args = Args::parse();
    eprintln!(
        "trellis-control: the control plane is not implemented yet; run trellis-proxy with --config"
    );
    std::process::ExitCode::FAILURE
}
