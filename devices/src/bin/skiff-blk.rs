//! skiff-blk: vhost-user virtio-blk backend over a raw image file.

use std::process::ExitCode;

use clap::Parser;
use devices::block_backend::{self, BlkArgs, BlockOptions};

fn main() -> ExitCode {
    let args = BlkArgs::parse();
    if let Err(e) = devices::logger::init("skiff-blk") {
        eprintln!("skiff-blk: {}", devices::error_chain(&e));
    }
    match block_backend::run(&BlockOptions::from(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-blk: {}", devices::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
