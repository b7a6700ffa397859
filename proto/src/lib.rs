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
