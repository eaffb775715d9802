//! skiff-blk: vhost-user virtio-blk backend over a raw image file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use devices::block_backend::{self, BlockOptions};
use devices::disk::DiskOptions;

/// vhost-user virtio-blk backend serving a raw image file.
#[derive(Debug, Parser)]
#[command(name = "skiff-blk", version)]
struct Args {
    /// vhost-user socket to listen on (a stale file is removed).
    #[arg(long)]
    socket: PathBuf,
    /// Raw disk image.
    #[arg(long)]
    image: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO, shared lock).
    #[arg(long)]
    read_only: bool,
    /// Open the image with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Number of request queues.
    #[arg(long, default_value_t = 1)]
    num_queues: u16,
    /// Maximum size of each queue.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Inherited fd of the VMM's 4096-byte metrics memfd to count into (layout in
    /// docs/CONTRACTS.md); without it the counters stay in process memory.
    #[arg(long, value_name = "N")]
    metrics_fd: Option<i32>,
    /// Serial returned by GET_ID (up to 20 bytes; default derived from the image).
    #[arg(long)]
    serial: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = devices::logger::init("skiff-blk") {
        eprintln!("skiff-blk: {}", devices::error_chain(&e));
    }
    let opts = BlockOptions {
        socket: args.socket,
        image: args.image,
        disk: DiskOptions {
            read_only: args.read_only,
            direct: args.direct,
            serial: args.serial,
        },
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        metrics_fd: args.metrics_fd,
    };
    match block_backend::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-blk: {}", devices::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
