#!/usr/bin/env bash
# A Kubernetes control plane without a kubelet, for the end-to-end test:
# etcd and kube-apiserver on loopback at free ports, and
# kube-controller-manager running only the PV binder and the PV/PVC
# protection controllers. Binaries come from scripts/k8s/build.sh.
#
# Usage:
#   scripts/k8s/testbed.sh up DIR        start etcd, kube-apiserver, kube-controller-manager
#   scripts/k8s/testbed.sh sidecars DIR SOCKET
#                                        apply the VolumeSnapshot CRDs, start snapshot-controller,
#                                        and csi-provisioner, csi-snapshotter, csi-resizer for the
#                                        CSI endpoint at SOCKET (a unix socket path; they wait for it)
#   scripts/k8s/testbed.sh start DIR NAME CMD [ARG...]
#                                        run CMD in the background as part of the bed
#                                        (log DIR/NAME.log, pid DIR/NAME.pid; stopped by down)
#   scripts/k8s/testbed.sh stop DIR NAME stop one process of the bed
#   scripts/k8s/testbed.sh status DIR    list the processes of the bed
#   scripts/k8s/testbed.sh down DIR      stop everything the bed started (safe to repeat)
#
# After `up`, DIR holds admin.kubeconfig (user admin, group system:masters),
# testbed.env (KUBECONFIG, K8S_API_URL, ETCD_URL, K8S_BIN; shell syntax),
# pki/, etcd/, NAME.pid and NAME.log. A part that doesn't become ready makes
# `up` stop what it started, print the end of its log and exit non-zero.
#
# For a bed whose API server other network namespaces reach (scripts/cluster.sh
# runs `up` inside a namespace of its own): K8S_BIND_ADDRESS (default
# 127.0.0.1), K8S_ADVERTISE_ADDRESS (default the bind address; also added to
# the serving certificate), K8S_APISERVER_ARGS and K8S_KCM_ARGS (appended;
# a repeated flag overrides the default, but a list flag appends),
# K8S_AUTHORIZATION_MODE (default RBAC), K8S_DISABLE_ADMISSION_PLUGINS
# (default ServiceAccount; empty for none), K8S_KCM_CONTROLLERS (default the
# PV binder and the two protection controllers; "*" for all).
#
# Extra flags for the sidecars: PROVISIONER_ARGS, SNAPSHOTTER_ARGS,
# RESIZER_ARGS, SNAPSHOT_CONTROLLER_ARGS (split on spaces). Each sidecar
# runs under a loop that restarts it a second after it exits, as kubelet
# would (they exit when the CSI socket doesn't answer within 30 s, and
# csi-provisioner exits when the connection drops); K8S_SIDECAR_RESTART=0
# runs them bare. NAME.pid is then the loop's pid; stopping it stops both.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

