//! The Trellis API contract.
//!
//! The Rust in `src/gen/` is generated from the `.proto` files under `trellis/` and checked in, so
//! building needs no `protoc`. `tests/codegen.rs` regenerates it and fails when the two drift;
//! run it with `TRELLIS_REGENERATE=1` to rewrite the checked-in files.

/// Echo service used as a gRPC upstream by tests and benchmarks.
pub mod echo {
    pub mod v1 {
        include!("gen/trellis.echo.v1.rs");
    }
}

/// The discovery API: one delta stream per proxy carrying listeners, routes, clusters and
/// endpoints (see `trellis/discovery/v1/discovery.proto` for the ACK and ordering rules).
pub mod discovery {
    // prost decides the generated types' layout: the `Resource` oneof holds a `Cluster` by value,
    // which outgrew the other cases, and boxing it would change every user of the type.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        include!("gen/trellis.discovery.v1.rs");

        /// Type URL of [`Listener`] resources (wildcard subscription).
        pub const LISTENER_TYPE: &str = "trellis.discovery.v1.Listener";
        /// Type URL of [`RouteConfiguration`] resources (subscribed by name).
        pub const ROUTE_CONFIGURATION_TYPE: &str = "trellis.discovery.v1.RouteConfiguration";
        /// Type URL of [`Cluster`] resources (wildcard subscription).
        pub const CLUSTER_TYPE: &str = "trellis.discovery.v1.Cluster";
        /// Type URL of [`ClusterLoadAssignment`] resources (subscribed by cluster name).
        pub const CLUSTER_LOAD_ASSIGNMENT_TYPE: &str = "trellis.discovery.v1.ClusterLoadAssignment";
        /// Type URL of [`Secret`] resources.
        pub const SECRET_TYPE: &str = "trellis.discovery.v1.Secret";
        /// Type URL of [`Policy`] resources (reserved).
        pub const POLICY_TYPE: &str = "trellis.discovery.v1.Policy";
    }
}

/// Workload identity: proxies send a CSR with a proof of their service account and receive a
/// short-lived SPIFFE certificate from the controller's certificate authority.
pub mod identity {
    pub mod v1 {
        include!("gen/trellis.identity.v1.rs");
    }
}
