#!/usr/bin/env bash
# 4 KiB random reads on a loop device against its image file, with the loop
# device's knobs varied: logical block size 512 (the kernel's default, what
# LOOP_CONFIGURE with block_size 0 gives) and 4096, direct I/O on, at queue
# depth 1 and 32. Rounds alternate the targets; the median of each is shown
# with the load average. Needs root and fio; leaves nothing behind.
# Usage: sudo scripts/bench-loop-knobs.sh [ROUNDS] [SECONDS]
set -euo pipefail
rounds=${1:-5}
secs=${2:-5}
dir=$(mktemp -d /var/tmp/cinderblock-loop-knobs.XXXXXX)
devs=()
cleanup() { for d in "${devs[@]}"; do losetup -d "$d" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
img=$dir/img
fallocate -l 1G "$img"
dd if=/dev/urandom of="$img" bs=1M count=1024 conv=notrunc status=none
sync
l512=$(losetup -f --show --direct-io=on "$img"); devs+=("$l512")
l4k=$(losetup -f --show --direct-io=on --sector-size 4096 "$img"); devs+=("$l4k")
iops() { # target qd
  fio --name=b --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth="$2" --runtime="$secs" \
    --time_based --filename="$1" --size=1G --output-format=terse 2>/dev/null | awk -F';' '{print $8}'
}
declare -A got
for r in $(seq "$rounds"); do
  for qd in 1 32; do
    for t in file l512 l4k; do
      case $t in file) dev=$img ;; l512) dev=$l512 ;; l4k) dev=$l4k ;; esac
      got[$t,$qd]+="$(iops "$dev" "$qd") "
    done
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-28s %10s %10s\n' "4 KiB random read (IOPS)" "qd 1" "qd 32"
for t in file l512 l4k; do
  case $t in file) name="image file" ;; l512) name="loop, 512-byte blocks" ;; l4k) name="loop, 4096-byte blocks" ;; esac
  printf '%-28s %10s %10s\n' "$name" "$(median <<<"${got[$t,1]}")" "$(median <<<"${got[$t,32]}")"
done
echo "rounds $rounds x ${secs}s, load average $(cut -d' ' -f1-3 /proc/loadavg)"
