#!/bin/sh
# /init of skiff's nested test host (L2), packed with a static busybox into an initramfs by run-nested.sh.
# Mounts the outer host's root read-only over 9p, the outer work directory read-write at the same path,
# sources the environment file run-nested.sh left in the work dir, runs one script there and reports
#   NESTED-EXIT <status>
# on the console (run-nested.sh turns that into its own exit status).
# Kernel parameters: nested.work=DIR nested.cmd=SCRIPT (relative to DIR) nested.env=FILE (relative to DIR)
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
WORK=$(arg nested.work)
CMD=$(arg nested.cmd)
ENVF=$(arg nested.env)
fail() { echo "NESTED-EXIT 125 ($1)"; sync; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host || fail "no host root"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts 2>/dev/null
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -t tmpfs -o size=75% tmp /host/tmp
mount -t tmpfs run /host/run
mount -t tmpfs varrun /host/var/tmp 2>/dev/null
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
if [ -n "$WORK" ]; then
  mkdir -p "/host$WORK" 2>/dev/null   # a work dir under /tmp lives on the tmpfs above
  mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=524288 work "/host$WORK" || fail "no work dir"
fi
hostname nested-kvm
echo "NESTED-READY $(cut -d' ' -f1 /proc/uptime)s $(ls /dev/kvm 2>/dev/null)"
chroot /host /bin/sh -c "cd '${WORK:-/}' && { [ -n '$ENVF' ] && [ -f '$ENVF' ] && . './$ENVF'; exec /bin/sh '$CMD'; }" </dev/console >/dev/console 2>&1
echo "NESTED-EXIT $?"
sync
poweroff -f
