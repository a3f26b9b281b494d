#!/usr/bin/env bash
# Snapshot and clone timing on real filesystems: XFS with reflink (constant
# time) and ext4 (the sparse-aware copy path). Needs root (loop mounts) and
# about 2x the largest size free for ext4. Usage:
#   scripts/bench-pool.sh [SIZES_GIB (default 1,16)] [RUNS (default 7)] [COPY_RUNS (default 3)]
set -euo pipefail
sizes=${1:-1,16}
runs=${2:-7}
copy_runs=${3:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/cinderblock
work=$(mktemp -d /var/tmp/cinderblock-bench.XXXXXX)
cleanup() {
  for m in "$work"/xfs "$work"/ext4; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
largest=$(tr ',' '\n' <<<"$sizes" | sort -n | tail -1)
mkdir -p "$work/xfs" "$work/ext4"
truncate -s $((largest + 4))G "$work/xfs.img"
mkfs.xfs -q -f -m reflink=1 "$work/xfs.img"
mount -o loop "$work/xfs.img" "$work/xfs"
truncate -s $((largest * 2 + 4))G "$work/ext4.img"
mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=1 "$work/ext4.img"
mount -o loop "$work/ext4.img" "$work/ext4"
export RUST_LOG=${RUST_LOG:-warn}
"$bin" bench pool --pool "$work/xfs/pool" --sizes-gib "$sizes" --runs "$runs"
"$bin" bench pool --pool "$work/ext4/pool" --sizes-gib "$sizes" --runs "$copy_runs"
