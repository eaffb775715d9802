//! skiff's API: Firecracker-compatible JSON wire types ([`models`]), the typed requests
//! the VMM acts on ([`request`]), the router that maps HTTP to them ([`router`]), the
//! Unix-socket HTTP server thread that hands them to the VMM ([`server`]), its request
//! counters ([`metrics`]) and a blocking client ([`client`]). This crate knows nothing of
//! KVM (see DESIGN.md).

pub mod client;
pub mod metrics;
pub mod models;
pub mod request;
pub mod router;
pub mod server;
