#!/usr/bin/env bash
# A two-node Kubernetes cluster on this one machine, for tests: the control
# plane of scripts/k8s/testbed.sh (etcd, kube-apiserver, and
# kube-controller-manager with all its default controllers) plus
# kube-scheduler, and two nodes, node-a and node-b, each a real kubelet with
# its own containerd and runc, kube-proxy and the CNI bridge plugin.
#
# Usage (as root):
#   scripts/cluster.sh up DIR          start it (about a minute); DIR must not hold a running cluster
#   scripts/cluster.sh down DIR        stop everything and remove what it made (safe to repeat, and after a failure)
#   scripts/cluster.sh run DIR CMD...  run CMD where the API server answers (KUBECONFIG set)
#   scripts/cluster.sh node DIR NODE CMD...
#                                      run CMD in NODE's namespaces (node-a or node-b: its
#                                      /var/lib/kubelet, its containerd socket, its network)
#   scripts/cluster.sh import DIR TAR... import image tars (scripts/k8s/images.sh) into both nodes
#   scripts/cluster.sh status DIR      processes, nodes and pods
#
# Layout. Nothing leaves the machine and nothing outside DIR, the namespaces
# and the cgroups it made is changed:
# - Network namespaces CB-hub, CB-node-a, CB-node-b (CB: a tag unique to
#   DIR). The hub holds a bridge, 10.213.0.1/24, and the control plane: the
#   API server listens there on every address of the hub's namespace,
#   which are that bridge and its loopback. Each node has a veth into the
#   bridge (10.213.0.11 and .12), the hub routes the nodes' pod networks
#   (10.214.1.0/24, 10.214.2.0/24). Services: 10.0.0.0/24 (kubernetes at
#   10.0.0.1). `run` enters the hub's namespace, where the kubeconfig's
#   server, https://127.0.0.1:PORT, answers.
# - Each node runs its containerd, kubelet and kube-proxy in its network
#   namespace, a PID namespace of its own (so a hostPID pod sees the node's
#   processes and its PID 1, the node's, not the machine's), and a mount
#   namespace of its own (a slave of the machine's: nothing mounted inside
#   leaks out), in which DIR/NODE/root/{var/lib,
#   var/log,run} are bound over /var/lib, /var/log and /run (made shared,
#   for the Bidirectional mounts of a CSI node plugin). So the kubelet's
#   folder is /var/lib/kubelet and cinderblock's pool /var/lib/cinderblock/pool
#   on both nodes, as on any cluster, and one DaemonSet spec serves both.
# - Host sysctls: the kubelet runs with protectKernelDefaults (it only reads
#   them); in each node's mount namespace files holding the values it wants
#   are bound over those /proc/sys entries. kube-proxy leaves conntrack
#   limits alone (maxPerCore 0) and changes only its own namespace's.
# - Cgroups: everything nests under the memory cgroup this script runs in
#   (cgroupfs driver, cgroupRoot CGROUP/CB-NODE in every hierarchy); DIR/
#   cgroups.created lists what was made, and `down` removes exactly that.
# - Every process carries CINDERBLOCK_CLUSTER=DIR in its environment; `down`
#   signals only such processes, by pid, and the processes left in the
#   cgroups it made. Loop devices backed by files under DIR are detached.
#
# Logs: DIR/logs/ (control plane in DIR/logs/control/, each node's
# containerd, kubelet and kube-proxy in DIR/logs/NODE/); kept by `down`.
# Binaries: scripts/k8s/build.sh cluster; images: scripts/k8s/images.sh.
# Debian packages it needs (versions.sh DEBIAN_PARTS): runc,
# containernetworking-plugins, iptables, conntrack; xfsprogs for the pools.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=k8s/versions.sh
. "$here/k8s/versions.sh"

