#!/usr/bin/env bash
# Launch-path benchmark at native speed (tools/src/launchbench/): from exec to the first
# KVM_RUN, skiff beside Firecracker (when a `firecracker` binary is on PATH, or
# FIRECRACKER=PATH) and QEMU microvm, same kernel (skiff's guest vmlinux), same root
# filesystem (read-only), 1 vCPU, 256 MiB; then a burst of VMs started at once for the launch
# rate (VMs to their first KVM_RUN per second per core). The times are the kernel's (ftrace:
# the exec and the first KVM_RUN ioctl), so nothing slows the VMMs measured. Needs root.
#   tools/launchbench.sh [OPTIONS]      (launchbench --help: --runs, --burst, --mem-mib, --vmms, ...)
#   tools/launchbench.sh --ci           what CI runs: 3 launches and a burst of 2 each, with the debug
#                                       build CI has just built (a check that it works, not figures)
# Results: the table, `ratio launch skiff/VMM = R` and `rate launch VMM = R` lines, and
# target/launchbench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "launchbench.sh: needs root (tracefs)" >&2; exit 2; }
eval "$(resources/artifacts.sh guest)"
target=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" = --ci ]; then
  shift
  bin=$target/debug
  [ -x "$bin/launchbench" ] && [ -x "$bin/skiff" ] || cargo build -p vmm -p devices -p tools --bins
  exec "$bin/launchbench" --kernel "$SKIFF_GUEST_DIR/vmlinux" --rootfs "$SKIFF_GUEST_DIR/rootfs-busybox.ext4" \
    --bin-dir "$bin" --runs 3 --burst 2 --out "$target/launchbench-ci.json" "$@"
fi
cargo build --release -p vmm -p devices -p tools --bins
bin=$target/release
fc=()
[ -z "${FIRECRACKER:-}" ] || fc=(--firecracker "$FIRECRACKER")
exec "$bin/launchbench" --kernel "$SKIFF_GUEST_DIR/vmlinux" --rootfs "$SKIFF_GUEST_DIR/rootfs-busybox.ext4" \
  --bin-dir "$bin" --out "$target/launchbench.json" "${fc[@]}" "$@"
