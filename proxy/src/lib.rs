//! Trellis proxy: the data plane of the Trellis service mesh.
//!
//! A request flows: listener → `http::server` → `http::forward` (route with `http::router`, then
//! answer, redirect or forward through `upstream`). Configuration flows: bootstrap file →
//! `config::validate` → `config::compile` → `config::Store` → requests.

pub mod admin;
pub mod app;
pub mod authz;
pub mod capture;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod l4;
pub mod listener;
pub mod ratelimit;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use app::{
    ApplyError, LoadError, Proxy, ensure_something_to_serve, load_bootstrap, load_file,
    read_bootstrap,
};
