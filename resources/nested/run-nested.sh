#!/usr/bin/env bash
# Run a script inside skiff's nested test host: an emulated x86-64 machine (QEMU TCG, CPU model "max",
# which includes AMD SVM with nested paging) whose kernel has KVM (kvm_amd). Ordinary KVM guests boot
# inside it, on hosts whose /dev/kvm cannot boot them (kvm_pvm) or that have no /dev/kvm at all.
#
#   run-nested.sh [-m MiB] [-c CPUS] [-t SECONDS] SCRIPT
#
# Inside, the outer root filesystem is mounted read-only (same programs, same paths), the current
# directory read-write at the same path, /tmp /run /var/tmp are tmpfs. SCRIPT (a path, relative to the
# current directory or absolute) runs under /bin/sh as root from the current directory, with the outer
# PATH HOME USER LANG TERM CI CARGO_HOME RUSTUP_HOME CARGO_TARGET_DIR RUST_LOG RUST_BACKTRACE and every
# exported SKIFF_* variable. Console output (the script's stdout and stderr) goes to stdout.
#
# Exit status: the script's own; 124 on timeout; 125 when the nested host failed (did not boot, could
# not mount, did not report the script's status); 2 on a usage or setup error.
#
# Kernel: $SKIFF_NESTED_KERNEL, else l2-host.bzImage from the artifact dir that ../artifacts.sh finds
# (which builds it when it is nowhere, about 10 minutes). Initramfs: $SKIFF_NESTED_INITRD, else
# busybox-static + l2-init.sh packed on first use into ${XDG_CACHE_HOME:-~/.cache}/skiff/nested/.
# $SKIFF_NESTED_ACCEL: QEMU -accel (default tcg,thread=multi); $SKIFF_NESTED_CPU: QEMU -cpu model (default max);
# $SKIFF_NESTED_LOGLEVEL: the nested kernel's loglevel (3); $SKIFF_NESTED_QEMU: the QEMU binary
# (default qemu-system-x86_64 on PATH); $SKIFF_NESTED_APPEND: more nested-kernel parameters;
# $SKIFF_NESTED_NICE: QEMU's nice value (default 0).
# Needs: qemu-system-x86, busybox-static, cpio.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mem=6144; cpus=$(nproc); limit=3600
usage() { echo "usage: run-nested.sh [-m MiB] [-c CPUS] [-t SECONDS] SCRIPT" >&2; exit 2; }
while getopts "m:c:t:" o; do
  case $o in m) mem=$OPTARG ;; c) cpus=$OPTARG ;; t) limit=$OPTARG ;; *) usage ;; esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
