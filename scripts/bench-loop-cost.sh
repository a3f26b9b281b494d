#!/usr/bin/env bash
# Where a loop device's per-I/O cost goes, and whether a knob the node could
# set closes the gap to the image file. 4 KiB random reads, fio direct=1, at
# queue depth 1 and 32, on a 1 GiB image of random data and on a loop device
# made over it with direct I/O on (what `cinderblock node` attaches).
#
# Part 1, knobs: for each setting the targets alternate within every round;
# the median IOPS of the rounds is shown. Queue settings are written to the
# loop device's sysfs queue folder (one the script made) and put back after;
# fio engines apply to both targets.
# Part 2, cost: one run per target and queue depth under `perf record -a -g`
# (cpu-clock, the VM has no hardware counters) and `perf stat` counting the
# hand-offs to the loop worker (workqueue_queue_work on this device's
# workqueue, which is named after it). CPU per I/O is samples / frequency /
# I/Os, split into fio's own context, the loop worker, and I/O completion
# work that interrupted other tasks; samples of unrelated tasks are left
# out, so the split holds on a loaded machine. Loop devices of others that
# are busy at the same time land in "in loop" too: the file rows show how
# much (it should be 0 there). Reads in flight come from the read ticks of
# the image's disk and of the loop device (Little's law), CPU wait from
# /proc/pressure/cpu.
#
# Needs root, fio, perf and python3; leaves nothing behind.
# Usage: sudo [KNOBS=REGEX] scripts/bench-loop-cost.sh [ROUNDS] [SECONDS] [knobs|cost|all]
# (KNOBS picks the settings of part 1 whose names match, e.g. 'attached|nr_requests')
set -euo pipefail
rounds=${1:-3}
secs=${2:-5}
part=${3:-all}
hz=997
dir=$(mktemp -d /var/tmp/cinderblock-loop-cost.XXXXXX)
dev=
cleanup() { [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
img=$dir/img
fallocate -l 1G "$img"
dd if=/dev/urandom of="$img" bs=1M count=1024 conv=notrunc status=none
sync
dev=$(losetup -f --show --direct-io=on "$img")
q=/sys/block/$(basename "$dev")/queue
disk_stat=/sys/dev/block/$(stat -c '%Hd:%Ld' "$img")/stat
echo "loop device $dev: dio $(cat "/sys/block/$(basename "$dev")/loop/dio"), scheduler $(cat $q/scheduler)," \
  "nr_requests $(cat $q/nr_requests), rq_affinity $(cat $q/rq_affinity), nomerges $(cat $q/nomerges)"
echo "kernel $(uname -r), $(nproc) CPUs, load average at start $(cut -d' ' -f1-3 /proc/loadavg)"

# fio TARGET QD JSON [fio args...]: one run, its JSON kept in JSON.
fio_run() {
  local target=$1 qd=$2 out=$3
  shift 3
  fio --name=b --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth="$qd" --runtime="$secs" --time_based \
    --filename="$target" --size=1G --output-format=json "$@" >"$out" 2>/dev/null
}
json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; print($2)" "$1"; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

if [ "$part" = all ] || [ "$part" = knobs ]; then
  # name | sysfs writes on the loop queue (attr=value,...) | fio arguments
  settings=(
    "as attached (libaio)||"
    "io_uring||--ioengine=io_uring"
    "io_uring, fixed buffers + files||--ioengine=io_uring --fixedbufs --registerfiles"
    "rq_affinity 0|rq_affinity=0|"
    "rq_affinity 2|rq_affinity=2|"
    "nomerges 2|nomerges=2|"
    "scheduler mq-deadline|scheduler=mq-deadline|"
    "nr_requests 32|nr_requests=32|"
  )
  printf '\n%-34s %9s %9s %6s %9s %9s %6s\n' "4 KiB random read, IOPS (median)" "file qd1" "loop qd1" "" "file qd32" "loop qd32" ""
  for s in "${settings[@]}"; do
    IFS='|' read -r name writes args <<<"$s"
    [[ $name =~ ${KNOBS:-.} ]] || continue
    declare -A saved=()
    for w in ${writes//,/ }; do
      attr=${w%%=*}
      saved[$attr]=$(sed -n 's/.*\[\(.*\)\].*/\1/p;t;p' "$q/$attr")
      echo "${w#*=}" >"$q/$attr"
    done
    declare -A got=()
    for _ in $(seq "$rounds"); do
      for qd in 1 32; do
        for t in file loop; do
          target=$img
          [ $t = loop ] && target=$dev
          # shellcheck disable=SC2086 # args is a list of fio options
          fio_run "$target" "$qd" "$dir/k.json" $args
          got[$t,$qd]+="$(json "$dir/k.json" "int(j['read']['iops'])") "
        done
      done
    done
    for attr in "${!saved[@]}"; do echo "${saved[$attr]}" >"$q/$attr"; done
    unset saved
    row=()
    for qd in 1 32; do
      f=$(median <<<"${got[file,$qd]}")
      l=$(median <<<"${got[loop,$qd]}")
      row+=("$f" "$l" "$((100 * l / f))%")
    done
    unset got
    printf '%-34s %9s %9s %6s %9s %9s %6s   load %s\n' "$name" "${row[@]}" "$(cut -d' ' -f1 /proc/loadavg)"
  done
fi

if [ "$part" = all ] || [ "$part" = cost ]; then
  awk '$3 == "loop_process_work" && $1 !~ /^0+$/ {found = 1} END {exit !found}' /proc/kallsyms || {
    echo "kernel symbols hidden (loop_process_work not in /proc/kallsyms): set kernel.kptr_restrict=0" >&2
    exit 1
  }
  printf '\n%-6s %4s %7s %8s %9s %9s %9s %9s %9s %9s %7s %7s %8s\n' target qd IOPS "clat us" "CPU us/IO" "in fio" "in loop" "irq else" \
    "fio sw/IO" "worker/IO" "disk qd" "loop qd" "CPU wait"
  for qd in 1 32; do
    for t in file loop; do
      target=$img
      [ $t = loop ] && target=$dev
      # read ticks (ms spent by reads, field 4) over fio's run time: reads in flight (Little's law);
      # CPU pressure (time some task waited for a CPU) over the elapsed time
      d0=$(awk '{print $4}' "$disk_stat") l0=$(awk '{print $4}' "/sys/block/$(basename "$dev")/stat")
      p0=$(sed -n 's/^some .*total=//p' /proc/pressure/cpu) t0=$(date +%s%N)
      perf stat -a -x, -o "$dir/stat" -e workqueue:workqueue_queue_work --filter "workqueue == \"$(basename "$dev")\"" -- \
        perf record -q -a -g -F $hz -e cpu-clock -o "$dir/perf.data" -- \
        bash -c "$(declare -f fio_run); secs=$secs; fio_run '$target' $qd '$dir/c.json'" >/dev/null 2>&1
      d1=$(awk '{print $4}' "$disk_stat") l1=$(awk '{print $4}' "/sys/block/$(basename "$dev")/stat")
      p1=$(sed -n 's/^some .*total=//p' /proc/pressure/cpu) t1=$(date +%s%N)
      runs=$(awk -F, '/workqueue_queue_work/ {print $1}' "$dir/stat")
      perf script -i "$dir/perf.data" -F comm,ip,sym 2>/dev/null | python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
hz, runs, name, qd = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ms = j["read"]["runtime"]
disk_qd, loop_qd, psi = float(sys.argv[6]) / ms, float(sys.argv[7]) / ms, float(sys.argv[8])
ios = j["read"]["total_ios"]
cnt = {"fio": 0, "loop": 0, "irq": 0}
irq = ("vring_interrupt", "virtblk", "blk_complete_reqs", "blk_mq_complete", "lo_rw_aio_complete", "iomap_dio", "aio_complete")
for sample in sys.stdin.read().split("\n\n"):
    lines = [l.strip() for l in sample.strip().split("\n") if l.strip()]
    if not lines:
        continue
    stack = " ".join(lines[1:])
    if lines[0] == "fio":
        cnt["fio"] += 1
    elif "loop_process_work" in stack or "loop_workfn" in stack or "loop_rootcg_workfn" in stack:
        cnt["loop"] += 1
    elif any(k in stack for k in irq):
        cnt["irq"] += 1
us = {k: v / hz / ios * 1e6 for k, v in cnt.items()}
iops, clat = j["read"]["iops"], j["read"]["clat_ns"]["mean"] / 1000
print("%-6s %4s %7.0f %8.1f %9.1f %9.1f %9.1f %9.1f %9.2f %9.2f %7.1f %7.1f %7.0f%%" % (
    name, qd, iops, clat, sum(us.values()), us["fio"], us["loop"], us["irq"], j["ctx"] / ios, runs / ios, disk_qd, loop_qd, psi))
' "$dir/c.json" $hz "$runs" $t $qd \
        $((d1 - d0)) $((l1 - l0)) $(((p1 - p0) * 100000 / (t1 - t0)))
    done
  done
  echo "CPU us/IO = cpu-clock samples at ${hz} Hz of fio, of the loop worker and of completion work in other tasks, per I/O;"
  echo "fio sw/IO = fio's context switches per I/O; worker/IO = hand-offs to this loop device's worker per I/O;"
  echo "disk qd, loop qd = reads in flight on the image's disk and on the loop device (read ticks / fio's run time);"
  echo "CPU wait = share of the time some task waited for a CPU (/proc/pressure/cpu, some)"
fi
echo "rounds $rounds x ${secs}s, load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
