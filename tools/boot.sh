#!/usr/bin/env bash
# Boot a microVM to a shell on this terminal: a Linux guest with its root filesystem on a
# virtio-blk disk served by skiff-blk and, when run as root, a virtio-net link served by
# skiff-net on a TAP device this script creates (172.30.254.1/24 on the host side) and removes.
# Leave the guest with `exit` or `reboot -f` (the guest's init is a shell script: a plain
# `reboot` only signals it and does nothing). On a host whose KVM cannot boot ordinary guests
# (kvm_pvm, no VT-x/AMD-V) it runs inside the nested test host and says so.
#   tools/boot.sh [extra skiff run arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIFF_BOOT_INNER:-}" ]; then
  cargo build --release -p vmm -p devices --bins
  eval "$(resources/artifacts.sh guest)"
  mkdir -p target/boot
  cp --sparse=always "$SKIFF_GUEST_DIR/rootfs-busybox.ext4" target/boot/rootfs.ext4
  cp "$SKIFF_GUEST_DIR/vmlinux" target/boot/vmlinux
  if ! grep -qwE 'vmx|svm' /proc/cpuinfo || [ -d /sys/module/kvm_pvm ]; then
    echo "boot.sh: this host's KVM cannot boot ordinary Linux guests (kvm_pvm, no VT-x/AMD-V);"
    echo "boot.sh: booting inside the nested test host (QEMU TCG with AMD-V: slower, same code)."
    script=target/boot/inner.sh
    { echo "export SKIFF_BOOT_INNER=1"; printf 'exec tools/boot.sh'; [ $# -eq 0 ] || printf ' %q' "$@"; echo; } > "$script"
    SKIFF_NESTED_INTERACTIVE=1 exec resources/nested/run-nested.sh -t 3600 "$script"
  fi
fi
args=(run --kernel target/boot/vmlinux --rootfs target/boot/rootfs.ext4 --vcpus 2 --memory 512)
tap=""
if [ "$(id -u)" = 0 ] && [ -e /dev/net/tun ]; then
  tap=skiffboot0
  ip tuntap add dev $tap mode tap 2>/dev/null || true
  ip addr add 172.30.254.1/24 dev $tap 2>/dev/null || true
  ip link set $tap up
  trap 'ip link del '$tap' 2>/dev/null || true' EXIT
  args+=(--net tap=$tap --cmdline "ip=172.30.254.2::172.30.254.1:255.255.255.0::eth0:off")
  echo "boot.sh: guest eth0 is 172.30.254.2, host side $tap is 172.30.254.1"
fi
echo "boot.sh: starting skiff; type 'exit' (or 'reboot -f') in the guest to leave"
"${CARGO_TARGET_DIR:-target}/release/skiff" "${args[@]}" "$@"
