//! skiff-net: vhost-user virtio-net backend over TAP devices.

use std::process::ExitCode;

use clap::Parser;
use devices::net_backend::{self, NetArgs, NetOptions};

fn main() -> ExitCode {
    let args = NetArgs::parse();
    if let Err(e) = devices::logger::init("skiff-net") {
        eprintln!("skiff-net: {}", devices::error_chain(&e));
    }
    match net_backend::run(&NetOptions::from(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-net: {}", devices::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
