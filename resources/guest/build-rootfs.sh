#!/usr/bin/env bash
# Build the guest root filesystems used by skiff's tests into OUTDIR:
#   rootfs-busybox.ext4         16 MiB ext4 (4 KiB blocks, label "rootfs"): busybox-static + applet links + /init
#   initramfs-busybox.cpio.gz   the same tree as a newc initramfs (boot with an initrd and no root=)
#
# Usage: build-rootfs.sh OUTDIR        (work dir: $W, default /tmp/skiff-rootfs-build)
# Needs: busybox-static, e2fsprogs (mke2fs -d), cpio, gzip. Takes about 2 seconds.
#
# /init is guest-init.sh (next to this script): it prints
#   GUEST-READY uptime=<s>s cpus=<n> kernel=<release> bench=<mode>
# then acts on bench= from the kernel command line (bench=boot: reboot at once; unset: a shell on
# the console; leaving the shell reboots). The Debian fio/iperf3 bench image of ../../shared/guest
# is not built here: the tests do not use it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-rootfs.sh OUTDIR}
W=${W:-/tmp/skiff-rootfs-build}
BUSYBOX=${BUSYBOX:-/bin/busybox}
SIZE_MB=${BB_SIZE_MB:-16}
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
  || { echo "build-rootfs.sh: $BUSYBOX is not a static busybox (apt-get install busybox-static)" >&2; exit 2; }
command -v mke2fs >/dev/null || { echo "build-rootfs.sh: mke2fs missing (apt-get install e2fsprogs)" >&2; exit 2; }
command -v cpio >/dev/null || { echo "build-rootfs.sh: cpio missing (apt-get install cpio)" >&2; exit 2; }
mkdir -p "$W" "$OUT"
OUT=$(cd "$OUT" && pwd)
T=$W/rootfs
# Fixed timestamps and ids keep repeated builds on one host alike.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1795000000}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH

rm -rf "$T"; mkdir -p "$T"
mkdir -p "$T"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,mnt,etc,var/tmp,var/log}
chmod 1777 "$T/tmp" "$T/var/tmp"; chmod 700 "$T/root"
install -m 0755 "$BUSYBOX" "$T/bin/busybox"
for p in $("$BUSYBOX" --list-full); do
  case "$p" in linuxrc|bin/busybox|sbin/init) continue ;; esac
  mkdir -p "$T/$(dirname "$p")"
  ln -sf /bin/busybox "$T/$p"
done
install -m 0755 "$HERE/guest-init.sh" "$T/init"
ln -sf /init "$T/sbin/init"
echo guest > "$T/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$T/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$T/etc/group"
printf '127.0.0.1 localhost\n127.0.1.1 guest\n' > "$T/etc/hosts"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$T/etc/nsswitch.conf"
printf 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='"'"'guest:\\w\\$ '"'"'\n' > "$T/etc/profile"
find "$T" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

uuid=5b1a3c6e-0000-4000-8000-000000000001
rm -f "$OUT/rootfs-busybox.ext4"
mke2fs -q -F -t ext4 -b 4096 -L rootfs -U "$uuid" -m 0 \
  -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,hash_seed="$uuid" \
  -d "$T" "$OUT/rootfs-busybox.ext4" "${SIZE_MB}M"
e2fsck -fn "$OUT/rootfs-busybox.ext4" >/dev/null 2>&1 || { echo "build-rootfs.sh: e2fsck failed" >&2; exit 1; }

mknod -m 600 "$T/dev/console" c 5 1
(cd "$T" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 --reproducible) \
  | gzip -9n > "$OUT/initramfs-busybox.cpio.gz"
rm -f "$T/dev/console"
ls -l "$OUT/rootfs-busybox.ext4" "$OUT/initramfs-busybox.cpio.gz"