NODES=(node-a node-b)
HUB_IP=10.213.0.1
node_ip() { case $1 in node-a) echo 10.213.0.11 ;; node-b) echo 10.213.0.12 ;; esac; }
pod_cidr() { case $1 in node-a) echo 10.214.1.0/24 ;; node-b) echo 10.214.2.0/24 ;; esac; }
CLUSTER_CIDR=10.214.0.0/16
# Each node's pool: an XFS file system of this size (CLUSTER_POOL_SIZES,
# "node-a=4G node-b=10G" by default; "" for a plain folder on DIR's file
# system). Different sizes let a test see capacity tracking steer a pod.
CLUSTER_POOL_SIZES=${CLUSTER_POOL_SIZES-node-a=4G node-b=10G}
pool_size() { local kv; for kv in $CLUSTER_POOL_SIZES; do [ "${kv%%=*}" != "$1" ] || echo "${kv#*=}"; done; }
CNI_BIN=${CNI_BIN:-/usr/lib/cni}
RUNC=${RUNC:-$(command -v runc || echo /usr/sbin/runc)}

die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*" >&2; }

abs() { (cd "$1" && pwd); }

# ------------------------------------------------------------ bookkeeping
# DIR/state holds TAG=..., HOLDER_node-a=pid, ... (shell syntax).
state_get() { # dir key
  sed -n "s/^$2=//p" "$1/state" 2>/dev/null | tail -1
}
state_set() { echo "$2=$3" >>"$1/state"; }

ours() { # pid dir
  local pid=$1
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  # grep reads the file itself (-z: NUL-separated entries): a `tr | grep -q`
  # pipeline fails under pipefail when grep quits before tr's last write
  # (an environment larger than one read), which took a live process for dead.
  grep -qzxF -- "CINDERBLOCK_CLUSTER=$2" "/proc/$pid/environ" 2>/dev/null
}

# Signals PID (TERM, then KILL after SECS) if it is one of ours.
stop_pid() { # dir pid secs
  local dir=$1 pid=$2 secs=${3:-10}
  ours "$pid" "$dir" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < secs * 10; i++)); do ours "$pid" "$dir" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}

