//! The HTTP request path: serve, route, forward.

pub mod body;
pub mod error;
pub mod forward;
pub mod headers;
pub mod normalize;
pub mod observe;
pub mod retry;
pub mod route;
pub mod router;
pub mod server;
pub mod trace;
pub mod upgrade;

#[cfg(test)]
mod router_tests;
