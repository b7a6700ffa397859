//! What the fuzz targets in `fuzz/` need beyond the crate's public API. Not a stable interface:
//! it exists so that no private module has to become public for fuzzing.

use trellis_proto::discovery::v1::DeltaDiscoveryResponse;

pub use crate::config::xds::Refused;

/// Applies discovery responses in order to an empty discovery client state, with the same
/// per-resource checks the client runs, and assembles what could be served from the result.
pub fn apply_discovery(responses: &[DeltaDiscoveryResponse]) -> Vec<Refused> {
    crate::config::xds::apply_for_fuzzing(responses)
}
