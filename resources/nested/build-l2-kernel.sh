#!/usr/bin/env bash
# Build the nested test host (L2) kernel from Debian's linux-source-6.1 into OUTDIR:
#   l2-host.bzImage   l2-host.config
# Config: tinyconfig -> kvm_guest.config -> ../guest/kernel.config.fragment + l2-host.config.fragment.
#
# Usage: [JOBS=n] build-l2-kernel.sh OUTDIR [WORKDIR]     (WORKDIR default: /tmp/skiff-l2-build)
# Needs: linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev lz4
# Takes about 10 minutes on 2 cores from a fresh tree.
set -euo pipefail
OUT=${1:?usage: build-l2-kernel.sh OUTDIR [WORKDIR]}
W=${2:-/tmp/skiff-l2-build}
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$W/linux-source-6.1
JOBS=${JOBS:-$(nproc)}
TARBALL=/usr/src/linux-source-6.1.tar.xz
[ -f "$TARBALL" ] || { echo "build-l2-kernel.sh: $TARBALL missing (apt-get install linux-source-6.1)" >&2; exit 2; }
mkdir -p "$W" "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -d "$SRC" ] || tar -C "$W" -xf "$TARBALL"
cd "$SRC"
export ARCH=x86_64 KBUILD_BUILD_USER=root KBUILD_BUILD_HOST=vm
make -s tinyconfig
make -s kvm_guest.config
cat "$HERE/../guest/kernel.config.fragment" "$HERE/l2-host.config.fragment" > kernel/configs/skiffnested.config
make -s skiffnested.config
fail=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) opt=${line%%=*}
      got=$(grep -E "^$opt=" .config || true)
      [ "$got" = "$line" ] || { echo "MISMATCH: want '$line' got '${got:-<unset>}'"; fail=1; } ;;
  esac
done < "$HERE/l2-host.config.fragment"
[ $fail = 0 ] || { echo "build-l2-kernel.sh: nested host config fragment not fully applied" >&2; exit 1; }
start=$(date +%s)
make -s -j"$JOBS" bzImage
echo "build-l2-kernel.sh: kernel built in $(( $(date +%s) - start )) s"
cp arch/x86/boot/bzImage "$OUT/l2-host.bzImage"
cp .config "$OUT/l2-host.config"
