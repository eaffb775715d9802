#!/usr/bin/env bash
# Find (or build) the artifacts skiff's tests boot, and print where they are.
#
#   artifacts.sh [--no-build] [guest|nested|stock|debian|all]        (default: guest and nested)
#
# Output on stdout, one KEY=VALUE line per kind asked for (absolute paths, no quoting needed), e.g.
#   SKIFF_GUEST_DIR=/work/shared/guest       holds vmlinux bzImage rootfs-busybox.ext4 initramfs-busybox.cpio.gz
#   SKIFF_NESTED_DIR=/work/shared/nested     holds l2-host.bzImage
#   SKIFF_STOCK_DIR=~/.cache/skiff/artifacts/stock   holds vmlinuz-cloud initramfs-cloud.cpio.gz (Debian's
#                                                    cloud kernel and an initramfs of its modules)
#   SKIFF_DEBIAN_DIR=~/.cache/skiff/artifacts/debian holds debian-vmlinuz debian-initrd.img debian-rootfs.ext4.zst
#                                                    (a whole Debian image: systemd, cloud-init, its own kernel)
# so `eval "$(resources/artifacts.sh)"` works in a shell. Progress and warnings go to stderr.
# Exit status 0 when every kind asked for was found (or built) and verified, 1 otherwise.
#
# Lookup, for each kind separately, first match wins:
#   1. $SKIFF_ARTIFACTS: a directory holding the files directly, or in guest/ and nested/ subdirectories.
#      Checksums are compared with resources/{guest,nested}/SHA256SUMS; a difference is only a warning
#      (an explicit override may hold your own kernel).
#   2. <repo>/../shared/{guest,nested}: the pinned prebuilt artifacts beside the checkout. A checksum
#      difference is an error.
#   3. ${XDG_CACHE_HOME:-~/.cache}/skiff/artifacts/{guest,nested}: artifacts built earlier by this script,
#      checked against the SHA256SUMS written when they were built.
#   4. Otherwise (unless --no-build) they are built into the cache dir of 3 with resources/guest and
#      resources/nested recipes: guest kernel about 4 minutes, root filesystems a few seconds, nested host
#      kernel about 10 minutes (2 cores); stock (resources/stock: one .deb from the Debian mirror) seconds;
#      debian (resources/debian: debootstrap from the Debian mirror, root) a few minutes. The debian image is
#      not reproducible (package versions move): it has no pinned checksums, only those written when built. Kernel builds are not bit-for-bit reproducible, so built files
#      get their own SHA256SUMS and a note that they differ from the pinned ones.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BUILD=1
KINDS=()
for a in "$@"; do
  case $a in
    --no-build) BUILD=0 ;;
    guest|nested|stock|debian) KINDS+=("$a") ;;
    all) KINDS+=(guest nested stock debian) ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "artifacts.sh: unknown argument: $a" >&2; exit 2 ;;
  esac