# ------------------------------------------------------------ cgroups
# The hierarchies the cgroupfs driver uses (runc also mirrors into the
# unified one where it is mounted).
cgroup_dirs() {
  local d
  for d in /sys/fs/cgroup/*; do
    [ -d "$d" ] && [ "$(stat -f -c %T "$d")" != tmpfs ] && echo "$d"
  done
}
my_cgroup() { awk -F: '$2 == "memory" {print $3}' /proc/self/cgroup; }

# Creates PATH (relative to each hierarchy's root) in every hierarchy,
# recording each folder it makes in DIR/cgroups.created.
make_cgroup() { # dir path
  local dir=$1 path=$2 h part cur
  for h in $(cgroup_dirs); do
    cur=$h
    IFS=/ read -ra parts <<<"${path#/}"
    for part in "${parts[@]}"; do
      [ -n "$part" ] || continue
      # A folder another user made meanwhile is theirs: not recorded.
      if mkdir "$cur/$part" 2>/dev/null; then
        echo "$cur/$part" >>"$dir/cgroups.created"
        if [ -f "$cur/cpuset.cpus" ]; then
          cat "$cur/cpuset.cpus" >"$cur/$part/cpuset.cpus"
          cat "$cur/cpuset.mems" >"$cur/$part/cpuset.mems"
        fi
      elif [ ! -d "$cur/$part" ]; then
        die "cannot create cgroup $cur/$part"
      fi
      cur=$cur/$part
    done
  done
}

# Kills what is left in the cgroups DIR made (pods whose shim died), then
# removes them, deepest first, with what the kubelet and runc made below.
remove_cgroups() { # dir
  local dir=$1 f d pid tries
  f=$dir/cgroups.created
  [ -f "$f" ] || return 0
  for tries in 1 2 3 4 5; do
    local left=0
    while read -r d; do
      [ -d "$d" ] || continue
      while read -r pid; do
        [ -n "$pid" ] || continue
        kill -KILL "$pid" 2>/dev/null || true
        left=1
      done < <(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)
    done <"$f"
    [ $left = 1 ] || break
    sleep 0.5
  done
  while read -r d; do
    [ -d "$d" ] || continue
    find "$d" -depth -mindepth 1 -type d -exec rmdir {} \; 2>/dev/null || true
  done <"$f"
  tac "$f" | while read -r d; do
    [ ! -d "$d" ] || rmdir "$d" 2>/dev/null || printf 'cluster.sh: could not remove cgroup %s\n' "$d" >&2
  done
  rm -f "$f"
}

# ------------------------------------------------------------ certificates
issue_cert() { # pki name subject [ext]
  local pki=$1 name=$2 subject=$3 ext=${4:-extendedKeyUsage=clientAuth}
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days 7 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
  chmod 600 "$pki/$name.key"
}

kubeconfig() { # file server pki name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: $2
    certificate-authority: $3/ca.crt
users:
- name: $4
  user:
    client-certificate: $3/$4.crt
    client-key: $3/$4.key
contexts:
- name: cluster
  context: {cluster: cluster, user: $4}
current-context: cluster
EOF
  chmod 600 "$1"
}

# ------------------------------------------------------------ namespaces
netns() { echo "$(state_get "$1" TAG)-$2"; }
in_net() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

setup_network() { # dir
  local dir=$1 hub n ip
  hub=$(netns "$dir" hub)
  ip netns add "$hub"
  state_set "$dir" NETNS "$hub"
  ip -n "$hub" link set lo up
  ip -n "$hub" link add cb0 type bridge
  ip -n "$hub" addr add "$HUB_IP/24" dev cb0
  ip -n "$hub" link set cb0 up
  in_net "$hub" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
  for n in "${NODES[@]}"; do
    local ns; ns=$(netns "$dir" "$n")
    ip netns add "$ns"
    state_set "$dir" NETNS "$ns"
    ip=$(node_ip "$n")
    ip -n "$hub" link add "v$n" type veth peer name eth0 netns "$ns"
    ip -n "$hub" link set "v$n" master cb0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$HUB_IP"
    in_net "$ns" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
    ip -n "$hub" route add "$(pod_cidr "$n")" via "$ip"
  done
}

# The values the kubelet checks with protectKernelDefaults (and would
# otherwise write host-wide).
KERNEL_DEFAULTS="vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000"

# Starts the process that holds NODE's mount namespace: it binds the node's
# folders over /var/lib, /var/log and /run, the kernel defaults over
# /proc/sys, then sleeps. Everything of the node enters it with nsenter.
start_holder() { # dir node
  local dir=$1 n=$2 ns r
  ns=$(netns "$dir" "$n")
  r=$dir/$n/root
  mkdir -p "$r/var/lib" "$r/var/log" "$r/run" "$dir/$n/sysctl"
  local binds='' kv
  for kv in $KERNEL_DEFAULTS; do
    local key=${kv%%=*} val=${kv#*=} f
    f=$dir/$n/sysctl/${key//\//.}
    echo "$val" >"$f"
    binds+="mount --bind '$f' '/proc/sys/$key'; "
  done
  # A pool of its own size: an XFS (reflink) file system in a sparse file,
  # mounted at the pool's standard path inside the node only.
  local pool='' size
  size=$(pool_size "$n")
  if [ -n "$size" ]; then
    truncate -s "$size" "$dir/$n/pool.img"
    mkfs.xfs -q -f -m reflink=1 "$dir/$n/pool.img"
    pool="mkdir -p /var/lib/cinderblock/pool; mount -o loop '$dir/$n/pool.img' /var/lib/cinderblock/pool;"
  fi
  CINDERBLOCK_CLUSTER=$dir nsenter --net="/run/netns/$ns" \
    unshare --mount --propagation slave --pid --fork --mount-proc -- sh -c "
    set -e
    for d in var/lib var/log run; do mount --bind '$r/'\$d /\$d; mount --make-rshared /\$d; done
    $pool
    $binds
    touch '$dir/$n/ns-ready'
    exec '$dir/bin/pause'" </dev/null >>"$dir/logs/$n/holder.log" 2>&1 &
  local upid=$! i pid=''
  for i in $(seq 100); do [ -f "$dir/$n/ns-ready" ] && break; sleep 0.1; done
  [ -f "$dir/$n/ns-ready" ] || { cat "$dir/logs/$n/holder.log" >&2; die "$n: namespaces not ready"; }
  pid=$(child_of "$upid")
  [ -n "$pid" ] || die "$n: no process in the new namespaces"
  state_set "$dir" "HOLDER_$n" "$pid"
}

# The child of PID (nsenter and unshare fork into a new PID namespace).
child_of() { # pid
  local i c
  for i in $(seq 50); do
    c=$(cat "/proc/$1/task/$1/children" 2>/dev/null | awk '{print $1}')
    [ -n "$c" ] && { echo "$c"; return; }
    sleep 0.1
  done
}

in_node() { # dir node cmd...
  local dir=$1 n=$2 pid; shift 2
  pid=$(state_get "$dir" "HOLDER_$n")
  ours "$pid" "$dir" || die "$n is not running in $dir"
  nsenter -t "$pid" -m -n -p -- "$@"
}

# Starts CMD in NODE's namespaces in the background, logging to
# DIR/logs/NODE/NAME.log; records its pid as PID_NODE_NAME.
start_in_node() { # dir node name cmd...
  local dir=$1 n=$2 name=$3 pid; shift 3
  pid=$(state_get "$dir" "HOLDER_$n")
  CINDERBLOCK_CLUSTER=$dir PATH="$K8S_BIN:$PATH" nsenter -t "$pid" -m -n -p -- "$@" \
    </dev/null >>"$dir/logs/$n/$name.log" 2>&1 &
  local child; child=$(child_of $!)
  [ -n "$child" ] || die "$n: $name did not start"
  state_set "$dir" "PID_${n}_$name" "$child"
}

wait_until() { # seconds what cmd...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

# ------------------------------------------------------------ node config
write_node_config() { # dir node api_port cgroup_root
  local dir=$1 n=$2 port=$3 cgroot=$4 ip pki=$dir/control/pki cfg=$dir/$n
  ip=$(node_ip "$n")
  mkdir -p "$cfg/cni"
  issue_cert "$pki" "$n" "/O=system:nodes/CN=system:node:$n"
  issue_cert "$pki" "kube-proxy-$n" "/CN=system:kube-proxy"
  kubeconfig "$cfg/kubelet.kubeconfig" "https://$HUB_IP:$port" "$pki" "$n"
  kubeconfig "$cfg/kube-proxy.kubeconfig" "https://$HUB_IP:$port" "$pki" "kube-proxy-$n"

  cat >"$cfg/containerd.toml" <<EOF
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

# Its default, /opt/containerd, is the machine's: keep it in the node.
[plugins.'io.containerd.internal.v1.opt']
  path = "/var/lib/containerd-opt"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "registry.k8s.io/pause:3.10.2"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # No CAP_SYS_RESOURCE here, even for root: runc could not lower a
  # container's oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$CNI_BIN"]
    conf_dir = "$cfg/cni"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
EOF

  cat >"$cfg/cni/10-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "cluster",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$(pod_cidr "$n")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  cat >"$cfg/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine mounts cgroup v1.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $cgroot
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
podLogsDir: /var/log/pods
resolvConf: ""
# Read the kernel defaults, never write them (the node's mount namespace
# shows the values it checks).
protectKernelDefaults: true
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
# The machine's disk is shared and large: a share of it (the default 10%,
# or even 1%) can be more than is free while others work, and a node under
# disk pressure evicts the test's pods. Evict only near the very end; keep
# the imported images (nothing could pull them again).
evictionHard: {memory.available: "50Mi", nodefs.available: "256Mi", nodefs.inodesFree: "1%", imagefs.available: "256Mi"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
rotateCertificates: false
nodeStatusUpdateFrequency: 5s
# Its default, under /usr/libexec, is the machine's.
volumePluginDir: /var/lib/kubelet/volume-plugins
EOF

  cat >"$cfg/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $cfg/kube-proxy.kubeconfig}
hostnameOverride: $n
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: iptables
clusterCIDR: $CLUSTER_CIDR
# Leave the machine-wide conntrack table size and timeouts alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# ------------------------------------------------------------ commands
need() {
  [ "$(id -u)" = 0 ] || die "needs root (namespaces, mounts, cgroups)"
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy \
    containerd containerd-shim-runc-v2 ctr; do
    [ -x "$K8S_BIN/$b" ] || die "$K8S_BIN/$b is missing: run scripts/k8s/build.sh cluster"
  done
  for b in "$RUNC" iptables conntrack nsenter unshare ip openssl; do
    command -v "$b" >/dev/null || die "needs $b (apt-get install $DEBIAN_PARTS)"
  done
  for b in bridge host-local loopback portmap; do
    [ -x "$CNI_BIN/$b" ] || die "needs the CNI plugin $CNI_BIN/$b (apt-get install containernetworking-plugins)"
  done
}

up() {
  local dir=$1 started=$SECONDS
  need
  mkdir -p "$dir"; dir=$(abs "$dir")
  [ ! -f "$dir/state" ] || die "$dir already holds a cluster: run 'cluster.sh down $dir' first"
  mkdir -p "$dir/logs" "$dir/control"
  ln -sfn ../control "$dir/logs/control"
  local tag
  tag=cb$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  state_set "$dir" TAG "$tag"
  # Clean up whatever was made if any step below fails.
  # shellcheck disable=SC2064
  trap "status=\$?; if [ \$status != 0 ]; then printf 'cluster.sh: up failed; logs in %s/logs\n' '$dir' >&2; down '$dir' >/dev/null 2>&1 || true; fi" EXIT

  # PID 1 of each node's PID namespace: reaps orphans (daemonized shims),
  # and its end ends everything else in the node.
  mkdir -p "$dir/bin"
  cc -static -Os -o "$dir/bin/pause" "$here/k8s/images/pause.c"

  say "network namespaces $tag-{hub,node-a,node-b}"
  setup_network "$dir"
  local hub; hub=$(netns "$dir" hub)

  say "control plane in $hub"
  # The API server listens on the hub's bridge (nodes, pods through
  # kube-proxy) and loopback (tests, the controllers); nodes authenticate
  # with client certificates and are authorized by the Node authorizer.
  local pki=$dir/control/pki
  K8S_BIND_ADDRESS=0.0.0.0 K8S_ADVERTISE_ADDRESS=$HUB_IP \
    K8S_AUTHORIZATION_MODE=Node,RBAC K8S_DISABLE_ADMISSION_PLUGINS= \
    K8S_APISERVER_ARGS="--enable-admission-plugins=NodeRestriction --endpoint-reconciler-type=lease --kubelet-client-certificate=$pki/admin.crt --kubelet-client-key=$pki/admin.key --kubelet-preferred-address-types=InternalIP" \
    K8S_KCM_CONTROLLERS='*' \
    K8S_KCM_ARGS="--root-ca-file=$pki/ca.crt --service-account-private-key-file=$pki/sa.key --cluster-name=cinderblock-test" \
    CINDERBLOCK_CLUSTER=$dir in_net "$hub" "$here/k8s/testbed.sh" up "$dir/control"
  local kc=$dir/control/admin.kubeconfig port
  port=$(sed -n 's|^ *server: https://127.0.0.1:\([0-9]*\)$|\1|p' "$kc")
  [ -n "$port" ] || die "no API server port in $kc"
  CINDERBLOCK_CLUSTER=$dir in_net "$hub" "$here/k8s/testbed.sh" start "$dir/control" kube-scheduler \
    "$K8S_BIN/kube-scheduler" --kubeconfig="$kc" --authentication-kubeconfig="$kc" \
    --authorization-kubeconfig="$kc" --leader-elect=false --bind-address=127.0.0.1 2>/dev/null

  local base; base=$(my_cgroup)
  local n
  for n in "${NODES[@]}"; do
    say "$n: cgroups, mount namespace, containerd, kubelet, kube-proxy"
    mkdir -p "$dir/logs/$n"
    local cgroot=${base%/}/$tag-$n
    make_cgroup "$dir" "$cgroot"
    write_node_config "$dir" "$n" "$port" "$cgroot"
    start_holder "$dir" "$n"
    start_in_node "$dir" "$n" containerd "$K8S_BIN/containerd" --config "$dir/$n/containerd.toml"
  done
  for n in "${NODES[@]}"; do
    wait_until 60 "containerd of $n" in_node "$dir" "$n" "$K8S_BIN/ctr" --address /run/containerd/containerd.sock version \
      2>>"$dir/logs/$n/ctr.log" ||
      { tail -30 "$dir/logs/$n/containerd.log" >&2; die "$n: containerd did not start"; }
  done
  if [ -n "${CLUSTER_IMAGES:-}" ]; then
    # shellcheck disable=SC2086
    import_images "$dir" $CLUSTER_IMAGES
  fi
  for n in "${NODES[@]}"; do
    start_in_node "$dir" "$n" kubelet "$K8S_BIN/kubelet" --config="$dir/$n/kubelet.yaml" \
      --kubeconfig="$dir/$n/kubelet.kubeconfig" --root-dir=/var/lib/kubelet --cert-dir=/var/lib/kubelet/pki \
      --hostname-override="$n" --node-ip="$(node_ip "$n")" --v=2
    start_in_node "$dir" "$n" kube-proxy "$K8S_BIN/kube-proxy" --config="$dir/$n/kube-proxy.yaml" --v=2
  done
  say "waiting for both nodes to be Ready"
  local k=("$K8S_BIN/kubectl" --kubeconfig="$kc")
  if ! wait_until 120 "nodes" in_net "$hub" "${k[@]}" wait --for=condition=Ready --timeout=5s node/node-a node/node-b; then
    in_net "$hub" "${k[@]}" get nodes -o wide >&2 || true
    for n in "${NODES[@]}"; do printf -- '---- %s kubelet:\n' "$n" >&2; tail -20 "$dir/logs/$n/kubelet.log" >&2; done
    die "nodes not Ready within 120s"
  fi
  cat >"$dir/cluster.env" <<EOF
KUBECONFIG=$kc
CLUSTER_DIR=$dir
CLUSTER_HUB_NETNS=$hub
K8S_BIN=$K8S_BIN
EOF
  trap - EXIT
  say "up in $((SECONDS - started))s: scripts/cluster.sh run $dir kubectl get nodes"
}

import_images() { # dir tar...
  local dir=$1 n t; shift
  for n in "${NODES[@]}"; do
    for t in "$@"; do
      t=$(realpath "$t")
      in_node "$dir" "$n" "$K8S_BIN/ctr" --address /run/containerd/containerd.sock -n k8s.io \
        images import --snapshotter overlayfs "$t" >/dev/null 2>>"$dir/logs/$n/ctr.log" ||
        { tail -5 "$dir/logs/$n/ctr.log" >&2; die "$n: ctr images import $t failed"; }
    done
  done
  say "imported $# images into ${NODES[*]}"
}

# Loop devices of this cluster, the outermost first. The first ring: those
# whose backing file lies under DIR (same device and inode: the pools, or
# volumes in a pool that is a plain folder). Then, until nothing is added,
# those backed by a file in a file system on one of ours (volumes in a
# node's pool) or by the device node of one of ours (the kubelet holds each
# raw block volume's device with a loop device of its own).
our_loops() { # dir
  local dir=$1 name ino maj_min f dev
  local -a rows=() found=() keys=()
  mapfile -t rows < <(losetup --list --noheadings -O NAME,BACK-INO,BACK-MAJ:MIN 2>/dev/null)
  for row in "${rows[@]}"; do
    read -r name ino maj_min <<<"$row"
    [ -n "$ino" ] || continue
    f=$(find "$dir" -xdev -inum "$ino" -print -quit 2>/dev/null)
    [ -n "$f" ] && [ "$(stat -c '%Hd:%Ld' "$f")" = "$maj_min" ] && found+=("$name")
  done
  local added=1
  while [ $added = 1 ]; do
    added=0 keys=()
    for name in "${found[@]}"; do
      keys+=("dev=$(cat "/sys/block/${name#/dev/}/dev" 2>/dev/null)")
      keys+=("node=$(stat -c '%i %Hd:%Ld' "$name" 2>/dev/null)")
    done
    for row in "${rows[@]}"; do
      read -r name ino maj_min <<<"$row"
      [[ " ${found[*]} " == *" $name "* ]] && continue
      dev="dev=$maj_min" f="node=$ino $maj_min"
      if printf '%s\n' "${keys[@]}" | grep -qxF -e "$dev" -e "$f"; then found+=("$name"); added=1; fi
    done
  done
  local i
  for ((i = ${#found[@]} - 1; i >= 0; i--)); do echo "${found[$i]}"; done
}

down() {
  local dir=$1
  [ -d "$dir" ] || return 0
  dir=$(abs "$dir")
  [ -f "$dir/state" ] || { say "down: nothing in $dir"; return 0; }
  local n key pid
  # kube-proxy and kubelet first (no restarts), then containerd (its shims
  # and the containers they run), then the namespace holders.
  for n in "${NODES[@]}"; do
    for key in kube-proxy kubelet; do
      pid=$(state_get "$dir" "PID_${n}_$key"); [ -z "$pid" ] || stop_pid "$dir" "$pid" 10
    done
  done
  for n in "${NODES[@]}"; do
    pid=$(state_get "$dir" "PID_${n}_containerd"); [ -z "$pid" ] || stop_pid "$dir" "$pid" 10
  done
  # The end of a node's PID 1 ends every process left in its PID namespace
  # (shims, containers); what might remain is in the cgroups made here.
  for n in "${NODES[@]}"; do
    pid=$(state_get "$dir" "HOLDER_$n"); [ -z "$pid" ] || stop_pid "$dir" "$pid" 5
  done
  remove_cgroups "$dir"
  local p
  # The control plane (and the scheduler it started).
  [ ! -d "$dir/control" ] || "$here/k8s/testbed.sh" down "$dir/control" >/dev/null 2>&1 || true
  # Anything else of ours still running (a sidecar loop, an exec).
  for p in $(pgrep -x 'pause|kubelet|containerd|kube-proxy|nsenter|unshare' 2>/dev/null || true); do
    stop_pid "$dir" "$p" 2
  done
  # With their last process gone the node mount namespaces are gone, and
  # with them every mount made inside. Loop devices outlive them.
  local l
  for l in $(our_loops "$dir"); do losetup -d "$l" 2>/dev/null && say "detached $l" || true; done
  for n in $(state_get_all "$dir" NETNS); do ip netns del "$n" 2>/dev/null || true; done
  rm -f "$dir/state" "$dir"/*/ns-ready
  say "down: $dir (logs kept in $dir/logs)"
}
state_get_all() { sed -n "s/^$2=//p" "$1/state" 2>/dev/null; }

