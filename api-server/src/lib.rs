//! skiff's API wire types (Firecracker-compatible JSON) and, as the API issue lands, the
//! Unix-socket HTTP server and client. This crate knows nothing of KVM (see DESIGN.md).

pub mod models;
