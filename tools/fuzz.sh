#!/usr/bin/env bash
# Fuzzes skiff's parsers of guest and client input with libFuzzer (cargo fuzz; targets in
# fuzz/fuzz_targets, seed corpora in fuzz/corpus/TARGET).
#   tools/fuzz.sh --ci                 every target for 20 s (CI: a crash fails the run)
#   tools/fuzz.sh --time SECS [TARGET...]   the given targets (default all) for SECS each,
#       e.g. tools/fuzz.sh --time 3600 for an hour per target
#   tools/fuzz.sh --list               the targets
# cargo fuzz needs a nightly toolchain (for -Zsanitizer=address): this script installs one
# with rustup (profile minimal) and cargo-fuzz with cargo install when they are missing; the
# project itself builds with the stable toolchain. New inputs that find new coverage go to
# target/fuzz-corpus/TARGET (the checked-in seeds are only read); a crashing input is kept
# in fuzz/artifacts/TARGET and its path printed. Prints executions per target at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=20
targets=()
case "${1:-}" in
  --ci) shift ;;
  --time) secs=${2:?--time SECS}; shift 2; targets=("$@") ;;
  --list) sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v skiff-fuzz; exit 0 ;;
  *) echo "usage: $0 --ci | --time SECS [TARGET...] | --list" >&2; exit 2 ;;
esac
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v skiff-fuzz)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cargo +nightly fuzz build -O
summary=()
for t in "${targets[@]}"; do
  work=target/fuzz-corpus/$t
  mkdir -p "$work" "fuzz/corpus/$t"
  log=target/fuzz-$t.log
  echo "=== fuzzing $t for ${secs}s"
  # -rss_limit_mb and -malloc_limit_mb: a guest or client that grows memory without bound
  # is a finding too. -timeout: one input taking more than 10 s is a hang.
  if ! cargo +nightly fuzz run -O "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=10 \
      -print_final_stats=1 > "$log" 2>&1; then
    tail -40 "$log"
    echo "FUZZ FAILURE: target $t found a crash, leak or hang (input in fuzz/artifacts/$t)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  summary+=("$t: ${runs:-?} executions in ${secs}s, no crash")
done
printf '%s\n' "${summary[@]}"
