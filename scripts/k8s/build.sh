#!/usr/bin/env bash
# Builds the real Kubernetes parts of the end-to-end test bed from the Go
# module proxy, at the versions pinned in versions.sh, into .tools/k8s/bin/
# (or $K8S_TOOLS_DIR/bin), and copies the VolumeSnapshot CRDs into
# .tools/k8s/crds/.
#
# Usage: scripts/k8s/build.sh [NAME...]
#   NAME: etcd kube-apiserver kube-controller-manager kubectl csi-provisioner
#         csi-snapshotter snapshot-controller csi-resizer crds helm
#         kube-scheduler kubelet kube-proxy e2e.test containerd
#         containerd-shim-runc-v2 ctr csi-attacher csi-node-driver-registrar
#         livenessprobe agnhost ginkgo hello-populator
#         volume-data-source-validator, or
#         testbed (what the kubelet-less end-to-end test needs), or
#         cluster (testbed, helm and what scripts/cluster.sh adds: the
#         scheduler, kubelet, kube-proxy, containerd, the node sidecars;
#         not e2e.test), or
#         e2e (e2e.test, agnhost: its test image, ginkgo: its runner,
#         hello-populator and volume-data-source-validator: the images of
#         its "any volume data source" test), or
#         all (the default: cluster and e2e).
#
# A binary is skipped when its stamp (.tools/k8s/stamps/NAME) matches. The
# stamp holds the modules and versions of its group, the Go version, the
# tags and the ldflags, so bumping a version in versions.sh rebuilds what
# that version feeds. Builds run one at a time with `go build -p 2` (set
# K8S_BUILD_P to change it), and each prints its wall time.
#
# Every group of binaries builds from a small wrapper module under
# .tools/k8s/src/GROUP/. The wrapper requires the upstream modules and
# repeats their replace directives, because `go install mod@version` ignores
# them (replace only applies in the main module):
#   - a directive that points at a version is copied as is;
#   - one that points at a folder of the same repository (kubernetes'
#     staging/, etcd's ../api, the snapshotter's ./client) is pointed at that
#     module at the version released with it ("lockstep" below);
#   - one that points at FORBIDDEN_DEPENDENCY (etcd's guard) is dropped.
# The sidecars share one wrapper: one dependency graph, so the Go build
# cache compiles client-go and everything else they have in common once.
# Their k8s.io staging modules are all set to SIDECARS_K8S_STAGING (see
# versions.sh). The same wrapper builds our csi-node-driver-registrar and
# livenessprobe (scripts/k8s/node-sidecars/: the proxy serves neither
# upstream module); the kubernetes wrapper builds e2e.test from
# scripts/k8s/e2e/ (`go test -c`). Such local folders are copied into the
# wrapper, and their content is part of the stamp. The populators group
# builds our hello-populator and volume-data-source-validator
# (scripts/k8s/populators/: the proxy serves neither upstream module) on
# client-go at SIDECARS_K8S_STAGING.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

export CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-local}
export GOFLAGS="-mod=mod -buildvcs=false"
export GOMODCACHE=${GOMODCACHE:-$(go env GOMODCACHE)}
export GOCACHE=${GOCACHE:-$(go env GOCACHE)}
build_p=${K8S_BUILD_P:-2}
go_version=$(go env GOVERSION)
stamps=$K8S_TOOLS_DIR/stamps
srcs=$K8S_TOOLS_DIR/src
mkdir -p "$K8S_BIN" "$K8S_CRDS" "$stamps" "$srcs"

log() { printf '%s\n' "$*" >&2; }

# A field of `go mod download -json MODULE@VERSION` (GoMod: its go.mod; Dir:
# its files). Downloads the module.
module_field() { # module@version field
  go mod download -json "$1" | sed -n "s/^[[:space:]]*\"$2\": \"\(.*\)\",\{0,1\}\$/\1/p"
}

# Prints, one a line, `go mod edit` -replace arguments that repeat the
# replace directives of the go.mod at $1, folder targets pointed at LOCKSTEP.
replace_args() { # gomod lockstep
  awk -v lockstep="$2" '
    { sub(/\/\/.*/, "") }
    /^replace[[:space:]]*\(/ { block = 1; next }
    block && /^[[:space:]]*\)/ { block = 0; next }
    /^replace[[:space:]]/ { sub(/^replace[[:space:]]+/, ""); line = $0 }
    block && /=>/ { line = $0 }
    line != "" {
      n = split(line, f, /[[:space:]]+/); k = 0
      for (i = 1; i <= n; i++) if (f[i] != "") w[++k] = f[i]
      line = ""
      if (w[2] == "=>") { old = w[1]; nw = w[3]; nv = w[4] }
      else { old = w[1] "@" w[2]; nw = w[4]; nv = w[5] }
      if (nw ~ /FORBIDDEN/) next
      if (nw ~ /^\.\.?\//) {
        if (lockstep == "") { print "replace to a folder without a lockstep version: " old > "/dev/stderr"; exit 1 }
        sub(/@.*/, "", old); print "-replace=" old "=" old "@" lockstep
      } else if (nv != "") print "-replace=" old "=" nw "@" nv
      else print "-replace=" old "=" nw
      delete w
    }' "$1"
}

