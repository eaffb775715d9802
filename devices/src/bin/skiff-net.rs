//! skiff-net: vhost-user virtio-net backend over TAP devices.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use devices::net_backend::{self, parse_mac, NetOptions};

/// vhost-user virtio-net backend; one TAP per queue pair.
#[derive(Debug, Parser)]
#[command(name = "skiff-net", version)]
struct Args {
    /// vhost-user socket to listen on (a stale file is removed).
    #[arg(long)]
    socket: PathBuf,
    /// TAP interface (opened or created); repeat for a multi-queue device.
    #[arg(long = "tap", required = true)]
    taps: Vec<String>,
    /// MAC address in the config space (aa:bb:cc:dd:ee:ff).
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// Maximum size of each queue.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Inherited fd of the VMM's 4096-byte metrics memfd to count into (layout in
    /// docs/CONTRACTS.md); without it the counters stay in process memory.
    #[arg(long, value_name = "N")]
    metrics_fd: Option<i32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = devices::logger::init("skiff-net") {
        eprintln!("skiff-net: {}", devices::error_chain(&e));
    }
    let opts = NetOptions {
        socket: args.socket,
        taps: args.taps,
        mac: args.mac,
        queue_size: args.queue_size,
        metrics_fd: args.metrics_fd,
    };
    match net_backend::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-net: {}", devices::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
