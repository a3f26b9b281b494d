#!/usr/bin/env bash
# Builds the real Kubernetes parts of the end-to-end test bed from the Go
# module proxy, at the versions pinned in versions.sh, into .tools/k8s/bin/
# (or $K8S_TOOLS_DIR/bin), and copies the VolumeSnapshot CRDs into
# .tools/k8s/crds/.
#
# Usage: scripts/k8s/build.sh [NAME...]
#   NAME: etcd kube-apiserver kube-controller-manager kubectl csi-provisioner
#         csi-snapshotter snapshot-controller csi-resizer crds helm, or
#         testbed (all but helm: what the end-to-end test needs), or
#         all (the default: testbed, then helm).
#
# A binary is skipped when its stamp (.tools/k8s/stamps/NAME: module,
# version, Go version, tags, ldflags) matches; bumping a version in
# versions.sh rebuilds what it feeds. Builds run one at a time with
# `go build -p 2` (set K8S_BUILD_P to change it); each prints its wall time.
#
# A module whose go.mod has replace directives (etcd, kubernetes, the
# provisioner, the snapshotter) can't be built with `go install mod@version`,
# because replace directives only apply in the main module. It is built from
# a small wrapper module under .tools/k8s/src/ that requires it and repeats
# its replace directives: a directive pointing at a version is copied as is;
# one pointing at a folder of the same repository (kubernetes' staging/,
# etcd's ../api, the snapshotter's ./client) is pointed at that module at
# the version released with it ("lockstep" below); one pointing at
# FORBIDDEN_DEPENDENCY (etcd's guard) is dropped. For the sidecars, the
# k8s.io staging modules may then be moved to one patch release ("align",
# see versions.sh) so that they share compiled packages.
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

# The go.mod of MODULE@VERSION (downloads the module zip too).
module_field() { # module@version field -> value
  go mod download -json "$1" | sed -n "s/^[[:space:]]*\"$2\": \"\(.*\)\",\{0,1\}\$/\1/p"
}

# Prints `go mod edit` -replace arguments repeating the replace directives of
# the go.mod at $1, with folder targets pointed at LOCKSTEP ($2).
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

