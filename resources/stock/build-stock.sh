#!/usr/bin/env bash
# Build the "stock guest" artifacts into OUTDIR from Debian's own packages:
#   vmlinuz-cloud           Debian bookworm's cloud kernel (package linux-image-$ABI, bzImage), unchanged
#   initramfs-cloud.cpio.gz busybox-static + that package's virtio, ACPI button and evdev modules +
#                           stock-init.sh as /init (loads the modules, mounts root=, switch_root)
#
# Usage: build-stock.sh OUTDIR        (work dir: a fresh mktemp -d, removed at the end)
# Needs: apt-get (downloads one .deb from the configured Debian mirror), dpkg-deb, busybox-static,
# cpio, gzip. Takes about 10 seconds.
#
# The kernel is what an ECS-like Debian image boots: virtio_mmio, virtio_blk and virtio_net are
# modules, and it is built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so it finds skiff's devices
# only through ACPI. The package version is pinned ($ABI, $VERSION, and the checksums in
# SHA256SUMS). Debian drops a kernel ABI from the mirror at point releases: when the pinned one is
# gone, this script takes the one linux-image-cloud-amd64 depends on now and says so loudly
# (artifacts.sh then reports the checksum difference); update ABI, VERSION and SHA256SUMS.
# The initramfs is byte-for-byte reproducible for a given busybox-static (the host's).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-stock.sh OUTDIR}
ABI=${STOCK_ABI:-6.1.0-57-cloud-amd64}
VERSION=${STOCK_VERSION:-6.1.192-3}
BUSYBOX=${BUSYBOX:-/bin/busybox}
PKG=linux-image-$ABI
# Module load order (dependencies first); paths under /lib/modules/$ABI/kernel.
MODULES="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_mmio.ko
drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci.ko
drivers/block/virtio_blk.ko net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko
drivers/acpi/button.ko drivers/input/evdev.ko"
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
  || { echo "build-stock.sh: $BUSYBOX is not a static busybox (apt-get install busybox-static)" >&2; exit 2; }
for t in apt-get dpkg-deb cpio gzip; do
  command -v "$t" >/dev/null || { echo "build-stock.sh: '$t' missing" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d /tmp/skiff-stock-build.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W"
if ! apt-get download "$PKG=$VERSION" >/dev/null 2>apt.err; then
  apt-get update -qq >/dev/null 2>&1 || true
  if ! apt-get download "$PKG=$VERSION" >/dev/null 2>apt.err; then
    cat apt.err >&2
    now=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-cloud-amd64\)$/\1/p' | head -1)
    [ -n "$now" ] || { echo "build-stock.sh: cannot download $PKG=$VERSION, and the mirror names no current cloud kernel" >&2; exit 1; }
    echo "build-stock.sh: WARNING: the mirror no longer has the pinned $PKG=$VERSION; taking linux-image-$now, the kernel linux-image-cloud-amd64 depends on now (update ABI, VERSION and SHA256SUMS)" >&2
    ABI=$now
    VERSION="(the mirror's current)"
    PKG=linux-image-$ABI
    apt-get download "$PKG" >/dev/null || { echo "build-stock.sh: cannot download $PKG either" >&2; exit 1; }
  fi
fi
dpkg-deb -x "$PKG"_*.deb pkg
M=pkg/lib/modules/$ABI
install -m 0444 "pkg/boot/vmlinuz-$ABI" "$OUT/vmlinuz-cloud"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1795000000}
T=$W/initramfs
mkdir -p "$T"/{bin,sbin,proc,sys,dev,newroot,lib/modules}
install -m 0755 "$BUSYBOX" "$T/bin/busybox"
for a in sh mount umount mkdir insmod switch_root sleep cat echo ls reboot poweroff; do
  ln -sf busybox "$T/bin/$a"
done
: > "$T/lib/modules/load-order"
for m in $MODULES; do
  [ -f "$M/kernel/$m" ] || { echo "build-stock.sh: $PKG has no $m" >&2; exit 1; }
  # Every module it depends on (modinfo's depends=) must be loaded before it.
  for d in $(grep -a -o -m1 'depends=[a-z0-9_,-]*' "$M/kernel/$m" | cut -d= -f2 | tr ',' ' '); do
    grep -qx "$d.ko" "$T/lib/modules/load-order" \
      || { echo "build-stock.sh: $m needs $d loaded before it; fix MODULES" >&2; exit 1; }
  done
  install -m 0444 "$M/kernel/$m" "$T/lib/modules/"
  basename "$m" >> "$T/lib/modules/load-order"
done
install -m 0755 "$HERE/stock-init.sh" "$T/init"
find "$T" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$T" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible -R 0:0) | gzip -9 -n > "$OUT/initramfs-cloud.cpio.gz"
echo "build-stock.sh: $PKG $VERSION -> $OUT/vmlinuz-cloud, $OUT/initramfs-cloud.cpio.gz"
