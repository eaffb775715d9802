#!/bin/sh
# /init of the stock-kernel initramfs (resources/stock/build-stock.sh): loads the Debian cloud
# kernel's virtio, ACPI button and evdev modules (its virtio_mmio finds skiff's devices through
# ACPI), mounts root= (default /dev/vda; ext4; ro or rw as the command line says) and hands
# over to its /sbin/init. When that fails it exits: the kernel panics (panic=1 reboots), so a
# broken stock boot never looks like a clean power-off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$m" || echo "stock-init: insmod $m failed"
done
root=/dev/vda
flags=rw
for a in $(cat /proc/cmdline); do
  case "$a" in
    root=*) root=${a#root=} ;;
    ro) flags=ro ;;
    rw) flags=rw ;;
  esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o "$flags" "$root" /newroot; then
  echo "stock-init: cannot mount $root; devices: $(ls /sys/bus/virtio/devices 2>&1)"
  exit 1
fi
umount /proc /sys
mount -t devtmpfs devtmpfs /newroot/dev 2>/dev/null
umount /dev
exec switch_root /newroot /sbin/init
