#!/usr/bin/env bash
# Block data-path benchmark at native speed (tools/src/iobench/main.rs): skiff-blk beside
# qemu-storage-daemon's vhost-user-blk export and the host's own fio (io_uring), driven by the
# same synthetic guest driver through skiff's vhost-user front end, every completion checked.
#
#   tools/iobench.sh [OPTIONS]      release build, the full run (about 12 minutes: 6 workloads x
#                                   1 and 4 queues x direct and buffered x 3, 10 s each)
#   tools/iobench.sh --quick        the short run (a 128 MiB image, 1 s per workload, O_DIRECT)
#   tools/iobench.sh --ci           what CI runs: --quick with the debug build CI has just built
#                                   (it checks the benchmark works and every completion is right;
#                                   a debug build's figures mean nothing)
#
# OPTIONS go to the program (`iobench --help`: --secs, --size-mib, --dir, --backends, --queues,
# --cache, --workloads, --qsd-aio, --no-seccomp, --out). Needs fio and qemu-storage-daemon
# (Debian: fio, qemu-system-common); no root. The image lives in target/iobench (--dir): the
# file system measured is the checkout's.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in fio qemu-storage-daemon; do
  command -v "$t" >/dev/null || { echo "iobench.sh: $t is missing (apt-get install fio qemu-system-common)" >&2; exit 2; }
done
target=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" = --ci ]; then
  shift
  bin=$target/debug
  [ -x "$bin/iobench" ] && [ -x "$bin/skiff-blk" ] || cargo build -p devices -p tools --bins
  exec "$bin/iobench" --quick --device-bin-dir "$bin" --out "$target/iobench-ci.json" "$@"
fi
cargo build --release -p devices -p tools --bins
bin=$target/release
exec "$bin/iobench" --device-bin-dir "$bin" --out "$target/iobench.json" "$@"
