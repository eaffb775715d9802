#!/usr/bin/env bash
# Boot loop for the nested test host: boots N guests inside ONE nested host, skiff and QEMU
# microvm alternating over vCPU counts and memory sizes, and prints how many reached userspace and
# where the others stopped. It measures the rig (the nested host's own flakiness), so every change
# to the rig can be judged by its figures; see README.md "Boot loop".
#
#   bootloop.sh [-n BOOTS] [-t SECONDS] [-L LOAD] [-V VMMS] [-C VCPUS] [-M MEMS] [-A ARGS]
#               [-a] [-w fio] [-m MiB] [-c CPUS] [-k]
#
#   -n BOOTS    boots in all (default 40), spread evenly over every VMM x vCPUs x memory combination
#   -t SECONDS  a boot that has not printed GUEST-READY by then is a stall (default 60)
#   -L LOAD     CPU hogs on the OUTER machine for the whole run (default 0). A CI run competes with
#               itself and with anything else on the machine; 2 hogs on this 2-core machine is
#               about what a second nested host or a `cargo build` puts on it
#   -V VMMS     comma list of skiff,qemu (default skiff,qemu)
#   -C VCPUS    comma list (default 1,2)
#   -M MEMS     comma list of MiB (default 256,3072)
#   -A ARGS     extra guest kernel parameters for both VMMs (an experiment's knob)
#   -a          ACPI on: skiff's ACPI tables (its default) and QEMU microvm's (acpi=on) instead
#               of acpi=off and the MP table for both
#   -w fio      after boot, a workload: the guest's init runs fio for 12 s (4 jobs of 3 s: 4 KiB
#               random and 1 MiB sequential, read and write, direct, QD32/QD4) on a second
#               virtio-blk drive, then reboots (bench root filesystem); a boot counts as ok only
#               when fio ended well. Heavy virtio I/O in a 2-vCPU guest is what made the nested
#               host's guests fail most often (README.md)
#   -m, -c      the nested host's memory and CPUs (passed to run-nested.sh; default 8192 MiB, nproc)
#   -k          keep the work dir (every boot's console and stderr) under .bootloop-*/
#
# Both VMMs boot the same kernel (vmlinux) and read-only root filesystem with the same command
# line (skiff's default base, the kernel's full log on the console, init's bench=boot: print
# GUEST-READY, then reboot). Outcomes per boot:
#   ok      GUEST-READY on the console (the guest reached userspace)
#   fault   the VMM ended before that: a triple fault (skiff says so; QEMU's -no-reboot exits)
#   stall   no GUEST-READY within -t; the line says whether a vCPU thread was spinning or idle
#   error   the VMM failed to start or exited with an error (its stderr's last line)
# Each failure prints its failure point: the last line the guest printed.
# The run's environment (SKIFF_NESTED_*: outer CPU model, accel, kernel) applies as for any run.
# Exit status: 0 when every boot reached userspace, 1 otherwise, 2 on a usage error.
set -euo pipefail

