#!/usr/bin/env bash
# Build skiff's guest kernel (Linux 6.1 from Debian's linux-source-6.1) and copy the results to OUTDIR:
#   vmlinux  (ELF, PVH note; strip --strip-debug)   bzImage (LZ4)   kernel.config (the full .config)
#
# Usage: [JOBS=n] [CLEAN=1] build-kernel.sh OUTDIR [WORKDIR]     (WORKDIR default: /tmp/skiff-kernel-build)
# Needs: linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev lz4
# Takes about 4 minutes on 2 cores from a fresh tree (plus ~10 s to unpack the source).
#
# Config: tinyconfig -> kvm_guest.config -> kernel.config.fragment (as skiffguest.config); every line of
# the fragment is then checked against the final .config.
set -euo pipefail
OUT=${1:?usage: build-kernel.sh OUTDIR [WORKDIR]}
W=${2:-/tmp/skiff-kernel-build}
HERE=$(cd "$(dirname "$0")" && pwd)
FRAG=$HERE/kernel.config.fragment
SRC=$W/linux-source-6.1
JOBS=${JOBS:-$(nproc)}
TARBALL=/usr/src/linux-source-6.1.tar.xz
[ -f "$TARBALL" ] || { echo "build-kernel.sh: $TARBALL missing (apt-get install linux-source-6.1)" >&2; exit 2; }
for t in gcc make flex bison bc lz4; do
  command -v "$t" >/dev/null || { echo "build-kernel.sh: '$t' missing (apt-get install build-essential flex bison bc libelf-dev libssl-dev lz4)" >&2; exit 2; }
done
mkdir -p "$W" "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ ! -d "$SRC" ]; then
  echo "build-kernel.sh: unpacking $TARBALL into $W"
  tar -C "$W" -xf "$TARBALL"
fi
cd "$SRC"
export ARCH=x86_64
# Same identity as the pinned build, so `uname -v` and the banner look alike (the build is still not
# bit-for-bit reproducible: compiler and source versions can differ).
export KBUILD_BUILD_USER=root KBUILD_BUILD_HOST=vm
[ "${CLEAN:-0}" = 1 ] && make -s mrproper
make -s tinyconfig
make -s kvm_guest.config
cp "$FRAG" kernel/configs/skiffguest.config
make -s skiffguest.config
fail=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) opt=${line%%=*}
      got=$(grep -E "^$opt=" .config || true)
      [ "$got" = "$line" ] || { echo "MISMATCH: want '$line' got '${got:-<unset>}'"; fail=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
      if grep -qE "^$opt=" .config; then echo "MISMATCH: want $opt unset, got $(grep -E "^$opt=" .config)"; fail=1; fi ;;
  esac
done < "$FRAG"
[ $fail = 0 ] || { echo "build-kernel.sh: config fragment not fully applied" >&2; exit 1; }
start=$(date +%s)
make -s -j"$JOBS" vmlinux bzImage
echo "build-kernel.sh: kernel built in $(( $(date +%s) - start )) s"
strip --strip-debug -o "$OUT/vmlinux" vmlinux
cp arch/x86/boot/bzImage "$OUT/bzImage"
cp .config "$OUT/kernel.config"
ls -l "$OUT/vmlinux" "$OUT/bzImage"
