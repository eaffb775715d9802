#!/usr/bin/env bash
# Build a whole Debian bookworm image, as an ECS-like cloud image is, into OUTDIR:
#   debian-rootfs.ext4.zst   ext4 root filesystem (2 GiB sparse, label "rootfs"), zstd-compressed: debootstrap
#                            of systemd, udev, cloud-init, ifupdown, iproute2 and linux-image-cloud-amd64
#   debian-vmlinuz           the image's own kernel (/boot/vmlinuz-*), unchanged
#   debian-initrd.img        the image's own initramfs, made by initramfs-tools in the image (virtio modules
#                            listed in /etc/initramfs-tools/modules: it mounts its root from /dev/vda)
#
# Usage: build-image.sh OUTDIR     (work dir: $W, default /tmp/skiff-debian-build)
# Needs: root, debootstrap, e2fsprogs, zstd; the Debian mirror ($MIRROR, default the one apt uses).
# Takes a few minutes (about 250 MB of packages).
#
# The image is configured the way a cloud image is and nothing more: no password for root (login
# only with what cloud-init's user data brings), a serial console on ttyS0, DHCP-less networking
# left to cloud-init, cloud-init's NoCloud datasource (a drive labelled "cidata") first.
set -euo pipefail
OUT=${1:?usage: build-image.sh OUTDIR}
W=${W:-/tmp/skiff-debian-build}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
SIZE=${DEBIAN_IMAGE_SIZE:-2G}
[ "$(id -u)" = 0 ] || { echo "build-image.sh: needs root (debootstrap)" >&2; exit 2; }
for t in debootstrap mke2fs zstd; do
  command -v "$t" >/dev/null || { echo "build-image.sh: '$t' missing (apt-get install debootstrap e2fsprogs zstd)" >&2; exit 2; }
done
mkdir -p "$W" "$OUT"
OUT=$(cd "$OUT" && pwd)
T=$W/root
cleanup() {
  for m in proc sys dev/pts dev; do umount "$T/$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$T"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1795000000}
echo "build-image.sh: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,ifupdown,iproute2,procps,initramfs-tools,zstd \
  "$SUITE" "$T" "$MIRROR" > "$W/debootstrap.log" 2>&1 \
  || { tail -30 "$W/debootstrap.log" >&2; echo "build-image.sh: debootstrap failed (log: $W/debootstrap.log)" >&2; exit 1; }
mount -t proc proc "$T/proc"
mount -t sysfs sys "$T/sys"
mount --bind /dev "$T/dev"
mount --bind /dev/pts "$T/dev/pts"
# The virtio drivers the initramfs needs to reach its root (and the network) under skiff.
mkdir -p "$T/etc/initramfs-tools"
printf '%s\n' virtio_mmio virtio_pci virtio_blk virtio_net >> "$T/etc/initramfs-tools/modules"
echo 'COMPRESS=zstd' > "$T/etc/initramfs-tools/conf.d/compress"
cat > "$T/etc/fstab" <<'FSTAB'
LABEL=rootfs / ext4 rw,discard,errors=remount-ro 0 1
FSTAB
echo debian > "$T/etc/hostname"
cat > "$T/etc/network/interfaces" <<'IF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
IF
# The sources a Debian cloud image has (updates and security: the current kernel).
cat > "$T/etc/apt/sources.list" <<SRC
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
SRC
chroot "$T" apt-get update -qq > "$W/apt.log" 2>&1 \
  || { tail -30 "$W/apt.log" >&2; echo "build-image.sh: apt-get update in the image failed" >&2; exit 1; }
# apt's resolver (debootstrap's cannot follow cloud-init's virtual dependencies).
chroot "$T" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  linux-image-cloud-amd64 cloud-init isc-dhcp-client >> "$W/apt.log" 2>&1 \
  || { tail -30 "$W/apt.log" >&2; echo "build-image.sh: installing the kernel and cloud-init failed" >&2; exit 1; }
# cloud-init: NoCloud (a "cidata" drive) first, nothing that waits for a metadata server.
cat > "$T/etc/cloud/cloud.cfg.d/90-skiff.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
CFG
chroot "$T" passwd -l root >/dev/null
chroot "$T" apt-get clean
rm -rf "$T/var/lib/apt/lists/"* "$T/var/log/"*.log "$T/tmp/"*
: > "$T/etc/machine-id"
cleanup
kernel=$(ls "$T"/boot/vmlinuz-* | head -1)
initrd=$(ls "$T"/boot/initrd.img-* | head -1)
install -m 0444 "$kernel" "$OUT/debian-vmlinuz"
install -m 0444 "$initrd" "$OUT/debian-initrd.img"
rm -f "$W/rootfs.ext4"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -t ext4 -L rootfs -b 4096 -d "$T" "$W/rootfs.ext4" "$SIZE"
zstd -q -f -T0 -10 "$W/rootfs.ext4" -o "$OUT/debian-rootfs.ext4.zst"
echo "build-image.sh: $(basename "$kernel") -> $OUT/debian-vmlinuz, debian-initrd.img, debian-rootfs.ext4.zst ($(du -h "$OUT/debian-rootfs.ext4.zst" | cut -f1))"
