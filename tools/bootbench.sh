#!/usr/bin/env bash
# Boot benchmark: skiff vs QEMU microvm (and skiff started through skiff-jailer), side by
# side in one run on the same host.
# Runs directly when this host's KVM boots ordinary guests (VT-x/AMD-V); otherwise inside
# the nested test host (resources/nested/run-nested.sh), where every figure is under TCG.
#   tools/bootbench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release -p vmm -p devices -p jailer -p tools --bins
eval "$(resources/artifacts.sh)"
out=target/bootbench
mkdir -p "$out"
bin=${CARGO_TARGET_DIR:-target}/release
cmd="$bin/bootbench --kernel $SKIFF_GUEST_DIR/vmlinux --rootfs $SKIFF_GUEST_DIR/rootfs-busybox.ext4 --runs $runs --vcpus 2 --memory 256 --skiff $bin/skiff --jailer $bin/skiff-jailer --json $out/bootbench.json"
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
  echo "bootbench: running directly on this host's KVM"
  $cmd
else
  echo "bootbench: host KVM cannot boot ordinary guests; running inside the nested test host (figures are under TCG)"
  script=.bootbench-nested.sh
  printf '%s\n' "$cmd" > "$script"
  trap 'rm -f "$script"' EXIT
  resources/nested/run-nested.sh -t 1800 "$script"
fi
