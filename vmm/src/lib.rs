//! skiff's VMM: boots a Linux guest on KVM with a serial console and virtio-mmio block and
//! net devices whose queues are served by vhost-user device processes.

pub mod boot;
pub mod builder;
pub mod config;
pub mod device_process;
pub mod devices;
pub mod exit;
pub mod host;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod terminal;
pub mod vcpu;
pub mod vmm;
