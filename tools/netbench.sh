#!/usr/bin/env bash
# Network data-path benchmark at native speed (tools/src/netbench/main.rs): skiff-net beside
# the kernel's vhost-net and a plain TAP read/write loop (the floor), driven by the same
# synthetic guest driver, every frame checked at the far end. Runs in a network namespace of
# its own (TAPs and packet sockets made there and gone with it): needs root.
#
#   tools/netbench.sh [OPTIONS]      release build, the full run (3 rounds of 6 workloads x
#                                    3 paths, 5 s each after 1 s of warm-up: about 6 minutes)
#   tools/netbench.sh --quick        the short run (0.5 s per workload)
#   tools/netbench.sh --ci           what CI runs: --quick with the debug build CI has just
#                                    built (it checks the benchmark works and every frame is
#                                    right; a debug build's figures mean nothing)
#
# OPTIONS go to the program (`netbench --help`: --rounds, --secs, --backends, --workloads,
# --no-event-idx, --no-seccomp, --device-bin-dir, --out). vhost-net needs /dev/vhost-net (CONFIG_VHOST_NET); where it is
# missing the run says so and compares skiff-net with the floor only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "netbench.sh: needs root (a network namespace and TAP devices)" >&2; exit 2; }
target=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" = --ci ]; then
  shift
  bin=$target/debug
  [ -x "$bin/netbench" ] && [ -x "$bin/skiff-net" ] || cargo build -p devices -p tools --bins
  exec "$bin/netbench" --quick --device-bin-dir "$bin" --out "$target/netbench-ci.json" "$@"
fi
cargo build --release -p devices -p tools --bins
bin=$target/release
exec "$bin/netbench" --device-bin-dir "$bin" --out "$target/netbench.json" "$@"
