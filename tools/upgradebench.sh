#!/usr/bin/env bash
# Device-process upgrade benchmark: N upgrades each of skiff-blk and skiff-net under load,
# timed at native speed on this host with a synthetic front end (no guest; see the doc
# comment of tools/src/upgradebench.rs). Needs root (a TAP in a private network namespace).
#   tools/upgradebench.sh [UPGRADES]     (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
upgrades=${1:-1000}
cargo build --release -p devices -p tools --bins
bin=${CARGO_TARGET_DIR:-target}/release
out=${CARGO_TARGET_DIR:-target}
"$bin/upgradebench" --upgrades "$upgrades" --blk-binary "$bin/skiff-blk" \
  --net-binary "$bin/skiff-net" --out "$out/upgradebench.json"
