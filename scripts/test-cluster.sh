#!/usr/bin/env bash
# cinderblock on real kubelets: brings up the two-node cluster of
# scripts/cluster.sh, imports the images of scripts/k8s/images.sh,
# `helm install`s charts/cinderblock pointed at them, and checks what a user
# would: pods using ext4, xfs and raw block PVCs across pod restarts,
# snapshots, restores and clones of a volume in use, online expansion,
# the node plugin restarted under a writing pod, the StorageNode, CSINode
# and CSIStorageCapacity objects and the scheduler following them, a node
# evacuated and drained with its zone volume migrating under a writing pod
# that then runs on the other node, then
# (optionally) Kubernetes' External Storage e2e suite, `helm upgrade` and
# `helm uninstall`.
#
# Usage (as root): scripts/test-cluster.sh
#   Needs scripts/k8s/build.sh all (or cluster) and scripts/k8s/images.sh
#   done; scripts/test-all.sh runs both first.
# Environment:
#   CLUSTER_E2E_FOCUS   a ginkgo focus for scripts/e2e-storage.sh, run on the
#                       installed driver between the checks and the upgrade;
#                       empty (the default) skips it
#   CLUSTER_LOGS        where the logs go (default .cache/cluster-logs/DATE);
#                       printed on failure; kept on success only with
#                       CLUSTER_KEEP_LOGS=1
#   CLUSTER_KEEP=1      leave the cluster up at the end (its folder is printed)
#   CLUSTER_CHECKS=0    only the cluster, the install and the e2e run
#                       (scripts/e2e-storage.sh uses it)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=k8s/versions.sh
. scripts/k8s/versions.sh
started=$SECONDS

[ "$(id -u)" = 0 ] || { echo "test-cluster: needs root (namespaces, mounts, loop devices)" >&2; exit 2; }
images=${IMAGES_DIR:-$root/.tools/images}
for t in cinderblock pause busybox csi-provisioner csi-snapshotter csi-resizer csi-attacher csi-node-driver-registrar \
  livenessprobe snapshot-controller; do
  [ -f "$images/$t.tar" ] || { echo "test-cluster: $images/$t.tar is missing: run scripts/k8s/images.sh" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/cinderblock-cluster.XXXXXX)
logs=${CLUSTER_LOGS:-$root/.cache/cluster-logs/$(date +%Y%m%d-%H%M%S)}
passed=0 failed=0 failures=()
say() { printf '== %s\n' "$*"; }
pass() { passed=$((passed + 1)); }
fail() { failed=$((failed + 1)); failures+=("$1"); printf 'FAIL: %s\n' "$1" >&2; }
check() { # what cmd...
  local what=$1 out; shift
  if out=$("$@" 2>&1); then pass; else fail "$what"; printf '%s\n' "$out" | tail -15 | sed 's/^/    /' >&2; fi
}

finish() {
  local status=$?
  set +e
  if [ $status != 0 ] || [ $failed -gt 0 ]; then
    mkdir -p "$logs"
    k get nodes,pods -A -o wide >"$dir/logs/cluster-state.txt" 2>&1
    k get pvc,pv,volumesnapshots,volumesnapshotcontents,csinodes,csistoragecapacities -A -o wide >>"$dir/logs/cluster-state.txt" 2>&1
    k -n cinderblock logs -l app.kubernetes.io/component=node --all-containers --prefix --tail=-1 >"$dir/logs/cinderblock-node-pods.log" 2>&1
    k -n cinderblock logs -l app.kubernetes.io/component=controller --all-containers --prefix --tail=-1 >"$dir/logs/cinderblock-controller-pods.log" 2>&1
    k get events -A --sort-by=.lastTimestamp >"$dir/logs/events.txt" 2>&1
    cp -rL "$dir/logs/." "$logs/" 2>/dev/null
    printf 'test-cluster: logs (kubelet, containerd, kube-proxy per node, control plane, pods, events) kept in %s\n' "$logs" >&2
  elif [ "${CLUSTER_KEEP_LOGS:-0}" = 1 ]; then
    mkdir -p "$logs"; cp -rL "$dir/logs/." "$logs/" 2>/dev/null
  fi
  if [ "${CLUSTER_KEEP:-0}" = 1 ]; then
    printf 'test-cluster: cluster left up in %s (scripts/cluster.sh down %s)\n' "$dir" "$dir" >&2
  else
    scripts/cluster.sh down "$dir" >/dev/null 2>&1
    rm -rf "$dir"
  fi
  exit $status
}
trap finish EXIT

k() { scripts/cluster.sh run "$dir" kubectl "$@"; }
helm_() { scripts/cluster.sh run "$dir" "$K8S_BIN/helm" "$@"; }
on_node() { local n=$1; shift; scripts/cluster.sh node "$dir" "$n" "$@"; }

