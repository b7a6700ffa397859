//! `trellis-control`: watches manifests, keeps a catalog, translates it per proxy and serves the
//! result over the discovery stream (`trellis.discovery.v1`).

pub mod admin;
pub mod catalog;
pub mod diagnostics;
pub mod identity;
pub mod inject;
pub mod metrics;
pub mod resource;
pub mod server;
pub mod simulate;
pub mod source;
pub mod status;
pub mod translate;