done
[ ${#KINDS[@]} -gt 0 ] || KINDS=(guest nested)
CACHE=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/skiff/artifacts
log() { echo "artifacts.sh: $*" >&2; }

files_of() {
  case $1 in
    guest) echo "vmlinux bzImage rootfs-busybox.ext4 initramfs-busybox.cpio.gz" ;;
    nested) echo "l2-host.bzImage" ;;
    stock) echo "vmlinuz-cloud initramfs-cloud.cpio.gz" ;;
    debian) echo "debian-vmlinuz debian-initrd.img debian-rootfs.ext4.zst" ;;
  esac
}
has_all() {   # $1 kind, $2 dir
  local f
  [ -d "$2" ] || return 1
  for f in $(files_of "$1"); do [ -f "$2/$f" ] || return 1; done
}
# verify KIND DIR SUMSFILE: every file of KIND in DIR has the checksum SUMSFILE gives it.
verify() {
  local kind=$1 dir=$2 sums=$3 f want got bad=0
  for f in $(files_of "$kind"); do
    want=$(awk -v f="$f" '$2 == f || $2 == "*" f {print $1}' "$sums")
    if [ -z "$want" ]; then log "no checksum for $f in $sums"; bad=1; continue; fi
    got=$(sha256sum "$dir/$f" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { log "checksum mismatch: $dir/$f is $got, $sums says $want"; bad=1; }
  done
  return $bad
}

build() {   # build KIND into $CACHE/KIND
  local kind=$1 out=$CACHE/$1 t0
  mkdir -p "$out"
  t0=$(date +%s)
  case $kind in
    guest)
      log "building the guest artifacts into $out: this takes about 5 minutes (kernel ~4 min on 2 cores, root filesystems ~2 s)"
      log "step 1/2: guest kernel (resources/guest/build-kernel.sh)"
      "$HERE/guest/build-kernel.sh" "$out" >&2
      log "step 2/2: root filesystems (resources/guest/build-rootfs.sh)"
      "$HERE/guest/build-rootfs.sh" "$out" >&2
      ;;
    nested)
      log "building the nested host kernel into $out: this takes about 10 minutes on 2 cores"
      "$HERE/nested/build-l2-kernel.sh" "$out" >&2
      ;;
    stock)
      log "building the stock guest artifacts into $out from Debian's cloud kernel package (seconds)"
      "$HERE/stock/build-stock.sh" "$out" >&2
      ;;
    debian)
      log "building the Debian image into $out with debootstrap (a few minutes, ~250 MB from the mirror)"
      "$HERE/debian/build-image.sh" "$out" >&2
      ;;
  esac
  (cd "$out" && sha256sum $(files_of "$kind") > SHA256SUMS.new && mv SHA256SUMS.new SHA256SUMS)
  if [ "$kind" != debian ] && ! verify "$kind" "$out" "$HERE/$kind/SHA256SUMS" 2>/dev/null; then
    case $kind in
      stock) log "note: the stock artifacts built here differ from the pinned ones in resources/stock/SHA256SUMS (the Debian mirror moved to another kernel, or this host's busybox-static differs); their own checksums are in $out/SHA256SUMS" ;;
      *) log "note: the $kind artifacts built here differ from the pinned ones in resources/$kind/SHA256SUMS (kernel builds are not reproducible); their own checksums are in $out/SHA256SUMS" ;;
    esac
  fi
  log "$kind artifacts built in $(( $(date +%s) - t0 )) s"
}

find_kind() {   # prints the dir for KIND, or fails
  local kind=$1 d
  if [ -n "${SKIFF_ARTIFACTS:-}" ]; then
    for d in "$SKIFF_ARTIFACTS/$kind" "$SKIFF_ARTIFACTS"; do
      if has_all "$kind" "$d"; then
        verify "$kind" "$d" "$HERE/$kind/SHA256SUMS" || log "warning: $kind artifacts in \$SKIFF_ARTIFACTS ($d) differ from the pinned checksums; using them anyway"
        (cd "$d" && pwd); return 0
      fi
    done
    log "\$SKIFF_ARTIFACTS=$SKIFF_ARTIFACTS has no complete set of $kind artifacts ($(files_of "$kind")); looking further"
  fi
  d=$REPO/../shared/$kind
  if has_all "$kind" "$d"; then
    d=$(cd "$d" && pwd)
    verify "$kind" "$d" "$HERE/$kind/SHA256SUMS" || { log "error: $d does not match resources/$kind/SHA256SUMS"; return 1; }
    echo "$d"; return 0
  fi
  d=$CACHE/$kind
  if has_all "$kind" "$d" && [ -f "$d/SHA256SUMS" ]; then
    verify "$kind" "$d" "$d/SHA256SUMS" || { log "error: cached $kind artifacts in $d are damaged; remove $d to rebuild"; return 1; }
    echo "$d"; return 0
  fi
  if [ "$BUILD" = 0 ]; then
    log "no $kind artifacts found (\$SKIFF_ARTIFACTS, $REPO/../shared/$kind, $CACHE/$kind) and --no-build given"
    return 1
  fi
  log "no $kind artifacts in \$SKIFF_ARTIFACTS, $REPO/../shared/$kind or $CACHE/$kind"
  build "$kind" || { log "error: building the $kind artifacts failed"; return 1; }
  verify "$kind" "$d" "$d/SHA256SUMS" || return 1
  echo "$d"
}

rc=0
for k in "${KINDS[@]}"; do
  if dir=$(find_kind "$k"); then
    echo "SKIFF_$(tr '[:lower:]' '[:upper:]' <<<"$k")_DIR=$dir"
  else
    rc=1
  fi
done
exit $rc
