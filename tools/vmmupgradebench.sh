#!/usr/bin/env bash
# The VMM's live upgrade, timed (root):
#   tools/vmmupgradebench.sh [UPGRADES] [OPTIONS]   (default 1000 per memory size)
# A skiff under skiff-jailer with a skiff-blk drive and a skiff-net interface (on a TAP in a
# private network namespace) is upgraded in place UPGRADES times for a 256 MiB and a 4 GiB
# guest; the same VM is then snapshotted and loaded in a new skiff (the memory file as
# written, and again with every page holding data: the restore cost per GiB). Release
# builds of the shipped binaries, at native speed on this host. On a kvm_pvm host the guest
# kernel stops in KVM before its userspace, so the virtio devices are never activated (see
# tools/src/vmmupgradebench.rs). OPTIONS go to the program (`vmmupgradebench --help`):
# --mem-mib 256,1024, --vcpus N, --out FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrades=1000
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then upgrades=$1; shift; fi
bin=${CARGO_TARGET_DIR:-target}/release
out=${CARGO_TARGET_DIR:-target}
cargo build --release -p vmm -p devices -p jailer -p tools --bins
eval "$(resources/artifacts.sh guest)"
exec "$bin/vmmupgradebench" --upgrades "$upgrades" --bin-dir "$bin" \
  --kernel "$SKIFF_GUEST_DIR/vmlinux" --out "$out/vmmupgradebench.json" "$@"
