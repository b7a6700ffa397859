//! Configuration: one typed model fed by the bootstrap file (and later the control plane), then
//! validate → compile → publish.

pub mod bootstrap;
pub mod compile;
pub mod domains;
pub mod duration;
pub mod limits;
pub mod model;
pub mod store;
pub mod validate;
pub mod xds;

pub use compile::Compiled;
pub use model::Config;
pub use store::Store;
pub use validate::{ConfigErrors, FieldError};