# The k8s.io staging modules: those that kubernetes replaces with staging/ folders.
staging_modules=()
load_staging_modules() {
  [ ${#staging_modules[@]} -eq 0 ] || return 0
  local gomod
  gomod=$(cd "$srcs" && module_field "k8s.io/kubernetes@$K8S_VERSION" GoMod)
  mapfile -t staging_modules < <(replace_args "$gomod" "$K8S_STAGING_VERSION" |
    sed -n 's/^-replace=\(k8s\.io\/[^=]*\)=.*/\1/p')
  [ ${#staging_modules[@]} -gt 0 ] || { log "no staging modules found in $gomod"; exit 1; }
}

provisioner=github.com/kubernetes-csi/external-provisioner/v6
snapshotter=github.com/kubernetes-csi/external-snapshotter/v8
resizer=github.com/kubernetes-csi/external-resizer/v2
attacher=github.com/kubernetes-csi/external-attacher/v4
containerd=github.com/containerd/containerd/v2

# A group: its modules (MODULE@VERSION:LOCKSTEP), the packages it builds
# (PACKAGE@VERSION), the version its k8s.io staging modules are set to
# (empty: as its go.mod says), and folders of this repository copied into
# the wrapper (FOLDER:NAME, built as ./NAME).
group() { # name -> g_mods g_pkgs g_align g_local
  g_align= g_local=()
  case $1 in
    etcd)
      g_mods=("go.etcd.io/etcd/server/v3@$ETCD_VERSION:$ETCD_VERSION")
      g_pkgs=("go.etcd.io/etcd/server/v3@$ETCD_VERSION") ;;
    kubernetes)
      g_mods=("k8s.io/kubernetes@$K8S_VERSION:$K8S_STAGING_VERSION")
      g_pkgs=()
      local c
      for c in kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy; do
        g_pkgs+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION")
      done
      g_pkgs+=("k8s.io/kubernetes/test/e2e@$K8S_VERSION" "k8s.io/kubernetes/test/e2e/storage/external@$K8S_VERSION"
        "k8s.io/kubernetes/test/images/agnhost@$K8S_VERSION")
      g_local=("$here/e2e:e2e") ;;
    sidecars)
      g_mods=("$provisioner@$PROVISIONER_VERSION:" "$snapshotter@$SNAPSHOTTER_VERSION:$SNAPSHOTTER_VERSION"
        "$resizer@$RESIZER_VERSION:" "$attacher@$ATTACHER_VERSION:" "k8s.io/kubelet@$SIDECARS_K8S_STAGING:")
      g_pkgs=("$provisioner/cmd/csi-provisioner@$PROVISIONER_VERSION"
        "$snapshotter/cmd/csi-snapshotter@$SNAPSHOTTER_VERSION"
        "$snapshotter/cmd/snapshot-controller@$SNAPSHOTTER_VERSION"
        "$resizer/cmd/csi-resizer@$RESIZER_VERSION"
        "$attacher/cmd/csi-attacher@$ATTACHER_VERSION"
        "k8s.io/kubelet/pkg/apis/pluginregistration/v1@$SIDECARS_K8S_STAGING")
      g_local=("$here/node-sidecars/csi-node-driver-registrar:csi-node-driver-registrar"
        "$here/node-sidecars/livenessprobe:livenessprobe")
      g_align=$SIDECARS_K8S_STAGING ;;
    containerd)
      g_mods=("$containerd@$CONTAINERD_VERSION:")
      g_pkgs=()
      local c
      for c in containerd containerd-shim-runc-v2 ctr; do g_pkgs+=("$containerd/cmd/$c@$CONTAINERD_VERSION"); done ;;
    populators)
      g_mods=("k8s.io/client-go@$SIDECARS_K8S_STAGING:" "k8s.io/api@$SIDECARS_K8S_STAGING:"
        "k8s.io/apimachinery@$SIDECARS_K8S_STAGING:")
      g_pkgs=("k8s.io/client-go/kubernetes@$SIDECARS_K8S_STAGING" "k8s.io/client-go/dynamic@$SIDECARS_K8S_STAGING"
        "k8s.io/client-go/tools/clientcmd@$SIDECARS_K8S_STAGING")
      g_local=("$here/populators/hello-populator:hello-populator"
        "$here/populators/volume-data-source-validator:volume-data-source-validator") ;;
    helm)
      g_mods=("helm.sh/helm/v4@$HELM_VERSION:")
      g_pkgs=("helm.sh/helm/v4/cmd/helm@$HELM_VERSION") ;;
    *) log "unknown group $1"; exit 2 ;;
  esac
}