die() { printf 'testbed.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*" >&2; }

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# Is PID alive and one of this bed's? Every process the bed starts carries
# CINDERBLOCK_TESTBED=DIR in its environment, so a pid reused by an
# unrelated process is never signalled.
ours() { # pid dir
  local pid=$1 dir=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  # grep reads the file itself (-z: NUL-separated entries): a `tr | grep -q`
  # pipeline fails under pipefail when grep quits before tr's last write
  # (an environment larger than one read), which took a live process for dead.
  grep -qzxF -- "CINDERBLOCK_TESTBED=$dir" "/proc/$pid/environ" 2>/dev/null
}

running() { # dir name
  local pid
  pid=$(cat "$1/$2.pid" 2>/dev/null) || return 1
  ours "$pid" "$1"
}

stop_one() { # dir name
  local dir=$1 name=$2 pid
  pid=$(cat "$dir/$name.pid" 2>/dev/null) || return 0
  if ours "$pid" "$dir"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do ours "$pid" "$dir" || break; sleep 0.1; done
    if ours "$pid" "$dir"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  fi
  rm -f "$dir/$name.pid"
}

# Starts CMD in the background (no stdin; output appended to DIR/NAME.log).
start_one() { # dir name cmd...
  local dir=$1 name=$2; shift 2
  running "$dir" "$name" && die "$name is already running in $dir (pid $(cat "$dir/$name.pid"))"
  CINDERBLOCK_TESTBED=$dir "$@" </dev/null >>"$dir/$name.log" 2>&1 &
  local pid=$!
  echo $pid >"$dir/$name.pid"
  # Until the child has exec'd, its environment is still the shell's (no
  # CINDERBLOCK_TESTBED): wait for that, so that `running` doesn't take a
  # slow start on a loaded machine for an exit.
  local i
  for i in $(seq 100); do
    ours "$pid" "$dir" || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.05
  done
}

# Runs CMD again a second after each exit, as kubelet would restart a
# sidecar container: csi-lib-utils gives up on a CSI socket that doesn't
# answer within 30 s, and csi-provisioner exits when its connection drops.
# TERM stops CMD and the loop.
supervise() { # name cmd...
  local name=$1 child='' rc
  shift
  trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null; wait; exit 0' TERM INT
  while :; do
    "$@" &
    child=$!
    rc=0; wait "$child" || rc=$?
    child=
    printf 'testbed.sh: %s exited with %s; restarting it in 1s\n' "$name" "$rc" >&2
    sleep 1 &
    wait $! || true
  done
}

fail() { # dir name message
  local dir=$1 name=$2 msg=$3
  printf 'testbed.sh: %s\n---- last lines of %s/%s.log:\n' "$msg" "$dir" "$name" >&2
  tail -n 40 "$dir/$name.log" >&2 2>/dev/null || true
  printf -- '----\n' >&2
  down "$dir" >/dev/null 2>&1 || true
  exit 1
}

# Waits up to SECONDS for CHECK to succeed while NAME keeps running.
wait_for() { # dir name seconds what check...
  local dir=$1 name=$2 secs=$3 what=$4; shift 4
  local deadline=$((SECONDS + secs))
  while ! "$@" >/dev/null 2>&1; do
    running "$dir" "$name" || fail "$dir" "$name" "$name exited before $what"
    [ $SECONDS -lt $deadline ] || fail "$dir" "$name" "$name: no $what within ${secs}s"
    sleep 0.2
  done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
declare -A taken_ports=()
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    [ -z "${taken_ports[$p]:-}" ] && ! port_in_use "$p" && { taken_ports[$p]=1; echo "$p"; return; }
  done
  die "no free port found"
}

need_bin() { for b; do [ -x "$K8S_BIN/$b" ] || die "$K8S_BIN/$b is missing: run scripts/k8s/build.sh"; done; }

# A CA, the API server's serving certificate (localhost, 127.0.0.1), the
# service-account key pair and the admin's client certificate. ECDSA P-256,
# valid for 7 days.
make_pki() { # pki
  local pki=$1 days=7
  command -v openssl >/dev/null || die "needs openssl"
  mkdir -p "$pki"
  key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; }
  key "$pki/ca.key"
  openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=cinderblock-testbed-ca" -days $days \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$pki/ca.crt" 2>/dev/null
  issue() { # name subject extensions
    key "$pki/$1.key"
    openssl req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
    printf '%s\n' "$3" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" >"$pki/$1.ext"
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -set_serial "0x$(openssl rand -hex 8)" -days $days -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
    rm -f "$pki/$1.csr" "$pki/$1.ext"
  }
  local extra_san=
  [ -z "${K8S_ADVERTISE_ADDRESS:-}" ] || extra_san=",IP:$K8S_ADVERTISE_ADDRESS"
  issue apiserver "/CN=kube-apiserver" \
    "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1$extra_san
extendedKeyUsage=serverAuth"
  issue admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  chmod 600 "$pki"/*.key
}

write_kubeconfig() { # file server pki
  local b64='base64 -w0'
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: $2
    certificate-authority-data: $($b64 <"$3/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $($b64 <"$3/admin.crt")
    client-key-data: $($b64 <"$3/admin.key")
contexts:
- name: testbed
  context: {cluster: testbed, user: admin}
current-context: testbed
EOF
  chmod 600 "$1"
}

# kube-controller-manager serves nothing here (--secure-port=0): its log
# says when the three controllers have started and their informers synced.
kcm_started() { # log
  grep -q 'Starting persistent volume controller' "$1" &&
    grep -q 'Starting PVC protection controller' "$1" &&
    grep -q 'Starting PV protection controller' "$1" &&
    [ "$(grep -c 'Caches are synced' "$1")" -ge 3 ]
}

# A port picked as free may be taken before etcd or the API server binds it:
# then `up` tries again with new ports, up to three times.
up() {
  local dir try
  dir=$(abs_dir "$1")
  for try in 1 2 3; do
    if (up_once "$dir"); then return 0; fi
    grep -qs 'address already in use' "$dir/etcd.log" "$dir/kube-apiserver.log" || exit 1
    [ $try -lt 3 ] || exit 1
    say "a port was taken meanwhile: again with new ports"
  done
}

up_once() {
  local dir=$1
  need_bin etcd kube-apiserver kube-controller-manager
  for n in etcd kube-apiserver kube-controller-manager; do
    running "$dir" "$n" && die "$n is already running in $dir: run 'testbed.sh down $dir' first"
  done
  rm -rf "$dir/etcd" "$dir/pki" "$dir"/*.log "$dir"/*.pid
  local started=$SECONDS
  local etcd_port peer_port api_port
  etcd_port=$(free_port); taken_ports[$etcd_port]=1
  peer_port=$(free_port); taken_ports[$peer_port]=1
  api_port=$(free_port)
  local etcd_url=http://127.0.0.1:$etcd_port api_url=https://127.0.0.1:$api_port pki=$dir/pki
  local bind=${K8S_BIND_ADDRESS:-127.0.0.1}
  local advertise=${K8S_ADVERTISE_ADDRESS:-$bind}
  local controllers=${K8S_KCM_CONTROLLERS:-persistentvolume-binder-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller}

  say "etcd on $etcd_url"
  local etcd_args=(--name=testbed --data-dir="$dir/etcd"
    --listen-client-urls="$etcd_url" --advertise-client-urls="$etcd_url"
    --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port"
    --initial-cluster="testbed=http://127.0.0.1:$peer_port" --log-level=warn)
  grep -q -- --unsafe-no-fsync <<<"$("$K8S_BIN/etcd" --help 2>&1)" && etcd_args+=(--unsafe-no-fsync=true)
  start_one "$dir" etcd "$K8S_BIN/etcd" "${etcd_args[@]}"

  make_pki "$pki"
  write_kubeconfig "$dir/admin.kubeconfig" "$api_url" "$pki"
  wait_for "$dir" etcd 30 "health on $etcd_url" sh -c "curl -sf '$etcd_url/health' | grep -q '\"health\":\"true\"'"

  say "kube-apiserver on $api_url"
  # shellcheck disable=SC2086
  start_one "$dir" kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers="$etcd_url" \
    --bind-address="$bind" --advertise-address="$advertise" --secure-port="$api_port" \
    --cert-dir="$pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --service-account-issuer="$api_url" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --authorization-mode="${K8S_AUTHORIZATION_MODE:-RBAC}" --allow-privileged=true \
    --disable-admission-plugins="${K8S_DISABLE_ADMISSION_PLUGINS-ServiceAccount}" \
    --endpoint-reconciler-type=none ${K8S_APISERVER_ARGS:-}
  wait_for "$dir" kube-apiserver 120 "/readyz" curl -sf --cacert "$pki/ca.crt" \
    --cert "$pki/admin.crt" --key "$pki/admin.key" "$api_url/readyz"

  say "kube-controller-manager (controllers: $controllers)"
  # shellcheck disable=SC2086
  start_one "$dir" kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig="$dir/admin.kubeconfig" --leader-elect=false \
    --use-service-account-credentials=false \
    --controllers="$controllers" \
    --secure-port=0 --pvclaimbinder-sync-period=1s --flex-volume-plugin-dir="$dir/flexvolume" ${K8S_KCM_ARGS:-}
  wait_for "$dir" kube-controller-manager 60 "start of its three controllers" kcm_started "$dir/kube-controller-manager.log"

  cat >"$dir/testbed.env" <<EOF
KUBECONFIG=$dir/admin.kubeconfig
K8S_API_URL=$api_url
ETCD_URL=$etcd_url
K8S_BIN=$K8S_BIN
K8S_CRDS=$K8S_CRDS
EOF
  say "up in $((SECONDS - started))s: export KUBECONFIG=$dir/admin.kubeconfig"
}

sidecars() {
  local dir; dir=$(abs_dir "$1")
  local sock=$2 kc=$dir/admin.kubeconfig
  if [ ! -f "$kc" ] || ! running "$dir" kube-apiserver; then
    die "no API server running in $dir: run 'testbed.sh up $dir' first"
  fi
  need_bin kubectl snapshot-controller csi-provisioner csi-snapshotter csi-resizer
  case $sock in /*) ;; *) sock=$PWD/$sock ;; esac
  local crds=("$K8S_CRDS"/snapshot.storage.k8s.io_*.yaml)
  [ -f "${crds[0]}" ] || die "no VolumeSnapshot CRDs in $K8S_CRDS: run scripts/k8s/build.sh crds"
  local kubectl=("$K8S_BIN/kubectl" --kubeconfig="$kc")
  say "VolumeSnapshot CRDs"
  local files=() f
  for f in "${crds[@]}"; do files+=(-f "$f"); done
  "${kubectl[@]}" apply --server-side "${files[@]}" >&2
  "${kubectl[@]}" wait --for=condition=Established --timeout=60s \
    crd/volumesnapshotclasses.snapshot.storage.k8s.io crd/volumesnapshotcontents.snapshot.storage.k8s.io \
    crd/volumesnapshots.snapshot.storage.k8s.io >&2
  # The group-snapshot CRDs aren't installed: switch that (GA, default-on)
  # feature off rather than have both snapshot parts probe for it.
  local nogroup=--feature-gates=CSIVolumeGroupSnapshot=false
  local sup=("$here/testbed.sh" _supervise)
  [ "${K8S_SIDECAR_RESTART:-1}" = 1 ] || sup=()
  say "snapshot-controller"
  # shellcheck disable=SC2086
  start_one "$dir" snapshot-controller ${sup[@]+"${sup[@]}" snapshot-controller} env KUBECONFIG="$kc" "$K8S_BIN/snapshot-controller" --kubeconfig="$kc" "$nogroup" \
    --retry-interval-max=5s ${SNAPSHOT_CONTROLLER_ARGS:-}
  say "csi-provisioner, csi-snapshotter, csi-resizer for unix://$sock"
  # KUBECONFIG is set as well as --kubeconfig: csi-provisioner lets the
  # environment variable override the flag.
  # shellcheck disable=SC2086
  start_one "$dir" csi-provisioner ${sup[@]+"${sup[@]}" csi-provisioner} env KUBECONFIG="$kc" "$K8S_BIN/csi-provisioner" --kubeconfig="$kc" --csi-address="$sock" \
    --extra-create-metadata --retry-interval-max=5s ${PROVISIONER_ARGS:-}
  # shellcheck disable=SC2086
  start_one "$dir" csi-snapshotter ${sup[@]+"${sup[@]}" csi-snapshotter} env KUBECONFIG="$kc" "$K8S_BIN/csi-snapshotter" --kubeconfig="$kc" --csi-address="$sock" \
    "$nogroup" --extra-create-metadata --retry-interval-max=5s ${SNAPSHOTTER_ARGS:-}
  # shellcheck disable=SC2086
  start_one "$dir" csi-resizer ${sup[@]+"${sup[@]}" csi-resizer} env KUBECONFIG="$kc" "$K8S_BIN/csi-resizer" --kubeconfig="$kc" --csi-address="$sock" \
    --retry-interval-max=5s ${RESIZER_ARGS:-}
  sleep 1
  local n
  for n in snapshot-controller csi-provisioner csi-snapshotter csi-resizer; do
    running "$dir" "$n" || fail "$dir" "$n" "$n exited at start"
  done
}

status() {
  local dir f n; dir=$(abs_dir "$1")
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .pid)
    if running "$dir" "$n"; then echo "$n running (pid $(cat "$f"))"; else echo "$n stopped"; fi
  done
}

down() {
  local dir=$1
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  local f n
  # The clients first, the API server next, etcd last.
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .pid)
    case $n in etcd | kube-apiserver) ;; *) stop_one "$dir" "$n" ;; esac
  done
  stop_one "$dir" kube-apiserver
  stop_one "$dir" etcd
  say "down: $dir"
}

case ${1:-} in
  up) [ $# -eq 2 ] || die "usage: testbed.sh up DIR"; up "$2" ;;
  down) [ $# -eq 2 ] || die "usage: testbed.sh down DIR"; down "$2" ;;
  status) [ $# -eq 2 ] || die "usage: testbed.sh status DIR"; status "$2" ;;
  sidecars) [ $# -eq 3 ] || die "usage: testbed.sh sidecars DIR SOCKET"; sidecars "$2" "$3" ;;
  start) [ $# -ge 4 ] || die "usage: testbed.sh start DIR NAME CMD [ARG...]"
    d=$(abs_dir "$2"); n=$3; shift 3
    start_one "$d" "$n" "$@"; echo "$n: pid $(cat "$d/$n.pid")" >&2 ;;
  _supervise) shift; supervise "$@" ;;
  stop) [ $# -eq 3 ] || die "usage: testbed.sh stop DIR NAME"; stop_one "$(abs_dir "$2")" "$3" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