# ------------------------------------------------------------ cluster
say "cluster up: control plane, node-a and node-b (kubelet, containerd, kube-proxy)"
t0=$SECONDS
tars=()
for t in "$images"/*.tar; do [ "$(basename "$t")" = debian-rootfs.tar ] || tars+=("$t"); done
CLUSTER_IMAGES="${tars[*]}" scripts/cluster.sh up "$dir"
echo "   up with ${#tars[@]} images imported in $((SECONDS - t0))s"

say "a busybox pod on each node (CNI, kube-proxy to the API server's Service)"
for n in node-a node-b; do
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: hello-$n, namespace: default}
spec:
  nodeName: $n
  terminationGracePeriodSeconds: 1
  containers:
  - name: hello
    image: $(scripts/k8s/images.sh --ref busybox)
    imagePullPolicy: Never
    command: [sh, -c, 'echo hello from \$(hostname); sleep 3600']
EOF
done
check "busybox pods Running on both nodes" k wait --for=condition=Ready --timeout=90s pod/hello-node-a pod/hello-node-b
check "kubectl logs (API server -> kubelet)" sh -c "scripts/cluster.sh run '$dir' kubectl logs hello-node-a | grep -qx 'hello from hello-node-a'"
check "kubectl exec" sh -c "[ \"\$(scripts/cluster.sh run '$dir' kubectl exec hello-node-b -- hostname)\" = hello-node-b ]"
b_ip=$(k get pod hello-node-b -o jsonpath='{.status.podIP}')
check "pod on node-a reaches pod on node-b ($b_ip)" k exec hello-node-a -- ping -c1 -W3 "$b_ip"
# The API server through the kubernetes Service (kube-proxy's rules): plain
# HTTP to its TLS port gets its "HTTP/1.0 400 Bad Request" back.
check "pod reaches the API server at its Service IP (kube-proxy)" k exec hello-node-a -- sh -c \
  'printf "GET /version HTTP/1.0\r\n\r\n" | nc -w 5 10.0.0.1 443 | grep -q "HTTP/1.0 400"'
k delete pod hello-node-a hello-node-b --wait=false >/dev/null

# ------------------------------------------------------------ install
say "VolumeSnapshot CRDs and snapshot-controller (as a pod)"
for f in "$K8S_CRDS"/snapshot.storage.k8s.io_*.yaml; do k apply --server-side -f "$f" >/dev/null; done
k wait --for=condition=Established --timeout=60s crd/volumesnapshots.snapshot.storage.k8s.io \
  crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io >/dev/null
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: snapshot-controller, namespace: kube-system}
---
# The snapshot-controller is the cluster's, not the driver's: the test gives
# it cluster-admin rather than repeat upstream's RBAC.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: snapshot-controller-test}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects: [{kind: ServiceAccount, name: snapshot-controller, namespace: kube-system}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: snapshot-controller, namespace: kube-system}
spec:
  replicas: 1
  selector: {matchLabels: {app: snapshot-controller}}
  template:
    metadata: {labels: {app: snapshot-controller}}
    spec:
      serviceAccountName: snapshot-controller
      containers:
      - name: snapshot-controller
        image: $(scripts/k8s/images.sh --ref snapshot-controller)
        imagePullPolicy: Never
        args: [--feature-gates=CSIVolumeGroupSnapshot=false, --retry-interval-max=5s]
EOF

say "helm install charts/cinderblock with the local images (no registry)"
# Two controller replicas, as the chart's default: each sidecar elects its
# own leader apart from cinderblock's Lease, and a sidecar beside the
# standby is served through it (the standby hands its calls to the leader).
replicas=${CLUSTER_CONTROLLER_REPLICAS:-2}
# Both nodes in one zone, so a zone volume can be used from either.
settings=(--set controller.replicas="$replicas" --set node.zone=zone-1)
helm_ install cinderblock charts/cinderblock --namespace cinderblock --create-namespace \
  -f "$images/values.yaml" "${settings[@]}" \
  --wait --timeout 180s >"$dir/logs/helm-install.log" 2>&1 ||
  { cat "$dir/logs/helm-install.log" >&2; fail "helm install"; exit 1; }
pass
check "node plugin Ready on both nodes" k -n cinderblock rollout status daemonset/cinderblock-node --timeout=120s
check "controller available" k -n cinderblock rollout status deployment/cinderblock-controller --timeout=120s
check "snapshot-controller available" k -n kube-system rollout status deployment/snapshot-controller --timeout=120s

say "registration: CSINode, StorageNode, CSIStorageCapacity"
# field OBJECT JSONPATH WANT
field() {
  local got
  got=$(k get "$1" -o jsonpath="$2") || return 1
  [ "$got" = "$3" ] || { printf '%s %s: got %q, want %q\n' "$1" "$2" "$got" "$3"; return 1; }
}
eventually() { # seconds cmd...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -lt $deadline ] || return 1; sleep 1; done
}
for n in node-a node-b; do
  check "CSINode $n lists cinderblock.dev with its node ID" eventually 60 \
    field "csinode/$n" '{.spec.drivers[?(@.name=="cinderblock.dev")].nodeID}' "$n"
  check "CSINode $n topology keys" field "csinode/$n" \
    '{.spec.drivers[?(@.name=="cinderblock.dev")].topologyKeys}' '["topology.cinderblock.dev/node","topology.cinderblock.dev/zone"]'
  check "Node $n labelled topology.cinderblock.dev/node=$n" field "node/$n" \
    '{.metadata.labels.topology\.cinderblock\.dev/node}' "$n"
  check "StorageNode $n exists" eventually 60 k get "storagenode/$n"
done
# Pool capacity as each node reports it (XFS of 4G and 10G).
cap_a=$(k get storagenode/node-a -o jsonpath='{.spec.capacity.total}' 2>/dev/null || true)
cap_b=$(k get storagenode/node-b -o jsonpath='{.spec.capacity.total}' 2>/dev/null || true)
k get storagenodes -o wide
for n in node-a node-b; do
  check "StorageNode $n: pool on xfs with reflink" field "storagenode/$n" '{.spec.filesystem}/{.spec.reflink}' xfs/true
  ip=$(k -n cinderblock get pods -l app.kubernetes.io/component=node --field-selector spec.nodeName=$n -o jsonpath='{.items[0].status.podIP}')
  # https: the agent answers only the controller's certificate (mutual TLS).
  check "StorageNode $n: agent at its node plugin pod's address, over TLS" field "storagenode/$n" '{.spec.agent_address}' "https://$ip:9810"
done
check "StorageNode capacities differ as the pools do (node-a ${cap_a:-?} < node-b ${cap_b:-?})" \
  sh -c "[ -n '$cap_a' ] && [ -n '$cap_b' ] && [ '$cap_a' -lt '$cap_b' ]"
# One CSIStorageCapacity per StorageClass and node segment.
capacity_objects() {
  local got
  got=$(k -n cinderblock get csistoragecapacities -o jsonpath='{range .items[*]}{.storageClassName}/{.nodeTopology.matchLabels.topology\.cinderblock\.dev/node}{"\n"}{end}' | sort -u | wc -l)
  [ "$got" -ge 6 ] || { echo "$got CSIStorageCapacity objects with a class and node, want 6 (3 classes x 2 nodes)"; return 1; }
}
check "CSIStorageCapacity for 3 classes x 2 nodes" eventually 90 capacity_objects
k -n cinderblock get csistoragecapacities -o custom-columns=CLASS:.storageClassName,NODE:.nodeTopology.matchLabels.topology\\.cinderblock\\.dev/node,CAPACITY:.capacity

busybox=$(scripts/k8s/images.sh --ref busybox)
checks=${CLUSTER_CHECKS:-1}
if [ "$checks" = 1 ]; then

# ------------------------------------------------------------ ext4, xfs
# pvc_pod NAME CLASS SIZE [NODE] [MODE]: a PVC and a pod using it (at /data,
# or /dev/xvda in Block mode) that sleeps.
pvc() { # name class size [mode] [datasource-kind datasource-name]
  local ds='' group=''
  [ "${5:-}" != VolumeSnapshot ] || group=', apiGroup: snapshot.storage.k8s.io'
  [ -z "${5:-}" ] || ds="  dataSource: {kind: $5, name: $6$group}"
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: default}
spec:
  storageClassName: $2
  accessModes: [ReadWriteOnce]
  volumeMode: ${4:-Filesystem}
  resources: {requests: {storage: $3}}
$ds
EOF
}
pod() { # name pvc [node] [mode] [command]
  local sel='' use
  [ -z "${3:-}" ] || sel="  nodeSelector: {kubernetes.io/hostname: $3}"
  if [ "${4:-Filesystem}" = Block ]; then
    use="    volumeDevices: [{name: v, devicePath: /dev/xvda}]"
  else
    use="    volumeMounts: [{name: v, mountPath: /data}]"
  fi
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: default, labels: {test: cluster}}
spec:
  terminationGracePeriodSeconds: 2
$sel
  containers:
  - name: app
    image: $busybox
    imagePullPolicy: Never
    command: [sh, -c, '${5:-sleep 3600}']
$use
  volumes: [{name: v, persistentVolumeClaim: {claimName: $2}}]
EOF
}
ready() { k wait --for=condition=Ready --timeout="${2:-120s}" "pod/$1" >/dev/null; }
node_of() { k get pod "$1" -o jsonpath='{.spec.nodeName}'; }

for fs in ext4 xfs; do
  class=cinderblock; [ $fs = ext4 ] || class=cinderblock-xfs
  say "StatefulSet with a $fs PVC: write, delete the pod, read back"
  k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db-$fs, namespace: default}
spec:
  serviceName: db-$fs
  replicas: 1
  selector: {matchLabels: {app: db-$fs}}
  template:
    metadata: {labels: {app: db-$fs}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: db
        image: $busybox
        imagePullPolicy: Never
        command: [sh, -c, 'sleep 3600']
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      storageClassName: $class
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
EOF
  if ! ready "db-$fs-0" 180s; then fail "StatefulSet db-$fs: pod Ready"; k describe pod "db-$fs-0" | tail -20; continue; fi
  pass
  check "db-$fs-0 mounts a $fs file system at /data" sh -c \
    "scripts/cluster.sh run '$dir' kubectl exec db-$fs-0 -- grep ' /data ' /proc/mounts | grep -q ' $fs '"
  token=$fs-$RANDOM$RANDOM
  check "write to the $fs volume" k exec "db-$fs-0" -- sh -c "echo $token >/data/token && dd if=/dev/urandom of=/data/blob bs=1M count=16 2>/dev/null && md5sum /data/blob >/data/blob.md5 && sync"
  first_node=$(node_of "db-$fs-0")
  k delete pod "db-$fs-0" --wait=true --timeout=60s >/dev/null
  if ready "db-$fs-0" 120s; then
    check "db-$fs-0 reads back after being recreated" sh -c \
      "[ \"\$(scripts/cluster.sh run '$dir' kubectl exec db-$fs-0 -- cat /data/token)\" = $token ]"
    check "db-$fs-0 blob checksum" k exec "db-$fs-0" -- md5sum -c /data/blob.md5
    check "recreated pod stays on the volume's node ($first_node)" sh -c "[ \"\$(scripts/cluster.sh run '$dir' kubectl get pod db-$fs-0 -o jsonpath='{.spec.nodeName}')\" = $first_node ]"
  else
    fail "db-$fs-0 Ready again after delete"
  fi
done

# ------------------------------------------------------------ raw block
say "raw block PVC: write and read through the device"
pvc raw cinderblock 256Mi Block
pod raw raw "" Block
if ready raw 180s; then
  pass
  check "block device at /dev/xvda" k exec raw -- test -b /dev/xvda
  check "write a pattern at offset 100 MiB" k exec raw -- sh -c \
    'dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && dd if=/tmp/p of=/dev/xvda bs=1M seek=100 conv=fsync 2>/dev/null && md5sum </tmp/p >/tmp/p.md5'
  check "read it back through the device" k exec raw -- sh -c \
    '[ "$(dd if=/dev/xvda bs=1M skip=100 count=4 2>/dev/null | md5sum)" = "$(cat /tmp/p.md5)" ]'
  check "device size 256 MiB" k exec raw -- sh -c '[ "$(blockdev --getsize64 /dev/xvda)" = 268435456 ]'
else
  fail "raw block pod Ready"
fi

# ------------------------------------------------------------ zone volume
say "zone volume: used from the node without its image over NBD, then on its owner, then over NBD again"
pv_of_zone() { # pvc
  local pv; pv=$(k get pvc "$1" -o jsonpath='{.spec.volumeName}')
  k get pv "$pv" -o jsonpath='{.spec.nodeAffinity}' | grep -q 'topology.cinderblock.dev/zone' &&
    ! k get pv "$pv" -o jsonpath='{.spec.nodeAffinity}' | grep -q 'topology.cinderblock.dev/node'
}
attached_over_nbd() { # node (prints the attachments when it does not hold)
  local list
  list=$(k get volumeattachments -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.attached} {.status.attachmentMetadata.cinderblock\.dev/transport} {.metadata.deletionTimestamp}{"\n"}{end}')
  printf '%s\n' "$list" | awk -v n="$1" '$2 == n && $3 == "true" && $4 == "nbd" && $5 == "" { ok = 1 } END { exit !ok }' && return 0
  printf 'no live attachment of %s over nbd; name node attached transport deleting:\n%s\n' "$1" "$list"
  return 1
}
pvc zoned cinderblock-zone 256Mi
pod zoned-a zoned node-a
if ready zoned-a 180s; then
  pass
  check "the zone volume's PV names its zone, not a node" pv_of_zone zoned
  check "write on node-a" k exec zoned-a -- sh -c 'echo from-a >/data/a && dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null && md5sum /data/blob >/data/blob.md5 && sync'
  # The zone class may place the image on either node of the zone.
  owner=$(k get blockvolume "$(k get pv "$(k get pvc zoned -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')" -o jsonpath='{.spec.node}')
  other=node-b; [ "$owner" != node-b ] || other=node-a
  k delete pod zoned-a --wait=true --timeout=90s >/dev/null
  pod zoned-b zoned "$other"
  if ready zoned-b 180s; then
    pass
    check "VolumeAttachment to $other (image on $owner) carries an NBD export" eventually 60 attached_over_nbd "$other"
    check "the other node reads what node-a wrote" k exec zoned-b -- sh -c 'grep -qx from-a /data/a && md5sum -c /data/blob.md5'
    check "write on node-b" k exec zoned-b -- sh -c 'echo from-b >/data/b && sync'
    k delete pod zoned-b --wait=true --timeout=90s >/dev/null
    pod zoned-a2 zoned "$owner"
    if ready zoned-a2 180s; then
      pass
      check "back on the owner: both writes there" k exec zoned-a2 -- sh -c 'grep -qx from-a /data/a && grep -qx from-b /data/b && md5sum -c /data/blob.md5'
      check "write on the owner $owner" k exec zoned-a2 -- sh -c 'echo from-owner >/data/c && sync'
      # And away again: the export is made anew for the other node.
      k delete pod zoned-a2 --wait=true --timeout=90s >/dev/null
      pod zoned-b2 zoned "$other"
      if ready zoned-b2 180s; then
        pass
        check "VolumeAttachment to $other over NBD again" eventually 60 attached_over_nbd "$other"
        check "on $other again: every write there" k exec zoned-b2 -- sh -c \
          'grep -qx from-a /data/a && grep -qx from-b /data/b && grep -qx from-owner /data/c && md5sum -c /data/blob.md5'
      else
        fail "zone volume pod Ready on $other again"; k describe pod zoned-b2 | tail -15
      fi
      k delete pod zoned-b2 --wait=false >/dev/null 2>&1 || true
    else
      fail "zone volume pod Ready again on node-a"; k describe pod zoned-a2 | tail -15
      k delete pod zoned-a2 --wait=false >/dev/null 2>&1 || true
    fi
  else
    fail "zone volume pod Ready on node-b (remote attach)"; k describe pod zoned-b | tail -15
    k delete pod zoned-b --wait=false >/dev/null 2>&1 || true
  fi
else
  fail "zone volume pod Ready on node-a"; k describe pod zoned-a | tail -15
fi

# ------------------------------------------------------------ snapshots
say "VolumeSnapshot of the ext4 PVC in use; restore and clone"
src_node=$(node_of db-ext4-0 || true)
k apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap1, namespace: default}
spec:
  volumeSnapshotClassName: cinderblock
  source: {persistentVolumeClaimName: data-db-ext4-0}
EOF
snap_ready() { [ "$(k get volumesnapshot snap1 -o jsonpath='{.status.readyToUse}')" = true ]; }
check "snapshot of a PVC in use is readyToUse" eventually 90 snap_ready
token=$(k exec db-ext4-0 -- cat /data/token 2>/dev/null || true)
# The restore and the clone live in the pool of the source's node: the
# pods ask for that node.
pvc restored cinderblock 1Gi Filesystem VolumeSnapshot snap1
pod restored restored "$src_node"
if ready restored 180s; then
  check "pod reads the snapshot's data from the restored PVC" sh -c \
    "[ \"\$(scripts/cluster.sh run '$dir' kubectl exec restored -- cat /data/token)\" = '$token' ]"
  check "restored blob checksum" k exec restored -- md5sum -c /data/blob.md5
else
  fail "pod of the PVC restored from a snapshot Ready"; k describe pvc restored | tail -10
fi
pvc cloned cinderblock 1Gi Filesystem PersistentVolumeClaim data-db-ext4-0
pod cloned cloned "$src_node"
if ready cloned 180s; then
  check "pod reads the source's data from the cloned PVC" sh -c \
    "[ \"\$(scripts/cluster.sh run '$dir' kubectl exec cloned -- cat /data/token)\" = '$token' ]"
else
  fail "pod of the cloned PVC Ready"; k describe pvc cloned | tail -10
fi

# The same snapshot restored for a pod that must run on the other node: the
# source's node is not allowed (the pod's node is), so the volume is made on
# the pod's node and copied there from the snapshot's node over NBD.
far_node=node-b; [ "$src_node" != node-b ] || far_node=node-a
say "restore the snapshot onto $far_node, the node without it (cross-node copy)"
pvc restored-far cinderblock 1Gi Filesystem VolumeSnapshot snap1
pod restored-far restored-far "$far_node"
volume_of() { k get pv "$(k get pvc "$1" -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}'; }
if ready restored-far 300s; then
  pass
  check "the restored volume lives in $far_node's pool" sh -c \
    "[ \"\$(scripts/cluster.sh run '$dir' kubectl get blockvolume \"$(volume_of restored-far)\" -o jsonpath='{.spec.node}')\" = $far_node ]"
  check "pod on $far_node reads the snapshot's data" sh -c \
    "[ \"\$(scripts/cluster.sh run '$dir' kubectl exec restored-far -- cat /data/token)\" = '$token' ]"
  check "restored-far blob checksum" k exec restored-far -- md5sum -c /data/blob.md5
else
  fail "pod of the PVC restored onto $far_node Ready"; k describe pvc restored-far | tail -10
fi
k delete pod restored-far --wait=false >/dev/null 2>&1 || true

# ------------------------------------------------------------ health
say "volume health: the image removed under a running pod raises VolumeAbnormal on its PVC"
pvc sick cinderblock 256Mi
pod sick sick node-a
if ready sick 180s; then
  pass
  sick_vol=$(volume_of sick)
  sick_node=$(k get blockvolume "$sick_vol" -o jsonpath='{.spec.node}')
  on_node "$sick_node" rm -f "/var/lib/cinderblock/pool/volumes/$sick_vol.img"
  abnormal_event() {
    k get events --field-selector involvedObject.kind=PersistentVolumeClaim,involvedObject.name=sick,reason=VolumeAbnormal \
      -o jsonpath='{.items[*].type}' | grep -qw Warning
  }
  check "a VolumeAbnormal Warning event on PVC sick" eventually 150 abnormal_event
  check "the event says the image is missing" sh -c \
    "scripts/cluster.sh run '$dir' kubectl get events --field-selector involvedObject.name=sick,reason=VolumeAbnormal -o jsonpath='{.items[*].message}' | grep -qi image"
  k delete pod sick --wait=true --timeout=90s >/dev/null && pass || fail "pod on a volume whose image is gone deleted (unpublish, unstage)"
else
  fail "pod sick Ready"
fi
k delete pvc sick --wait=false >/dev/null 2>&1 || true

# ------------------------------------------------------------ expansion
say "expand the xfs PVC while its pod runs"
size_kb() { k exec db-xfs-0 -- df -k /data | awk 'NR==2 {print $2}'; }
before=$(size_kb || echo 0)
k patch pvc data-db-xfs-0 --type merge -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
grown() { local now; now=$(size_kb) && [ "$now" -gt $((before + 900000)) ]; }
check "df in the running pod shows the new size (was ${before} KiB)" eventually 120 grown
check "PVC status capacity 2Gi" eventually 60 field pvc/data-db-xfs-0 '{.status.capacity.storage}' 2Gi
check "data still there after the expansion" k exec db-xfs-0 -- md5sum -c /data/blob.md5

# ------------------------------------------------------------ capacity
say "capacity tracking: a thick PVC too big for node-a's pool lands on node-b"
pvc big cinderblock-thick 6Gi
pod big big
if ready big 180s; then
  check "the 6Gi thick volume's pod runs on node-b" sh -c "[ \"\$(scripts/cluster.sh run '$dir' kubectl get pod big -o jsonpath='{.spec.nodeName}')\" = node-b ]"
else
  fail "pod of the 6Gi thick PVC Ready"; k describe pod big | tail -10
fi
k delete pod big --wait=false >/dev/null

# ------------------------------------------------------------ node plugin restart
say "node plugin pod deleted while an application writes"
pvc writer cinderblock 512Mi
pod writer writer "" Filesystem 'i=0; while true; do i=$((i+1)); { echo $i >>/data/log && dd if=/dev/null of=/data/log conv=notrunc,fsync 2>/dev/null; } || echo WRITE-FAILED $i >&2; sleep 0.2; done'
if ready writer 180s; then
  wnode=$(node_of writer)
  plugin=$(k -n cinderblock get pods -l app.kubernetes.io/component=node --field-selector spec.nodeName="$wnode" -o name)
  lines_before=$(k exec writer -- sh -c 'wc -l </data/log')
  k -n cinderblock delete "$plugin" --wait=true --timeout=60s >/dev/null
  plugin_back() {
    local p; p=$(k -n cinderblock get pods -l app.kubernetes.io/component=node --field-selector spec.nodeName="$wnode" -o name)
    [ -n "$p" ] && [ "$p" != "$plugin" ] && k -n cinderblock wait --for=condition=Ready --timeout=5s "$p" >/dev/null
  }
  check "the node plugin comes back on $wnode" eventually 120 plugin_back
  sleep 3
  lines_after=$(k exec writer -- sh -c 'wc -l </data/log')
  check "the application kept writing ($lines_before -> $lines_after lines)" sh -c "[ '$lines_after' -gt '$lines_before' ]"
  check "no write failed" sh -c "! scripts/cluster.sh run '$dir' kubectl logs writer | grep -q WRITE-FAILED"
  check "kubelet registered the plugin again" eventually 60 \
    field "csinode/$wnode" '{.spec.drivers[?(@.name=="cinderblock.dev")].nodeID}' "$wnode"
  # Unstage through the new plugin: the pod goes, the volume is released
  # and deleted, and its loop device with it.
  k delete pod writer --wait=true --timeout=90s >/dev/null && pass || fail "writer pod deleted (unpublish, unstage by the restarted plugin)"
  pv=$(k get pvc writer -o jsonpath='{.spec.volumeName}')
  k delete pvc writer --wait=true --timeout=90s >/dev/null && pass || fail "writer PVC deleted"
  pv_gone() { ! k get pv "$pv" >/dev/null 2>&1; }
  check "its PV $pv is deleted" eventually 90 pv_gone
  check "no mount of $pv left on $wnode" sh -c "! scripts/cluster.sh node '$dir' '$wnode' grep -q '$pv' /proc/self/mountinfo"
else
  fail "writer pod Ready"
fi

# ------------------------------------------------------------ drain
# The admin's path of docs/migration.md: `ctl node evacuate` on the node of
# a Deployment's zone volume, then `kubectl drain`.
# The pod appends numbered lines all along; its successor on the other
# node must find every line, and the volume in that node's pool.
say "node drained: its zone volume migrates, the pod follows to the other node and reads its data"
# ctl runs in a standby replica when there is one (not the Lease's holder),
# so the leader gets the call handed over from it.
leader=$(k -n cinderblock get lease cinderblock-controller -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
ctl_pod=$(k -n cinderblock get pods -l app.kubernetes.io/component=controller -o name | grep -vx "pod/$leader" | head -n1 || true)
[ -n "$ctl_pod" ] || ctl_pod=deploy/cinderblock-controller
echo "   ctl runs in $ctl_pod (leader: ${leader:-?})"
ctl() { k -n cinderblock exec "$ctl_pod" -c cinderblock -- /usr/local/bin/cinderblock ctl --endpoint unix:///csi/csi.sock "$@"; }
pvc mover cinderblock-zone 256Mi
k apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: mover, namespace: default}
spec:
  replicas: 1
  strategy: {type: Recreate}
  selector: {matchLabels: {app: mover}}
  template:
    metadata: {labels: {app: mover}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: app
        image: $busybox
        imagePullPolicy: Never
        command: [sh, -c, 'i=0; [ -f /data/log ] && i=\$(wc -l </data/log); while true; do i=\$((i+1)); echo \$i >>/data/log; sync; sleep 0.2; done']
        volumeMounts: [{name: v, mountPath: /data}]
      volumes: [{name: v, persistentVolumeClaim: {claimName: mover}}]
EOF
# The Ready pod of the Deployment on NODE (not one that is terminating).
mover_on() { # node
  k get pods -l app=mover --field-selector "spec.nodeName=$1" \
    -o jsonpath='{range .items[?(@.status.containerStatuses[0].ready==true)]}{.metadata.name} {.metadata.deletionTimestamp}{"\n"}{end}' |
    awk 'NF == 1 { print $1; exit }'
}
mover_ready_on() { [ -n "$(mover_on "$1")" ]; }
if k rollout status deployment/mover --timeout=180s >/dev/null; then
  pass
  mvol=$(volume_of mover)
  from=$(k get blockvolume "$mvol" -o jsonpath='{.spec.node}')
  to=node-b; [ "$from" != node-b ] || to=node-a
  # The pod goes to the volume's node first (the zone class may have put
  # the image on the other one): the other node cordoned while it moves.
  if ! mover_ready_on "$from"; then
    k cordon "$to" >/dev/null
    k delete pod -l app=mover --wait=true --timeout=90s >/dev/null
    eventually 180 mover_ready_on "$from" || fail "the mover pod Ready on its volume's node $from"
    k uncordon "$to" >/dev/null
  fi
  check "write a blob on $from" k exec "$(mover_on "$from")" -- sh -c \
    'dd if=/dev/urandom of=/data/blob bs=1M count=16 2>/dev/null && md5sum /data/blob >/data/blob.md5 && sync'
  check "ctl node evacuate $from" ctl node evacuate "$from"
  check "StorageNode $from is evacuating" eventually 30 field "storagenode/$from" '{.spec.evacuating}' true
  check "the volume migrates to $to" eventually 90 field "blockvolume/$mvol" '{.spec.migration.to}' "$to"
  # Pass 2 on, the target holds a full copy: the drain's switch can come.
  full_copy() { local p; p=$(k get blockvolume "$mvol" -o jsonpath='{.spec.migration.pass}') && [ "${p:-0}" -ge 2 ]; }
  check "the migration copies pass after pass while the pod writes" eventually 180 full_copy
  lines_before=$(k exec "$(mover_on "$from")" -- sh -c 'wc -l </data/log' || echo 0)
  t_drain=$SECONDS
  check "kubectl drain $from (evicts the pod)" k drain "$from" --pod-selector app=mover --ignore-daemonsets --timeout=120s
  if eventually 240 mover_ready_on "$to"; then
    pass
    echo "   pod Ready on $to $((SECONDS - t_drain))s after the drain began"
    moved=$(mover_on "$to")
    check "the volume now lives in $to's pool" eventually 60 field "blockvolume/$mvol" '{.spec.node}' "$to"
    check "the migration has ended" eventually 60 field "blockvolume/$mvol" '{.spec.migration}' ""
    check "$to attaches it from its own pool (no NBD)" sh -c \
      "! scripts/cluster.sh run '$dir' kubectl get volumeattachments -o jsonpath='{range .items[*]}{.spec.nodeName} {.status.attachmentMetadata.cinderblock\\.dev/transport}{\"\\n\"}{end}' | grep -qx '$to nbd'"
    check "the blob reads back on $to" k exec "$moved" -- md5sum -c /data/blob.md5
    sleep 1
    check "every line written on $from is there, in order (${lines_before} before the drain)" sh -c \
      "n=\$(scripts/cluster.sh run '$dir' kubectl exec '$moved' -- awk '\$1 != NR { exit 1 } END { print NR }' /data/log) && [ \"\$n\" -ge '$lines_before' ]"
  else
    fail "the mover pod Ready on $to after the drain"; k describe pods -l app=mover | tail -20
    k get blockvolume "$mvol" -o yaml | sed -n '/^spec:/,$p' | head -40
  fi
  k uncordon "$from" >/dev/null
  check "ctl node evacuate $from --stop" ctl node evacuate "$from" --stop
else
  fail "the mover Deployment available"; k describe pods -l app=mover | tail -20
fi
k delete deployment mover --wait=true --timeout=90s >/dev/null 2>&1 || true

fi # checks

# ------------------------------------------------------------ e2e
if [ -n "${CLUSTER_E2E_FOCUS:-}" ]; then
  say "Kubernetes External Storage e2e (focus: $CLUSTER_E2E_FOCUS)"
  if CLUSTER_DIR=$dir E2E_FOCUS=$CLUSTER_E2E_FOCUS scripts/e2e-storage.sh; then pass; else fail "External Storage e2e subset"; fi
fi

# ------------------------------------------------------------ upgrade, uninstall
if [ "$checks" = 1 ]; then
say "helm upgrade with a changed value"
helm_ upgrade cinderblock charts/cinderblock --namespace cinderblock -f "$images/values.yaml" \
  "${settings[@]}" --set node.heartbeatInterval=7 --wait --timeout 180s >"$dir/logs/helm-upgrade.log" 2>&1 &&
  pass || { fail "helm upgrade"; tail -20 "$dir/logs/helm-upgrade.log" >&2; }
check "the node pods run with the new value" sh -c \
  "scripts/cluster.sh run '$dir' kubectl -n cinderblock get pods -l app.kubernetes.io/component=node -o jsonpath='{range .items[*]}{.spec.containers[0].args}{\"\\n\"}{end}' | grep -c -- '--heartbeat-interval=7' | grep -qx 2"
check "the StatefulSet's data survived the upgrade" k exec db-ext4-0 -- md5sum -c /data/blob.md5

say "helm uninstall: the volumes the user still claims stay"
for p in restored restored-far cloned raw; do k delete pod "$p" --wait=false >/dev/null 2>&1 || true; done
k delete statefulset db-xfs --wait=true >/dev/null
k delete pod -l test=cluster --wait=true --timeout=90s >/dev/null 2>&1 || true
k delete volumesnapshot snap1 --wait=true --timeout=60s >/dev/null 2>&1 || true
k delete pvc restored restored-far cloned raw big zoned mover data-db-xfs-0 --wait=true --timeout=120s >/dev/null 2>&1 ||
  fail "PVCs deleted while the driver runs"
claimed=$(k get pvc data-db-ext4-0 -o jsonpath='{.spec.volumeName}')
# A released PV goes once its volume is detached (the attach-detach
# controller, then csi-attacher's ControllerUnpublish) and deleted
# (csi-provisioner's DeleteVolume): wait for that, as a user would, before
# the driver goes.
released_deadline=$((SECONDS + 180))
while :; do
  pvs=$(k get pv -o name 2>/dev/null)
  [ "$pvs" = "persistentvolume/$claimed" ] && break
  [ $SECONDS -lt $released_deadline ] || { fail "released PVs deleted by the driver (left: $(echo $pvs))"; break; }
  sleep 2
done
helm_ uninstall cinderblock --namespace cinderblock --wait --timeout 120s >/dev/null 2>&1 && pass || fail "helm uninstall"
# Leader-election Leases are the sidecars' runtime state, not the release's.
# The cluster CA (Secret and ConfigMap cinderblock-ca) is made by the
# controller at its first start, not by helm, and outlives the release by
# design (docs/security.md): listed, not counted.
gone_deadline=$((SECONDS + 60))
while :; do
  left=$(k -n cinderblock get all,configmap,secret,serviceaccount,role,rolebinding,networkpolicy,poddisruptionbudget,csistoragecapacities -o name 2>/dev/null |
    grep -v -e '^configmap/kube-root-ca.crt$' -e '^serviceaccount/default$' -e '^configmap/cinderblock-ca$' -e '^secret/cinderblock-ca$' || true)
  [ -n "$left" ] && [ $SECONDS -lt $gone_deadline ] || break
  sleep 1
done
if [ -z "$left" ]; then pass; else fail "nothing of the release left in its namespace (left: $(printf '%s' "$left" | tr '\n' ' '))"; fi
for o in csidriver/cinderblock.dev storageclass/cinderblock storageclass/cinderblock-xfs \
  storageclass/cinderblock-thick volumesnapshotclass/cinderblock clusterrole/cinderblock-node; do
  check "$o is gone" sh -c "! scripts/cluster.sh run '$dir' kubectl get $o >/dev/null 2>&1"
done
check "no PV left but the one still claimed ($claimed)" sh -c \
  "[ \"\$(scripts/cluster.sh run '$dir' kubectl get pv -o name)\" = persistentvolume/$claimed ]"
check "the claimed PVC is still Bound" field pvc/data-db-ext4-0 '{.status.phase}' Bound
echo "   left after uninstall (cluster-scoped records of the CRDs helm keeps):"
k get blockvolumes,blocksnapshots,storagenodes -o name 2>/dev/null | sed 's/^/     /'
fi # checks

elapsed=$((SECONDS - started))
echo "test-cluster: $passed passed, $failed failed in ${elapsed}s"
if [ $failed -gt 0 ]; then printf '  - %s\n' "${failures[@]}"; exit 1; fi
echo "$passed passed, 0 failed"
