//! L4: TCP proxying (the ClusterIP model) and TLS passthrough routed by SNI.

mod copy;
pub mod passthrough;
pub mod sni;
pub mod tcp;

pub use sni::SniTable;
pub use tcp::TcpTarget;