if [ "${1:-}" = --inner ]; then
  # ------------------------------------------------------------------ inside the nested host
  shift
  wd=$1
  # shellcheck disable=SC1091
  . "$wd/params"
  res=$wd/results
  : > "$res"
  img=/tmp/bootloop-rootfs.ext4
  data=/tmp/bootloop-data.img
  base="console=ttyS0 reboot=k panic=1 pci=off${ACPI_OFF:+ acpi=off} nomodule 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
  if [ "$WORKLOAD" = fio ]; then
    zstd -q -d --long=27 -f "$GUEST_DIR/rootfs-bench.ext4.zst" -o "$img"
    truncate -s 256M "$data"
    args="$base root=/dev/vda ro bench=fio fio_runtime=3 $EXTRA"
    skiff_data=', {"drive_id": "data", "path_on_host": "'$data'", "is_root_device": false, "is_read_only": false}'
    qemu_data=(-drive id=data,file="$data",format=raw,if=none -device virtio-blk-device,drive=data)
    done_mark="GUEST-BENCH-DONE rc=0"
  else
    cp "$GUEST_DIR/rootfs-busybox.ext4" "$img"
    args="$base root=/dev/vda ro bench=boot $EXTRA"
    skiff_data=""; qemu_data=(); done_mark=GUEST-READY
  fi
  IFS=, read -r -a vmms <<<"$VMMS"
  IFS=, read -r -a cpus <<<"$VCPUS"
  IFS=, read -r -a mems <<<"$MEMS"
  combos=()
  for m in "${mems[@]}"; do for c in "${cpus[@]}"; do for v in "${vmms[@]}"; do combos+=("$v $c $m"); done; done; done
  # CPU ms used by the threads named vcpuN (skiff) or "CPU N/KVM" (QEMU) of pid $1 over 1 s.
  vcpu_ms() {
    local pid=$1 t before=0 after=0 hz
    hz=$(getconf CLK_TCK)
    for t in /proc/"$pid"/task/*; do
      grep -qE '^(vcpu[0-9]+|CPU [0-9]+/KVM)$' "$t/comm" 2>/dev/null || continue
      before=$(( before + $(awk '{print $14+$15}' "$t/stat" 2>/dev/null || echo 0) ))
    done
    sleep 1
    for t in /proc/"$pid"/task/*; do
      grep -qE '^(vcpu[0-9]+|CPU [0-9]+/KVM)$' "$t/comm" 2>/dev/null || continue
      after=$(( after + $(awk '{print $14+$15}' "$t/stat" 2>/dev/null || echo 0) ))
    done
    echo $(( (after - before) * 1000 / hz ))
  }
  for ((i = 0; i < BOOTS; i++)); do
    read -r vmm nc mem <<<"${combos[$((i % ${#combos[@]}))]}"
    con=$wd/boot-$i.console; err=$wd/boot-$i.stderr
    a=$args
    [ "$mem" -gt 1024 ] && a="$a nogbpages"   # as the guest tests do in the nested host (tests/tests/guest.rs)
    if [ "$vmm" = skiff ]; then
      cat > "$wd/vm.json" <<EOF
{"boot-source": {"kernel_image_path": "$GUEST_DIR/vmlinux", "boot_args": "$a"},
 "machine-config": {"vcpu_count": $nc, "mem_size_mib": $mem, "smt": false},
 "drives": [{"drive_id": "rootfs", "path_on_host": "$img", "is_root_device": true, "is_read_only": true}$skiff_data]}
EOF
      "$SKIFF" --no-api --config-file "$wd/vm.json" </dev/null >"$con" 2>"$err" &
    else
      qemu-system-x86_64 -M "microvm,acpi=${ACPI_OFF:+off}${ACPI_OFF:-on}" -accel kvm -cpu host -smp "$nc" -m "$mem" \
        -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
        -kernel "$GUEST_DIR/vmlinux" -append "$a" \
        -drive id=root,file="$img",format=raw,if=none,readonly=on -device virtio-blk-device,drive=root \
        "${qemu_data[@]}" </dev/null >"$con" 2>"$err" &
    fi
    pid=$!
    start=$(date +%s.%N)
    outcome=""; why=""
    deadline=$(( $(date +%s) + LIMIT ))
    while :; do
      if grep -q "$done_mark" "$con" 2>/dev/null; then outcome=ok; break; fi
      if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid"; rc=$?
        if grep -q "$done_mark" "$con"; then outcome=ok
        elif grep -q 'triple fault' "$err" || { [ "$vmm" = qemu ] && [ "$rc" = 0 ]; }; then outcome=fault; why="exit $rc"
        else outcome=error; why="exit $rc: $(grep -v '^\s*$' "$err" | tail -n 1)"; fi
        break
      fi
      if [ "$(date +%s)" -ge "$deadline" ]; then
        ms=$(vcpu_ms "$pid")
        outcome=stall
        if [ "$ms" -ge 300 ]; then why="vCPUs spinning (${ms} ms CPU in 1 s)"; else why="vCPUs idle (${ms} ms CPU in 1 s)"; fi
        break
      fi
      sleep 0.2
    done
    # Where it failed: before userspace, or in the workload after it.
    if [ "$outcome" != ok ] && [ "$WORKLOAD" = fio ]; then
      if grep -q GUEST-READY "$con"; then why="in the workload: $why"; else why="before userspace: $why"; fi
    fi
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # The failure point: the last thing the guest printed (timestamps kept, escapes dropped).
    point=$(tr -d '\r' <"$con" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' | grep -v '^\s*$' | tail -n 1 | cut -c1-150)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$vmm" "$nc" "$mem" "$outcome" "$secs" "${why:+$why; }last line: $point" >> "$res"
    printf 'boot %3d %-5s %s vCPU %5s MiB: %-5s %6ss %s\n' "$i" "$vmm" "$nc" "$mem" "$outcome" "$secs" \
      "$([ "$outcome" = ok ] || echo "${why:+$why; }at: $point")"
    if [ "$outcome" = ok ] && [ "$KEEP" != 1 ]; then rm -f "$con" "$err"; fi
  done
  # What the nested host's kernel said about its clocks and watchdogs meanwhile (a TSC marked
  # unstable changes the guests' kvm-clock; lockups and RCU stalls show starvation).
  dmesg | grep -iE 'clocksource|tsc|lockup|rcu.*stall|hung_task|kvm' | sed 's/^/nested-dmesg: /' | tail -n 30
  exit 0
fi

# ---------------------------------------------------------------------- outside
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
boots=40; limit=60; load=0; workload=""; vmms=skiff,qemu; vcpus=1,2; mems=256,3072; extra=""; nmem=8192; ncpu=$(nproc); keep=0; acpi_off=1
usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2; exit 2; }
while getopts "n:t:L:V:C:M:A:aw:m:c:kh" o; do
  case $o in
    n) boots=$OPTARG ;; t) limit=$OPTARG ;; L) load=$OPTARG ;; V) vmms=$OPTARG ;; C) vcpus=$OPTARG ;;
    M) mems=$OPTARG ;; A) extra=$OPTARG ;; a) acpi_off= ;; w) workload=$OPTARG ;; m) nmem=$OPTARG ;; c) ncpu=$OPTARG ;; k) keep=1 ;; *) usage ;;
  esac
done
for n in "$boots" "$limit" "$load" "$nmem" "$ncpu"; do [[ $n =~ ^[0-9]+$ ]] || usage; done
[[ $vmms =~ ^(skiff|qemu)(,(skiff|qemu))*$ ]] || { echo "bootloop.sh: -V takes skiff and/or qemu" >&2; exit 2; }
[[ $vcpus =~ ^[0-9]+(,[0-9]+)*$ && $mems =~ ^[0-9]+(,[0-9]+)*$ ]] || usage
case "$workload" in ""|fio) ;; *) echo "bootloop.sh: -w takes fio" >&2; exit 2 ;; esac
case "$extra" in *[\"\\]*) echo "bootloop.sh: -A must not contain quotes or backslashes" >&2; exit 2 ;; esac
skiff=${SKIFF_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/skiff}
[ -x "$skiff" ] && [ -x "$(dirname "$skiff")/skiff-blk" ] \
  || { echo "bootloop.sh: $skiff (and skiff-blk beside it) missing: run cargo build --workspace --bins first, or set SKIFF_BIN" >&2; exit 2; }
guest=$(sed -n 's/^SKIFF_GUEST_DIR=//p' <<<"$("$repo/resources/artifacts.sh" guest)")
[ -f "$guest/vmlinux" ] && { [ -z "$workload" ] || [ -f "$guest/rootfs-bench.ext4.zst" ]; } || { echo "bootloop.sh: no guest artifacts (resources/artifacts.sh guest)" >&2; exit 2; }

cd "$repo"
wd=.bootloop-$$
mkdir "$wd"
hogs=()
cleanup() {
  for p in "${hogs[@]}"; do kill "$p" 2>/dev/null || true; done
  [ "$keep" = 1 ] || rm -rf "$repo/$wd"
}
trap cleanup EXIT
cat > "$wd/params" <<EOF
BOOTS=$boots
LIMIT=$limit
VMMS=$vmms
VCPUS=$vcpus
MEMS=$mems
EXTRA="$extra"
ACPI_OFF=$acpi_off
KEEP=$keep
WORKLOAD=$workload
SKIFF=$skiff
GUEST_DIR=$guest
EOF
printf '#!/bin/sh\nexec bash %q --inner %q\n' "$here/bootloop.sh" "$repo/$wd" > "$wd/inner.sh"
for ((h = 0; h < load; h++)); do
  ( while :; do :; done ) &
  hogs+=($!)
done
echo "bootloop: $boots boots${workload:+ with workload $workload} of $vmms, ACPI ${acpi_off:+off}${acpi_off:-on}, vCPUs $vcpus, MiB $mems, stall limit ${limit}s, outer load $load CPU hog(s)," \
  "nested host ${ncpu} CPUs ${nmem} MiB, outer $("${SKIFF_NESTED_QEMU:-qemu-system-x86_64}" --version | head -n 1),${extra:+ guest args '$extra',}" \
  "cpu ${SKIFF_NESTED_CPU:-max}, accel ${SKIFF_NESTED_ACCEL:-tcg,thread=multi}${SKIFF_NESTED_APPEND:+, nested kernel args '$SKIFF_NESTED_APPEND'}${SKIFF_NESTED_NICE:+, nice $SKIFF_NESTED_NICE}"
t0=$(date +%s)
set +e
"$here/run-nested.sh" -m "$nmem" -c "$ncpu" -t $(( boots * (limit + 30) + 300 )) "$wd/inner.sh" \
  | tee "$wd/nested-console.log" | grep --line-buffered -E '^(boot |nested-dmesg: )'
rc=${PIPESTATUS[0]}
set -e
res=$wd/results
if [ "$rc" -ne 0 ]; then
  echo "bootloop.sh: the nested host failed (run-nested.sh exit $rc); its console's last lines:"
  grep -vE '^(boot |nested-dmesg: )' "$wd/nested-console.log" | tail -n 25 | sed 's/^/  /'
fi
[ -s "$res" ] || { echo "bootloop.sh: the nested host reported no boots (run-nested.sh exit $rc)" >&2; exit 1; }
echo
echo "=== summary ($(( $(date +%s) - t0 )) s, outer load $load${extra:+, guest args '$extra'}) ==="
awk -F'\t' '
  { k = $2 " " $3 " vCPU " $4 " MiB"; n[k]++; if ($5 == "ok") ok[k]++; else bad[k]++
    v[$2]++; if ($5 == "ok") vok[$2]++; else out[$2 " " $5]++ }
  END {
    for (k in n) printf "  %-24s %3d/%-3d ok\n", k, ok[k] + 0, n[k]
    for (x in v) {
      printf "%s: %d/%d ok", x, vok[x] + 0, v[x]
      sep = " (failures:"
      for (o in out) { split(o, p, " "); if (p[1] == x) { printf "%s %d %s", sep, out[o], p[2]; sep = "," } }
      print (sep == "," ? ")" : "")
    }
  }' "$res" | sort
if grep -qv "	ok	" "$res"; then
  echo "failure points:"
  awk -F'\t' '$5 != "ok" { printf "  boot %d %s %s vCPU %s MiB %s after %ss: %s\n", $1, $2, $3, $4, $5, $6, $7 }' "$res"
  [ "$keep" = 1 ] && echo "consoles and stderr of failed boots: $repo/$wd/"
  exit 1
fi
exit 0
