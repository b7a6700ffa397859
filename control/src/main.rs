//! `trellis-control`: the Trellis controller.
//!
//! `serve` watches a manifests directory and feeds proxies over gRPC; `status` prints what the
//! admin endpoint of a running controller reports.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use trellis_control::{admin, identity, server, source::file::ManifestDir, status};

/// Trellis controller.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Watch a manifests directory and serve the discovery stream.
    Serve {
        /// Directory of Kubernetes-style YAML (Service, EndpointSlice, Gateway, HTTPRoute).
        #[arg(long)]
        manifests: PathBuf,
        /// Address of the gRPC discovery service.
        #[arg(long, default_value = "127.0.0.1:18000")]
        listen: SocketAddr,
        /// Address of the admin endpoint (/status, /ready, /live).
        #[arg(long, default_value = "127.0.0.1:18001")]
        admin: SocketAddr,
        /// Log filter (`RUST_LOG` wins).
        #[arg(long, default_value = "info")]
        log: String,
        #[command(flatten)]
        identity: Box<IdentityArgs>,
        #[command(flatten)]
        tls: Box<TlsArgs>,
    },
    /// Print the connected proxies and their ACK state, read from a running controller.
    Status {
        /// Address of the controller's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:18001")]
        admin: SocketAddr,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Mesh identity: the certificate authority and who may ask it for certificates.
#[derive(clap::Args, Debug)]
struct IdentityArgs {
    /// Directory holding the mesh CA (ca.pem, ca-key.pem); generated on first start.
    #[arg(long, conflicts_with_all = ["ca_cert", "ca_key"])]
    ca_dir: Option<PathBuf>,
    /// The mesh CA certificate (PEM; then its issuers up to the root).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The mesh CA private key (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of issued certificates, also the longest a proxy may ask for (e.g. 24h, 30m).
    #[arg(long, default_value = "24h", value_parser = identity::parse_ttl)]
    cert_ttl: std::time::Duration,
    /// Directory of per-account tokens, `DIR/<namespace>/<service-account>`; without it every
    /// certificate request is refused.
    #[arg(long)]
    identity_tokens: Option<PathBuf>,
}

/// TLS on the discovery port (discovery and identity share it).
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// Serve the discovery port over TLS with this certificate (PEM chain); re-read when the
    /// file changes. Proxies trust it with --xds-ca-file.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require proxies to present a client certificate issued by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve the identity service without TLS on a non-loopback --listen address: tokens and
    /// the trust bundle then travel in clear. For trusted networks only.
    #[arg(long)]
    insecure_plaintext_identity: bool,
}

impl TlsArgs {
    fn files(&self) -> Option<server::tls::TlsFiles> {
        Some(server::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

impl IdentityArgs {
    fn settings(self) -> identity::Settings {
        let ca = match (self.ca_dir, self.ca_cert, self.ca_key) {
            (Some(dir), _, _) => Some(identity::CaSource::Dir(dir)),
            (None, Some(cert), Some(key)) => Some(identity::CaSource::Files { cert, key }),
            _ => None,
        };
        identity::Settings {
            ca,
            trust_domain: self.trust_domain,
            cert_ttl: self.cert_ttl,
            token_dir: self.identity_tokens,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Command::Serve {
            manifests,
            listen,
            admin,
            log,
            identity,
            tls,
        } => {
            init_tracing(&log);
            runtime.block_on(serve(manifests, listen, admin, identity.settings(), &tls))
        }
        Command::Status { admin, json } => runtime.block_on(print_status(admin, json)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-control: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only on a terminal: logs collected from a pipe stay plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn serve(
    manifests: PathBuf,
    listen: SocketAddr,
    admin_addr: SocketAddr,
    identity_settings: identity::Settings,
    tls_args: &TlsArgs,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        manifests.is_dir(),
        "--manifests {} is not a directory",
        manifests.display()
    );
    // Before anything listens: a CA that cannot load stops the start.
    let identity = identity::start(&identity_settings)?;
    let tls = match tls_args.files() {
        Some(files) => Some(server::tls::DiscoveryTls::load(&files)?),
        None => None,
    };
    match server::tls::check_plaintext_identity(
        identity.is_some(),
        tls.is_some(),
        listen,
        tls_args.insecure_plaintext_identity,
    )? {
        server::tls::PlaintextCheck::Fine => {}
        server::tls::PlaintextCheck::Insecure => tracing::warn!(
            %listen,
            "--insecure-plaintext-identity: the identity service runs without TLS off \
             loopback; service-account tokens and the trust bundle travel in clear"
        ),
    }
    let registry = Arc::new(status::Registry::default());
    let (catalog, _watch_task) = ManifestDir::new(&manifests, registry.clone())
        .watch()
        .await?;
    let grpc = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --listen {listen}"))?;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding --admin {admin_addr}"))?;
    let (listen, admin_addr) = (grpc.local_addr()?, admin_listener.local_addr()?);
    tokio::spawn(admin::serve(admin_listener, registry.clone()));
    registry.set_ready();
    let secure = tls.is_some();
    tracing::info!(%listen, tls = secure, admin = %admin_addr, manifests = %manifests.display(), "serving");
    // Endpoints are marked meshed only when this controller issues the certificates.
    let trust_domain = identity
        .is_some()
        .then(|| identity_settings.trust_domain.clone());
    let service = server::DiscoveryService::new(catalog, registry).with_trust_domain(trust_domain);
    server::serve_secured(grpc, service, identity, tls, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn print_status(admin_addr: SocketAddr, json: bool) -> anyhow::Result<()> {
    let report = admin::fetch_status(admin_addr)
        .await
        .with_context(|| format!("reading http://{admin_addr}/status"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render_table(&report, SystemTime::now()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_come_in_pairs_and_the_error_names_the_missing_flag() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["trellis-control", "serve", "--manifests", "m"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv)
        };
        let err = parse(&["--tls-cert", "c.pem"]).unwrap_err().to_string();
        assert!(err.contains("--tls-key"), "{err}");
        let err = parse(&["--tls-key", "k.pem"]).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        let err = parse(&["--tls-client-ca", "ca.pem"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        let Command::Serve { tls, .. } = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .unwrap()
            .command
        else {
            panic!("not serve");
        };
        assert_eq!(
            tls.files(),
            Some(server::tls::TlsFiles {
                cert: "c.pem".into(),
                key: "k.pem".into(),
                client_ca: None,
            })
        );
    }
}