# Creates (once per run) the wrapper module of GROUP in $srcs/GROUP and
# resolves the packages of the whole group at once, so that every binary of
# the group builds from the same dependency graph.
declare -A wrapper_ready=()
wrapper() { # group
  local name=$1 dir=$srcs/$1
  [ -z "${wrapper_ready[$name]:-}" ] || return 0
  group "$name"
  [ -z "$g_align" ] || load_staging_modules
  rm -rf "$dir"; mkdir -p "$dir"
  (
    cd "$dir"
    go mod init cinderblock.test/k8s-tools >/dev/null 2>&1
    local spec mv lockstep gomod old line args=() requires=()
    declare -A seen=()
    for spec in "${g_mods[@]}"; do
      mv=${spec%:*} lockstep=${spec##*:}
      requires+=("-require=$mv")
      gomod=$(module_field "$mv" GoMod)
      [ -n "$gomod" ] || { log "cannot download $mv"; exit 1; }
      while IFS= read -r line; do
        old=${line#-replace=}; old=${old%%=*}
        if [ -n "${seen[$old]:-}" ] && [ "${seen[$old]}" != "$line" ] &&
          ! { [ -n "$g_align" ] && [[ " ${staging_modules[*]} " == *" ${old%@*} "* ]]; }; then
          log "group $name: ${seen[$old]} and $line disagree"; exit 1
        fi
        seen[$old]=$line
      done < <(replace_args "$gomod" "$lockstep")
    done
    for line in "${seen[@]}"; do args+=("$line"); done
    local m
    if [ -n "$g_align" ]; then
      for m in "${staging_modules[@]}"; do args+=("-replace=$m=$m@$g_align"); done
    fi
    go mod edit "${requires[@]}" ${args[@]+"${args[@]}"}
    local l
    for l in ${g_local[@]+"${g_local[@]}"}; do cp -r "${l%%:*}" "./${l##*:}"; done
    if ! go get "${g_pkgs[@]}" >get.log 2>&1; then
      tail -20 get.log >&2; log "go get ${g_pkgs[*]} failed"; exit 1
    fi
    log "   wrapper $dir: ${g_mods[*]%:*}${g_align:+; k8s.io staging modules at $g_align}"
  )
  wrapper_ready[$name]=1
}

# A digest of the files of the group's local folders.
local_digest() {
  [ ${#g_local[@]} -gt 0 ] || return 0
  local l
  for l in "${g_local[@]}"; do (cd "${l%%:*}" && find . -type f -print0 | sort -z | xargs -0 sha256sum); done |
    sha256sum | cut -c1-16
}

built=() total_start=$(date +%s)
# PACKAGE is PATH@VERSION, or ./NAME for a local folder of the group. With
# MODE test the binary is a test binary (`go test -c`).
build() { # name group package tags ldflags [mode]
  local name=$1 grp=$2 pkg=$3 tags=$4 ldflags=$5 mode=${6:-}
  group "$grp"
  local stamp="$pkg group=$grp ${g_mods[*]} align=$g_align $go_version tags=$tags ldflags=$ldflags"
  [[ $pkg != ./* ]] || stamp+=" local=$(local_digest)"
  if [ -x "$K8S_BIN/$name" ] && [ "$(cat "$stamps/$name" 2>/dev/null)" = "$stamp" ]; then
    log "== $name (${pkg##*@}): already built"
    return
  fi
  log "== $name: $pkg"
  local start fetched end
  start=$(date +%s)
  wrapper "$grp"
  fetched=$(date +%s)
  local gocmd=(build)
  [ "$mode" != test ] || gocmd=(test -c)
  (cd "$srcs/$grp" && go "${gocmd[@]}" -p "$build_p" -trimpath ${tags:+-tags "$tags"} -ldflags "$ldflags" \
    -o "$K8S_BIN/$name.new" "${pkg%@*}")
  mv -f "$K8S_BIN/$name.new" "$K8S_BIN/$name"
  printf '%s\n' "$stamp" >"$stamps/$name"
  end=$(date +%s)
  log "   built $name in $((end - start))s (fetch $((fetched - start))s, compile and link $((end - fetched))s)"
  built+=("$name:$((end - start))s")
}

crds() {
  local stamp="github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION"
  if [ "$(cat "$stamps/crds" 2>/dev/null)" = "$stamp" ] &&
    [ -f "$K8S_CRDS/snapshot.storage.k8s.io_volumesnapshots.yaml" ]; then
    log "== crds ($SNAPSHOTTER_VERSION): already copied"
    return
  fi
  local dir kind
  dir=$(cd "$srcs" && module_field "$stamp" Dir)
  [ -n "$dir" ] || { log "cannot download $stamp"; exit 1; }
  rm -f "$K8S_CRDS"/*.yaml
  for kind in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
    install -m 0644 "$dir/config/crd/snapshot.storage.k8s.io_$kind.yaml" "$K8S_CRDS/"
  done
  printf '%s\n' "$stamp" >"$stamps/crds"
  log "== crds: copied the VolumeSnapshot CRDs of $stamp into $K8S_CRDS"
}

k8s_ldflags() {
  local major=${K8S_VERSION#v} minor=${K8S_VERSION#v*.} flags="-s -w" pkg
  major=${major%%.*} minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean"
  done
  printf '%s' "$flags"
}

one() {
  case $1 in
    etcd) build etcd etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "" "-s -w" ;;
    kube-apiserver | kube-controller-manager | kubectl | kube-scheduler | kubelet | kube-proxy)
      build "$1" kubernetes "k8s.io/kubernetes/cmd/$1@$K8S_VERSION" selinux,notest,grpcnotrace "$(k8s_ldflags)" ;;
    e2e.test) build "$1" kubernetes ./e2e selinux "$(k8s_ldflags)" test ;;
    agnhost) build "$1" kubernetes "k8s.io/kubernetes/test/images/agnhost@$K8S_VERSION" "" "-s -w" ;;
    # The ginkgo runner (parallel e2e.test processes), at the version the
    # kubernetes module requires.
    ginkgo) build "$1" kubernetes "github.com/onsi/ginkgo/v2/ginkgo@$K8S_VERSION" "" "-s -w" ;;
    csi-attacher)
      build "$1" sidecars "$attacher/cmd/$1@$ATTACHER_VERSION" "" "-s -w -X main.version=$ATTACHER_VERSION" ;;
    csi-node-driver-registrar | livenessprobe)
      build "$1" sidecars "./$1" "" "-s -w -X main.version=$NODE_SIDECARS_VERSION" ;;
    containerd | containerd-shim-runc-v2 | ctr)
      build "$1" containerd "$containerd/cmd/$1@$CONTAINERD_VERSION" no_btrfs,no_devmapper,no_zfs \
        "-s -w -X $containerd/version.Version=$CONTAINERD_VERSION -X $containerd/version.Revision=module-proxy" ;;
    csi-provisioner)
      build "$1" sidecars "$provisioner/cmd/$1@$PROVISIONER_VERSION" "" "-s -w -X main.version=$PROVISIONER_VERSION" ;;
    csi-snapshotter | snapshot-controller)
      build "$1" sidecars "$snapshotter/cmd/$1@$SNAPSHOTTER_VERSION" "" "-s -w -X main.version=$SNAPSHOTTER_VERSION" ;;
    csi-resizer)
      build "$1" sidecars "$resizer/cmd/$1@$RESIZER_VERSION" "" "-s -w -X main.version=$RESIZER_VERSION" ;;
    hello-populator)
      build "$1" populators "./$1" "" "-s -w -X main.version=$HELLO_POPULATOR_VERSION" ;;
    volume-data-source-validator)
      build "$1" populators "./$1" "" "-s -w -X main.version=$DATA_SOURCE_VALIDATOR_VERSION" ;;
    helm) build helm helm "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" "" \
      "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean" ;;
    crds) crds ;;
    *) log "unknown part: $1"; exit 2 ;;
  esac
}

command -v go >/dev/null || { log "build.sh: needs Go (go1.26 or newer)"; exit 1; }
testbed=(etcd kube-apiserver kube-controller-manager kubectl csi-provisioner csi-snapshotter
  snapshot-controller csi-resizer crds)
cluster=("${testbed[@]}" helm kube-scheduler kubelet kube-proxy containerd containerd-shim-runc-v2 ctr
  csi-attacher csi-node-driver-registrar livenessprobe)
e2e=(e2e.test agnhost ginkgo hello-populator volume-data-source-validator)
parts=()
for arg in "${@:-all}"; do
  case $arg in
    all) parts+=("${cluster[@]}" "${e2e[@]}") ;;
    e2e) parts+=("${e2e[@]}") ;;
    cluster) parts+=("${cluster[@]}") ;;
    testbed) parts+=("${testbed[@]}") ;;
    *) parts+=("$arg") ;;
  esac
done
for part in "${parts[@]}"; do one "$part"; done
log "== k8s parts ready in $K8S_BIN ($go_version); built this run: ${built[*]:-none}; total $(($(date +%s) - total_start))s"