# The k8s.io staging modules: those kubernetes replaces with staging/ folders.
staging_modules=()
load_staging_modules() {
  [ ${#staging_modules[@]} -eq 0 ] || return 0
  local gomod
  gomod=$(cd "$srcs" && module_field "k8s.io/kubernetes@$K8S_VERSION" GoMod)
  mapfile -t staging_modules < <(replace_args "$gomod" "$K8S_STAGING_VERSION" |
    sed -n 's/^-replace=\(k8s\.io\/[^=]*\)=.*/\1/p')
  [ ${#staging_modules[@]} -gt 0 ] || { log "no staging modules found in $gomod"; exit 1; }
}

# Creates (once per run) the wrapper module for MODULE@VERSION in $wdir.
declare -A wrapper_ready=()
wdir=
wrapper() { # module version lockstep align
  local module=$1 version=$2 lockstep=$3 align=$4 base
  base=$(basename "$module")
  [ "$base" = "v${version:1:1}" ] && base=$(basename "$(dirname "$module")")
  local dir=$srcs/$base-$version
  wdir=$dir
  if [ -z "${wrapper_ready[$dir]:-}" ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    (
      cd "$dir"
      go mod init cinderblock.test/k8s-tools >/dev/null 2>&1
      local gomod
      gomod=$(module_field "$module@$version" GoMod)
      [ -n "$gomod" ] || { log "cannot download $module@$version"; exit 1; }
      local args
      mapfile -t args < <(replace_args "$gomod" "$lockstep")
      local m aligned=
      if [ -n "$align" ]; then
        for m in "${staging_modules[@]}"; do args+=("-replace=$m=$m@$align"); done
        aligned=", k8s.io staging modules at $align"
      fi
      go mod edit -require="$module@$version" ${args[@]+"${args[@]}"}
      log "   wrapper $dir: require $module $version, replace directives of its go.mod$aligned"
    )
    wrapper_ready[$dir]=1
  fi
}

built=() total_start=$(date +%s)
# build NAME MODULE VERSION LOCKSTEP ALIGN PACKAGE TAGS LDFLAGS
build() {
  local name=$1 module=$2 version=$3 lockstep=$4 align=$5 pkg=$6 tags=$7 ldflags=$8
  local stamp="$pkg@$version lockstep=$lockstep align=$align $go_version tags=$tags ldflags=$ldflags"
  if [ -x "$K8S_BIN/$name" ] && [ "$(cat "$stamps/$name" 2>/dev/null)" = "$stamp" ]; then
    log "== $name $version: already built"
    return
  fi
  log "== $name: $pkg@$version"
  local start dir fetched
  start=$(date +%s)
  [ -z "$align" ] || load_staging_modules
  wrapper "$module" "$version" "$lockstep" "$align"; dir=$wdir
  if ! (cd "$dir" && go get "$pkg@$version" >"$dir/get.log" 2>&1); then
    tail -20 "$dir/get.log" >&2; log "go get $pkg@$version failed"; exit 1
  fi
  fetched=$(date +%s)
  (cd "$dir" && go build -p "$build_p" -trimpath ${tags:+-tags "$tags"} -ldflags "$ldflags" \
    -o "$K8S_BIN/$name.new" "$pkg")
  mv -f "$K8S_BIN/$name.new" "$K8S_BIN/$name"
  printf '%s\n' "$stamp" >"$stamps/$name"
  local end; end=$(date +%s)
  log "   built $name in $((end - start))s (fetch $((fetched - start))s, compile and link $((end - fetched))s)"
  built+=("$name:$((end - start))s")
}

crds() {
  local module=github.com/kubernetes-csi/external-snapshotter/client/v8
  local stamp="$module@$SNAPSHOTTER_VERSION"
  if [ "$(cat "$stamps/crds" 2>/dev/null)" = "$stamp" ] &&
    [ -f "$K8S_CRDS/snapshot.storage.k8s.io_volumesnapshots.yaml" ]; then
    log "== crds $SNAPSHOTTER_VERSION: already copied"
    return
  fi
  local dir
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
  local major=${K8S_VERSION#v}; major=${major%%.*}
  local minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
  local flags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean"
  done
  printf '%s' "$flags"
}

one() {
  local kube=k8s.io/kubernetes kube_tags=selinux,notest,grpcnotrace
  case $1 in
    etcd) build etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION" "" \
      go.etcd.io/etcd/server/v3 "" "-s -w" ;;
    kube-apiserver | kube-controller-manager | kubectl)
      build "$1" $kube "$K8S_VERSION" "$K8S_STAGING_VERSION" "" "$kube/cmd/$1" "$kube_tags" "$(k8s_ldflags)" ;;
    csi-provisioner) build "$1" github.com/kubernetes-csi/external-provisioner/v6 "$PROVISIONER_VERSION" "" \
      "$PROVISIONER_K8S_STAGING" \
      github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner "" "-s -w -X main.version=$PROVISIONER_VERSION" ;;
    csi-snapshotter | snapshot-controller) build "$1" github.com/kubernetes-csi/external-snapshotter/v8 \
      "$SNAPSHOTTER_VERSION" "$SNAPSHOTTER_VERSION" "$SNAPSHOTTER_K8S_STAGING" \
      "github.com/kubernetes-csi/external-snapshotter/v8/cmd/$1" "" "-s -w -X main.version=$SNAPSHOTTER_VERSION" ;;
    csi-resizer) build "$1" github.com/kubernetes-csi/external-resizer/v2 "$RESIZER_VERSION" "" "" \
      github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer "" "-s -w -X main.version=$RESIZER_VERSION" ;;
    helm) build helm helm.sh/helm/v4 "$HELM_VERSION" "" "" helm.sh/helm/v4/cmd/helm "" \
      "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean" ;;
    crds) crds ;;
    *) log "unknown part: $1"; exit 2 ;;
  esac
}

command -v go >/dev/null || { log "build.sh: needs Go (go1.26 or newer)"; exit 1; }
testbed=(etcd kube-apiserver kube-controller-manager kubectl csi-provisioner csi-snapshotter
  snapshot-controller csi-resizer crds)
parts=()
for arg in "${@:-all}"; do
  case $arg in
    all) parts+=("${testbed[@]}" helm) ;;
    testbed) parts+=("${testbed[@]}") ;;
    *) parts+=("$arg") ;;
  esac
done
for part in "${parts[@]}"; do one "$part"; done
log "== k8s parts ready in $K8S_BIN ($go_version); built this run: ${built[*]:-none}; total $(($(date +%s) - total_start))s"