run() {
  local dir; dir=$(abs "$1"); shift
  [ -f "$dir/cluster.env" ] || die "no cluster up in $dir"
  local hub; hub=$(state_get "$dir" TAG)-hub
  KUBECONFIG=$dir/control/admin.kubeconfig PATH="$K8S_BIN:$PATH" CLUSTER_DIR=$dir \
    nsenter --net="/run/netns/$hub" -- "$@"
}

status() {
  local dir; dir=$(abs "$1")
  [ -f "$dir/state" ] || { echo "no cluster in $dir"; return 0; }
  "$here/k8s/testbed.sh" status "$dir/control" || true
  local n key pid
  for n in "${NODES[@]}"; do
    for key in containerd kubelet kube-proxy; do
      pid=$(state_get "$dir" "PID_${n}_$key")
      if ours "$pid" "$dir"; then echo "$n $key running (pid $pid)"; else echo "$n $key stopped"; fi
    done
  done
  [ ! -f "$dir/cluster.env" ] || run "$dir" kubectl get nodes,pods -A -o wide || true
}

# Sourced (by a test that wants its functions): define, don't run.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case ${1:-} in
  up) [ $# -eq 2 ] || die "usage: cluster.sh up DIR"; up "$2" ;;
  down) [ $# -eq 2 ] || die "usage: cluster.sh down DIR"; down "$2" ;;
  status) [ $# -eq 2 ] || die "usage: cluster.sh status DIR"; status "$2" ;;
  run) [ $# -ge 3 ] || die "usage: cluster.sh run DIR CMD..."; d=$2; shift 2; run "$d" "$@" ;;
  node) [ $# -ge 4 ] || die "usage: cluster.sh node DIR NODE CMD..."
    d=$(abs "$2"); n=$3; shift 3; in_node "$d" "$n" "$@" ;;
  import) [ $# -ge 3 ] || die "usage: cluster.sh import DIR TAR..."; d=$(abs "$2"); shift 2; import_images "$d" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
