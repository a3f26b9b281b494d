#!/usr/bin/env bash
# Every test of cinderblock, in layers: unit, integration (real gRPC, real
# loop devices, mkfs and mounts: needs root), conformance (csi-sanity), then
# Kubernetes: the kube store and an end-to-end test on a real kube-apiserver
# with the real CSI sidecars, the Helm chart installed on one, then the image
# and a two-node cluster of real kubelets with the chart installed, pods on
# its volumes and a subset of Kubernetes' External Storage e2e suite.
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
# The kubelet cluster's parts from Debian: runc, the CNI plugins, iptables and
# conntrack (kube-proxy), busybox (test images), mmdebstrap (the image's root
# file system), python3 (JSON of images and e2e reports); real NBD peers for
# the interop tests (nbdkit, libnbd-bin, qemu-utils).
for tool in mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs losetup:util-linux blkid:util-linux nsenter:util-linux ip:iproute2 fio:fio truncate:coreutils openssl:openssl \
  runc:runc /usr/lib/cni/bridge:containernetworking-plugins iptables:iptables conntrack:conntrack \
  /bin/busybox:busybox-static mmdebstrap:mmdebstrap python3:python3 \
  nbdkit:nbdkit nbdinfo:libnbd-bin nbdcopy:libnbd-bin qemu-nbd:qemu-utils qemu-img:qemu-utils qemu-io:qemu-utils; do
  command -v "${tool%%:*}" >/dev/null || [ -x "${tool%%:*}" ] || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true

echo "== format (rustfmt.toml)"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo fmt --check

echo "== build"
cargo build --all-targets --locked

# Nothing here may be skipped: a test that cannot run fails (tests/common).
export CI=true

echo "== unit and integration tests"
# Every test target but the Kubernetes ones, which run below on a test bed.
targets=()
for f in tests/*.rs; do
  name=$(basename "$f" .rs)
  case $name in kube_*) ;; *) targets+=(--test "$name") ;; esac
done
cargo test --locked --no-fail-fast --lib --bins "${targets[@]}" -- --test-threads 4

echo "== tests cannot pass vacuously (no root, a missing tool: they fail)"
scripts/check-honest-tests.sh

echo "== kernel NBD engine in a qemu guest with Debian's kernel (guest cached in .tools/vm): kernel TLS, then without it"
vm_started=$(date +%s)
scripts/vm/nbd-kernel-test.sh
scripts/vm/nbd-kernel-test.sh --no-ktls
echo "   kernel NBD tests in $(( $(date +%s) - vm_started ))s"

echo "== conformance (csi-sanity)"
scripts/csi-sanity.sh

echo "== real Kubernetes parts (built once from the Go module proxy, cached in .tools/k8s)"
k8s_started=$(date +%s)
scripts/k8s/build.sh all
echo "   built or found in $(( $(date +%s) - k8s_started ))s"

echo "== kube store and end to end on a real API server"
bed=$(mktemp -d /tmp/cinderblock-testbed.XXXXXX)
trap 'scripts/k8s/testbed.sh down "$bed" >/dev/null 2>&1 || true; rm -rf "$bed"' EXIT
# A part that loses a race for a free port, or starts slowly on a loaded
# machine, gets a second and third chance on a clean folder.
for attempt in 1 2 3; do
  if scripts/k8s/testbed.sh up "$bed"; then break; fi
  [ $attempt = 3 ] && { echo "test bed did not come up three times" >&2; exit 1; }
  scripts/k8s/testbed.sh down "$bed" >/dev/null 2>&1 || true
  rm -rf "$bed"; mkdir -p "$bed"
done
export CINDERBLOCK_TEST_KUBECONFIG=$bed/admin.kubeconfig
export CINDERBLOCK_K8S_BIN=$root/.tools/k8s/bin
export CINDERBLOCK_K8S_CRDS=$root/.tools/k8s/crds
.tools/k8s/bin/kubectl --kubeconfig "$bed/admin.kubeconfig" apply --server-side -f deploy/crds/cinderblock.dev.yaml >/dev/null
e2e_started=$(date +%s)
cargo test --locked --test kube_store
cargo test --locked --test kube_requests -- --nocapture
cargo test --locked --test kube_e2e -- --nocapture
cargo test --locked --test kube_trust -- --nocapture
cargo test --locked --test kube_migrate -- --nocapture
echo "   kube store, end to end, trust and migration crashes in $(( $(date +%s) - e2e_started ))s"
scripts/k8s/testbed.sh down "$bed"
unset CINDERBLOCK_TEST_KUBECONFIG

echo "== Helm chart: lint, render, install on a real API server, RBAC, uninstall"
scripts/test-helm.sh

echo "== images without a registry: cinderblock (release binary, Debian root file system), sidecars, test images"
images_started=$(date +%s)
scripts/k8s/images.sh
echo "   built or found in $(( $(date +%s) - images_started ))s"
scripts/test-image.sh

echo "== real kubelets: two nodes, helm install, pods on PVCs, External Storage e2e subset (logs kept on failure)"
cluster_started=$(date +%s)
# The e2e subset CI runs (docs/e2e.md has the full run): provisioning with
# data, ext4 and xfs, block, snapshots, clones, online expansion, read-write-
# once-pod; see scripts/e2e-storage.sh.
CLUSTER_E2E_FOCUS=${CLUSTER_E2E_FOCUS-$(sed -n 's/^ci_focus=//p' tests/e2e-storage/ci-subset)} scripts/test-cluster.sh
echo "   cluster tests in $(( $(date +%s) - cluster_started ))s"

echo "== all tests passed in $(( $(date +%s) - started ))s"
