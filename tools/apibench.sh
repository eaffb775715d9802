#!/usr/bin/env bash
# Control-API latency benchmark: skiff's HTTP API beside QEMU's QMP (and Firecracker's API
# when a `firecracker` binary is on PATH), side by side in one run on this machine.
# No guest is booted (pre-boot requests only), so it runs at native speed on the outer host,
# also where the host's KVM cannot boot guests.
#   tools/apibench.sh [STARTS [REQUESTS]]     (defaults 20 and 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
starts=${1:-20}
requests=${2:-10000}
cargo build --release -p vmm -p devices -p jailer -p tools --bins
bin=${CARGO_TARGET_DIR:-target}/release
out=${CARGO_TARGET_DIR:-target}
"$bin/apibench" --skiff "$bin/skiff" --starts "$starts" --requests "$requests" --fresh 1000 \
  --out "$out/apibench.json"
