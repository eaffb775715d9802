#!/usr/bin/env bash
# Boot benchmark: skiff (virtio-mmio, and virtio-pci with --enable-pci) vs QEMU microvm and
# QEMU q35, every one with ACPI (and skiff started through skiff-jailer), side by side in one
# run on the same host: first skiff's own guest kernel, then Debian's stock cloud kernel with
# the initramfs of its modules (resources/stock), then the whole Debian image
# (resources/debian: its own kernel and initramfs, systemd, cloud-init) to systemd's
# multi-user target (DEBIAN_RUNS boots each, default 2; 0 leaves it out).
# Runs directly when this host's KVM boots ordinary guests (VT-x/AMD-V); otherwise inside
# the nested test host (resources/nested/run-nested.sh), where every figure is under TCG.
#   tools/bootbench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release -p vmm -p devices -p jailer -p tools --bins
debian_runs=${DEBIAN_RUNS:-2}
kinds="guest nested stock"
[ "$debian_runs" = 0 ] || kinds="$kinds debian"
eval "$(resources/artifacts.sh $kinds)"
out=target/bootbench
mkdir -p "$out"
bin=${CARGO_TARGET_DIR:-target}/release
common="--rootfs $SKIFF_GUEST_DIR/rootfs-busybox.ext4 --runs $runs --vcpus 2 --memory 256 --skiff $bin/skiff --jailer $bin/skiff-jailer"
debian=""
if [ "$debian_runs" != 0 ]; then
  zstd -q -d -f --long=27 -o "$out/debian-rootfs.ext4" "$SKIFF_DEBIAN_DIR/debian-rootfs.ext4.zst"
  # systemd prints "Reached target Multi-User System" on the console; the monitor is then
  # stopped (SIGTERM). 512 MiB: cloud-init is Python.
  debian="echo '== Debian image (systemd, cloud-init) to multi-user.target'; $bin/bootbench --kernel $SKIFF_DEBIAN_DIR/debian-vmlinuz --initrd $SKIFF_DEBIAN_DIR/debian-initrd.img --rootfs $out/debian-rootfs.ext4 --runs $debian_runs --vcpus 2 --memory 512 --skiff $bin/skiff --jailer $bin/skiff-jailer --marker 'Multi-User System' --stop-at-marker --timeout 600 --json $out/bootbench-debian.json || rc=1;"
fi
# Both kernels run even when the first fails; the status says whether either did.
cmd="rc=0; echo '== skiff guest kernel (vmlinux)'; $bin/bootbench --kernel $SKIFF_GUEST_DIR/vmlinux $common --json $out/bootbench.json || rc=1; \
echo '== Debian stock cloud kernel + initramfs of its modules'; $bin/bootbench --kernel $SKIFF_STOCK_DIR/vmlinuz-cloud --initrd $SKIFF_STOCK_DIR/initramfs-cloud.cpio.gz $common --json $out/bootbench-stock.json || rc=1; $debian exit \$rc"
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
  echo "bootbench: running directly on this host's KVM"
  sh -c "$cmd"
else
  echo "bootbench: host KVM cannot boot ordinary guests; running inside the nested test host (figures are under TCG)"
  script=.bootbench-nested.sh
  printf '%s\n' "$cmd" > "$script"
  trap 'rm -f "$script"' EXIT
  resources/nested/run-nested.sh -t 3600 "$script"
fi
