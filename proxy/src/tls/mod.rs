//! TLS on rustls with the `ring` provider: certificate material shared by termination on
//! listeners and origination towards clusters.

pub mod client;
pub mod material;
pub mod server;
mod watch;

pub use server::{Established, TlsServer};
