#!/usr/bin/env bash
# Device-process upgrade benchmarks (root):
#   tools/upgradebench.sh [UPGRADES] [OPTIONS]  (default 1000) N upgrades each of skiff-blk
#       and skiff-net under load, timed at native speed on this host with a synthetic front
#       end playing the guest, the VMM's side being the VMM's own code (no guest; see the doc
#       comment of tools/src/upgradebench/main.rs). Creates its TAP in a private network
#       namespace. OPTIONS go to the program (--crash, --no-seccomp, --devices blk, ...;
#       `upgradebench --help`).
#   tools/upgradebench.sh --guest [UPGRADES]   (default 1000) the same in a real guest under
#       fio and a TCP stream, with the guest-side effect beside a baseline without upgrades
#       (tools/src/guestupgradebench.rs). Runs directly when this host's KVM boots ordinary
#       guests (VT-x/AMD-V); otherwise inside the nested test host, where every figure is
#       under TCG.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/release
out=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" != --guest ]; then
  upgrades=1000
  if [[ "${1:-}" =~ ^[0-9]+$ ]]; then upgrades=$1; shift; fi
  cargo build --release -p devices -p tools --bins
  exec "$bin/upgradebench" --upgrades "$upgrades" --device-bin-dir "$bin" \
    --out "$out/upgradebench.json" "$@"
fi
upgrades=${2:-1000}
cargo build --release -p vmm -p devices -p tools --bins
eval "$(resources/artifacts.sh guest)"
# Under the checkout, not $CARGO_TARGET_DIR: only the checkout is writable in the nested host.
dir=target/upgradebench-guest
mkdir -p "$dir"
zstd -q -d -f --long=27 -o "$dir/rootfs.ext4" "$SKIFF_GUEST_DIR/rootfs-bench.ext4.zst"
cmd="$bin/upgradebench-guest --skiff $bin/skiff --kernel $SKIFF_GUEST_DIR/vmlinux --rootfs $dir/rootfs.ext4 --dir $dir --upgrades $upgrades"
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
  echo "upgradebench --guest: running directly on this host's KVM"
  run() { $cmd "$@"; }
else
  echo "upgradebench --guest: host KVM cannot boot ordinary guests; running inside the nested test host (figures are under TCG)"
  script=.upgradebench-nested.sh
  trap 'rm -f "$script"' EXIT
  run() { printf '%s %s\n' "$cmd" "$*" > "$script"; resources/nested/run-nested.sh -t 3600 "$script"; }
fi
# A guest that dies (the nested host's guests sometimes triple-fault; the nested host itself
# sometimes dies) ends a run: start again and go on from the progress saved after each chunk.
run && exit 0
for attempt in 2 3 4 5 6; do
  echo "upgradebench --guest: the run failed; attempt $attempt goes on from the saved progress"
  run --resume && exit 0
done
exit 1
