#!/usr/bin/env bash
# Every test of cinderblock, in layers: unit, integration (real gRPC, real
# loop devices, mkfs and mounts: needs root), then conformance (csi-sanity).
# Installs what it needs; slow downloads and builds are cached under .tools/
# (ignored by git). Usage: sudo scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$(date +%s)

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test-all.sh: the storage tests need root (loop devices, mkfs, mount); run it with sudo" >&2
  exit 2
fi

need=()
for tool in mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs losetup:util-linux blkid:util-linux fio:fio truncate:coreutils; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true

echo "== build"
cargo build --all-targets --locked

echo "== unit and integration tests"
cargo test --locked --no-fail-fast -- --test-threads 4

echo "== conformance (csi-sanity)"
scripts/csi-sanity.sh

echo "== all tests passed in $(( $(date +%s) - started ))s"