script=$1
[ -f "$script" ] || { echo "run-nested.sh: no such script: $script" >&2; exit 2; }
case "$script" in *[[:space:]\'\"]*) echo "run-nested.sh: script path must not contain spaces or quotes" >&2; exit 2 ;; esac
qemu=${SKIFF_NESTED_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null \
  || { echo "run-nested.sh: $qemu missing (apt-get install qemu-system-x86)" >&2; exit 2; }
# A QEMU unpacked outside /usr (dpkg -x, for experiments) finds its firmware beside it.
qemu_data=()
for d in share/qemu share/seabios; do
  d=$(dirname "$(command -v "$qemu")")/../$d
  [ "$(dirname "$(command -v "$qemu")")" != /usr/bin ] && [ -d "$d" ] && qemu_data+=(-L "$d")
done

kernel=${SKIFF_NESTED_KERNEL:-}
if [ -z "$kernel" ]; then
  dirs=$("$here/../artifacts.sh" nested) || { echo "run-nested.sh: no nested host kernel (resources/artifacts.sh nested failed)" >&2; exit 2; }
  kernel=$(sed -n 's/^SKIFF_NESTED_DIR=//p' <<<"$dirs")/l2-host.bzImage
fi
[ -f "$kernel" ] || { echo "run-nested.sh: nested host kernel missing: $kernel" >&2; exit 2; }

cache=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/skiff/nested
initrd=${SKIFF_NESTED_INITRD:-$cache/l2-init.cpio.gz}
if [ -z "${SKIFF_NESTED_INITRD:-}" ] && { [ ! -f "$initrd" ] || [ "$here/l2-init.sh" -nt "$initrd" ]; }; then
  bb=$(command -v busybox || true)
  if [ -z "$bb" ] || ! file -L "$bb" | grep -q 'statically linked'; then
    echo "run-nested.sh: a static busybox is needed (apt-get install busybox-static)" >&2; exit 2
  fi
  command -v cpio >/dev/null || { echo "run-nested.sh: cpio missing (apt-get install cpio)" >&2; exit 2; }
  stage=$(mktemp -d)
  mkdir -p "$stage"/{bin,proc,sys,dev,host}
  cp "$bb" "$stage/bin/busybox"
  for a in sh mount sed cut ls echo hostname chroot poweroff sync cat sleep mkdir; do ln -s busybox "$stage/bin/$a"; done
  cp "$here/l2-init.sh" "$stage/init"; chmod +x "$stage/init"
  mkdir -p "$cache"
  (cd "$stage" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$initrd.tmp.$$") && mv "$initrd.tmp.$$" "$initrd"
  rm -rf "$stage"
fi

work=$(pwd)
case "$work" in *[[:space:]\'\"]*) echo "run-nested.sh: the current directory must not contain spaces or quotes" >&2; exit 2 ;; esac
log=$(mktemp)
# The environment is handed over in a file in the shared work dir, sourced before the script.
# One file per run, so two runs from the same directory do not clash.
envname=.nested-env.$$
{
  for v in PATH HOME USER LANG TERM CI CARGO_HOME RUSTUP_HOME CARGO_TARGET_DIR RUST_LOG RUST_BACKTRACE $(compgen -e | grep '^SKIFF_' || true); do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
} > "$work/$envname"
trap 'rm -f "$log" "$work/$envname"' EXIT
set +e
# Test runs must not read the caller's terminal: QEMU gets /dev/null on stdin. An interactive
# caller (stdin is a terminal, or SKIFF_NESTED_INTERACTIVE=1 as tools/boot.sh sets) gets its
# input passed to the nested host's console, with QEMU in the foreground process group.
if [ -t 0 ] || [ -n "${SKIFF_NESTED_INTERACTIVE:-}" ]; then
  stdin=/dev/stdin; tflags=(--foreground)
else
  stdin=/dev/null; tflags=(-k 10)
fi
# If this script dies (the test runner that started it was killed: it gives us a parent-death
# signal), `timeout` gets SIGTERM and passes it to QEMU, and QEMU dies with `timeout` at the
# latest; an orphaned nested host would otherwise keep a CPU busy until its time limit.
# $SKIFF_NESTED_NICE: the nested host's nice value, to give it priority over other work on the machine
# (negative needs root), so that nothing else starves its
# emulated CPUs. Default 0: -10 did not lower the failure rate in the boot loop (README).
nice_val=${SKIFF_NESTED_NICE:-0}
setpriv --pdeathsig TERM nice -n "$nice_val" timeout "${tflags[@]}" "$limit" \
  setpriv --pdeathsig KILL "$qemu" "${qemu_data[@]}" \
  -accel "${SKIFF_NESTED_ACCEL:-tcg,thread=multi}" -cpu "${SKIFF_NESTED_CPU:-max}" -M q35 -m "$mem" -smp "$cpus" \
  -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 reboot=t panic=-1 loglevel=${SKIFF_NESTED_LOGLEVEL:-3} nested.work=$work nested.cmd=$script nested.env=$envname ${SKIFF_NESTED_APPEND:-}" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$work",mount_tag=work,security_model=none,multidevs=remap \
  <"$stdin" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && { echo "run-nested.sh: timed out after $limit s" >&2; exit 124; }
code=$(sed -n 's/.*NESTED-EXIT \([0-9]*\).*/\1/p' "$log" | tail -n 1)
[ -n "$code" ] || { echo "run-nested.sh: the nested host ended without reporting the script's status (qemu exit $rc)" >&2; exit 125; }
exit "$code"
