//! Where the catalog comes from. Today: a directory of manifests (`file`); the Kubernetes API
//! (`kube`) comes later and feeds the same catalog.

pub mod file;
pub mod manifest;
