//! L4: TCP proxying (the ClusterIP model) and TLS passthrough routed by SNI.

pub(crate) mod copy;
pub mod passthrough;
pub mod sni;
pub mod tcp;

pub use sni::SniTable;
pub use tcp::TcpTarget;
