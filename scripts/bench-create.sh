#!/usr/bin/env bash
# CreateVolume throughput and latency at concurrency 1, 16, 64 and 256, for
# cinderblock's standalone (3 nodes, embedded store, mutual TLS to the
# agents) and for csi-driver-host-path (Kubernetes' sample CSI driver, one
# process), in the same run, side by side; then a PNG of volumes/s against
# concurrency for both.
#
# Usage: scripts/bench-create.sh [OUT.png]   (default docs/bench-create.png)
#
# Needs a release build (cargo build --release). The peer is built into the
# ignored .tools/hostpath/: with `go install` of the published module from
# the Go module proxy (HOSTPATH_VERSION), or, where the proxy does not serve
# it, with `go build` in a source tree you name in HOSTPATH_SRC (its vendored
# modules). Nothing of the peer is kept in this repository. The plot needs
# matplotlib, installed from PyPI into .tools/python/ on first use.
# COUNT (default 1024) volumes per level; LEVELS (default 1,16,64,256).
#
# POOL_FS says where both drivers keep their data (pools, store, the peer's
# state folder): `xfs` (the default) is an XFS filesystem with reflink made
# for this run on a 4 GiB file on the machine's disk, loop-mounted (needs
# root), the filesystem the README names for pools; `folder` is a temporary
# folder on whatever filesystem holds /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-docs/bench-create.png}
count=${COUNT:-1024}
levels=${LEVELS:-1,16,64,256}
version=${HOSTPATH_VERSION:-v1.18.0}
tools=$root/.tools/hostpath
bin=$tools/hostpathplugin-$version
cb=${CINDERBLOCK_BIN:-$root/target/release/cinderblock}
[ -x "$cb" ] || { echo "bench-create.sh: no release build at $cb: run cargo build --release" >&2; exit 2; }

if [ ! -x "$bin" ]; then
  mkdir -p "$tools"
  echo "== building csi-driver-host-path $version into $tools" >&2
  if ! GOBIN=$tools/gobin GOFLAGS=-mod=mod go install "github.com/kubernetes-csi/csi-driver-host-path/cmd/hostpathplugin@$version" 2>"$tools/install.log"; then
    if [ -z "${HOSTPATH_SRC:-}" ]; then
      echo "bench-create.sh: the Go module proxy did not serve the module ($(tail -1 "$tools/install.log"));" >&2
      echo "  set HOSTPATH_SRC to a source tree of csi-driver-host-path $version to build it from there" >&2
      exit 2
    fi
    (cd "$HOSTPATH_SRC" && nice -n 10 go build -mod=vendor -o "$bin" ./cmd/hostpathplugin)
  else
    mv "$tools/gobin/hostpathplugin" "$bin"
  fi
fi

pool_fs=${POOL_FS:-xfs}
case $pool_fs in
  xfs | folder) ;;
  *) echo "bench-create.sh: POOL_FS is xfs or folder, not '$pool_fs'" >&2; exit 2 ;;
esac
if [ "$pool_fs" = xfs ] && [ "$(id -u)" != 0 ]; then
  echo "bench-create.sh: POOL_FS=xfs mounts a filesystem and needs root (POOL_FS=folder does not)" >&2
  exit 2
fi

work=$(mktemp -d /tmp/cinderblock-bench-create.XXXXXX)
peer=''
mounted=''
cleanup() {
  [ -n "$peer" ] && kill "$peer" 2>/dev/null && wait "$peer" 2>/dev/null
  [ -n "$mounted" ] && umount "$mounted"
  rm -rf "$work"
}
trap cleanup EXIT

data=$work
if [ "$pool_fs" = xfs ]; then
  truncate -s 4G "$work/pools.xfs"
  mkfs.xfs -f -q -m reflink=1 "$work/pools.xfs"
  mkdir "$work/data"
  mount -o loop "$work/pools.xfs" "$work/data"
  mounted=$work/data
  data=$work/data
fi
echo "== data on: $pool_fs ($(df --output=fstype "$data" | tail -1))" >&2

rows=$work/rows.csv
echo "== cinderblock standalone (3 nodes), $count volumes per level" >&2
"$cb" bench create --csv --label cinderblock --concurrency "$levels" --count "$count" --data-dir "$data/cinderblock" >>"$rows"
echo "== csi-driver-host-path $version" >&2
mkdir -p "$data/hostpath"
"$bin" --endpoint "unix://$work/hostpath.sock" --nodeid bench-node --drivername hostpath.csi.k8s.io \
  --statedir "$data/hostpath" --v=0 >"$work/hostpath.log" 2>&1 &
peer=$!
"$cb" bench create --csv --label hostpath --concurrency "$levels" --count "$count" --endpoint "unix://$work/hostpath.sock" >>"$rows"

echo
printf '%11s  %26s  %26s\n' "" "cinderblock" "csi-driver-host-path"
printf '%11s  %8s %8s %8s  %8s %8s %8s  %5s\n' concurrency "vol/s" "p50 ms" "p99 ms" "vol/s" "p50 ms" "p99 ms" load
IFS=, read -ra ls <<<"$levels"
for c in "${ls[@]}"; do
  a=$(awk -F, -v c="$c" '$1=="cinderblock" && $2==c' "$rows")
  b=$(awk -F, -v c="$c" '$1=="hostpath" && $2==c' "$rows")
  printf '%11s  %8s %8s %8s  %8s %8s %8s  %5s\n' "$c" \
    "$(cut -d, -f4 <<<"$a")" "$(cut -d, -f5 <<<"$a")" "$(cut -d, -f6 <<<"$a")" \
    "$(cut -d, -f4 <<<"$b")" "$(cut -d, -f5 <<<"$b")" "$(cut -d, -f6 <<<"$b")" "$(cut -d, -f7 <<<"$b")"
done
cp "$rows" "${out%.png}.csv"

py=$root/.tools/python/bin/python
if [ ! -x "$py" ] || ! "$py" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$root/.tools/python"
  "$root/.tools/python/bin/pip" install -q matplotlib
fi
case $pool_fs in
  xfs) where="data on a new XFS (reflink)" ;;
  folder) where="data in a folder on $(df --output=fstype "$data" | tail -1)" ;;
esac
"$py" scripts/plot-bench-create.py "$rows" "$out" "$where, $count volumes per level, $(date -u +%F)"
echo "plot: $out, figures: ${out%.png}.csv" >&2
