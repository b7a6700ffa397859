//! Mesh mTLS figures: handshakes by direction and outcome, counted as they happen (the
//! end-to-end tests read the inbound count to prove a hop was TLS).

use std::sync::OnceLock;

use metrics::Counter;

use super::{global_counter, names};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Originated towards a meshed endpoint.
    Outbound,
    /// Terminated on an inbound capture listener.
    Inbound,
}

/// One mesh mTLS handshake finished, well (`ok`) or not.
pub fn handshake(direction: Direction, ok: bool) {
    static CELLS: [[OnceLock<Counter>; 2]; 2] = [
        [OnceLock::new(), OnceLock::new()],
        [OnceLock::new(), OnceLock::new()],
    ];
    let (d, dname) = match direction {
        Direction::Outbound => (0, "outbound"),
        Direction::Inbound => (1, "inbound"),
    };
    let (r, rname) = if ok { (0, "ok") } else { (1, "error") };
    global_counter(
        &CELLS[d][r],
        names::MESH_TLS_HANDSHAKES_TOTAL,
        &[("direction", dname), ("result", rname)],
    )
    .increment(1);
}
