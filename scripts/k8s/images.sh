#!/usr/bin/env bash
# Builds the container images of the kubelet test cluster without a registry
# or a Docker engine: each image is an OCI image layout in a tar file
# (.tools/images/NAME.tar), which `ctr images import` loads into a node's
# containerd under the name its index carries (io.containerd.image.name).
#
# Usage: scripts/k8s/images.sh [--binary PATH] [NAME...]
#   NAME: cinderblock pause busybox agnhost glibc-dns-testing nginx csi-provisioner csi-snapshotter
#         csi-resizer csi-attacher csi-node-driver-registrar livenessprobe
#         snapshot-controller; default all.
#   --binary: the cinderblock binary to put in the image (default: the
#         release build, `cargo build --release --locked --bin cinderblock`).
#
# The images:
# - cinderblock: what the Dockerfile's runtime stage declares. Its Debian
#   release (FROM debian:SUITE-slim), the packages it installs, the path it
#   copies the binary to, its USER and ENTRYPOINT are read from the
#   Dockerfile; the root filesystem comes from Debian's packages through
#   mmdebstrap (minbase, no docs, no apt lists), the binary is the release
#   build. tests/cluster/image-check.sh checks the result against the
#   Dockerfile and the chart.
# - the sidecars: one static binary each (scripts/k8s/build.sh), at
#   /NAME, the entrypoint, as upstream's images have them.
# - pause: scripts/k8s/images/pause.c, static; the pod sandbox.
# - busybox: Debian's static busybox with a link for every applet.
# - agnhost: busybox plus the agnhost test binary (built from the
#   kubernetes module by build.sh), for the e2e suite.
# - glibc-dns-testing: the cinderblock image's Debian root filesystem
#   alone (GNU tools on glibc), for the e2e suite's multiVolume tests.
# - nginx: busybox again; the suite only runs sh and ls in it.
# - hello-populator, volume-data-source-validator: our own (build.sh,
#   scripts/k8s/populators/), one static binary at /NAME like the
#   sidecars, under the registry.k8s.io/sig-storage names the suite's "any
#   volume data source" manifests use (the controller runs its populator
#   pods from the same image).
# pause, busybox, agnhost, glibc-dns-testing and nginx carry the names
# Kubernetes' e2e suite asks for
# (test/utils/image/manifest.go), so the suite runs with the images here.
#
# Each tar is rebuilt only when its inputs change (a stamp beside it).
# values.yaml beside the tars points the chart at these images
# (`helm install -f .tools/images/values.yaml`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
root=$k8s_repo_root
out=${IMAGES_DIR:-$root/.tools/images}
mkdir -p "$out"

log() { printf '%s\n' "$*" >&2; }
die() { log "images.sh: $*"; exit 1; }

# Image names. Ours are under cinderblock.local/ (a name no registry
# answers, so nothing is ever pulled); the e2e ones are upstream's names.
LOCAL_REPO=${LOCAL_REPO:-cinderblock.local}
chart_version() { sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/cinderblock/Chart.yaml"; }
image_ref() { # name
  case $1 in
    cinderblock) echo "$LOCAL_REPO/cinderblock:$(chart_version)" ;;
    csi-provisioner) echo "$LOCAL_REPO/csi-provisioner:$PROVISIONER_VERSION" ;;
    csi-snapshotter) echo "$LOCAL_REPO/csi-snapshotter:$SNAPSHOTTER_VERSION" ;;
    snapshot-controller) echo "$LOCAL_REPO/snapshot-controller:$SNAPSHOTTER_VERSION" ;;
    csi-resizer) echo "$LOCAL_REPO/csi-resizer:$RESIZER_VERSION" ;;
    csi-attacher) echo "$LOCAL_REPO/csi-attacher:$ATTACHER_VERSION" ;;
    csi-node-driver-registrar) echo "$LOCAL_REPO/csi-node-driver-registrar:$NODE_SIDECARS_VERSION" ;;
    livenessprobe) echo "$LOCAL_REPO/livenessprobe:$NODE_SIDECARS_VERSION" ;;
    hello-populator) echo "registry.k8s.io/sig-storage/hello-populator:$HELLO_POPULATOR_VERSION" ;;
    volume-data-source-validator) echo "registry.k8s.io/sig-storage/volume-data-source-validator:$DATA_SOURCE_VALIDATOR_VERSION" ;;
    pause) echo "registry.k8s.io/pause:3.10.2" ;;
    busybox) echo "registry.k8s.io/e2e-test-images/busybox:1.37.0-1" ;;
    agnhost) echo "registry.k8s.io/e2e-test-images/agnhost:2.63.0" ;;
    glibc-dns-testing) echo "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.0.0" ;;
    nginx) echo "registry.k8s.io/e2e-test-images/nginx:1.15-4" ;;
    *) die "unknown image $1" ;;
  esac
}
all_images=(cinderblock pause busybox agnhost glibc-dns-testing nginx csi-provisioner csi-snapshotter csi-resizer csi-attacher
  csi-node-driver-registrar livenessprobe snapshot-controller hello-populator volume-data-source-validator)

# A deterministic tar of the folder DIR (owner root, time 0, sorted).
layer_tar() { # dir out
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$1" -cf "$2" .
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# Writes OUT, an OCI image layout in a tar, of the layers (uncompressed
# tars) in order, with the config's ENTRYPOINT, CMD (JSON arrays), USER and
# the image name REF.
oci_image() { # out ref entrypoint-json cmd-json user layer...
  local o=$1 ref=$2 entry=$3 cmd=$4 user=$5; shift 5
  local lay; lay=$(mktemp -d)
  mkdir -p "$lay/blobs/sha256"
  local l d diff_ids='' layers=''
  for l in "$@"; do
    d=$(sha "$l")
    cp "$l" "$lay/blobs/sha256/$d"
    diff_ids+="${diff_ids:+,}\"sha256:$d\""
    layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$d\",\"size\":$(stat -c %s "$l")}"
  done
  printf '{"architecture":"amd64","os":"linux","config":{"User":"%s","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$user" "$entry" "$cmd" "$diff_ids" >"$lay/config.json"
  local cd cs
  cd=$(sha "$lay/config.json") cs=$(stat -c %s "$lay/config.json")
  mv "$lay/config.json" "$lay/blobs/sha256/$cd"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
    "$cd" "$cs" "$layers" >"$lay/manifest.json"
  local md ms
  md=$(sha "$lay/manifest.json") ms=$(stat -c %s "$lay/manifest.json")
  mv "$lay/manifest.json" "$lay/blobs/sha256/$md"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$md" "$ms" "$ref" "${ref##*:}" >"$lay/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$lay/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$lay" -cf "$o.new" .
  mv -f "$o.new" "$o"
  rm -rf "$lay"
}

# Skips NAME when its stamp matches INPUTS; otherwise runs the rest and
# writes the stamp.
fresh() { # name inputs
  [ -f "$out/$1.tar" ] && [ "$(cat "$out/$1.stamp" 2>/dev/null)" = "$2" ]
}
stamp() { printf '%s\n' "$2" >"$out/$1.stamp"; }

# ---------------------------------------------------------------- Dockerfile
# The runtime stage: the lines after the last FROM.
runtime_stage() { awk '/^FROM /{buf=""} {buf = buf $0 "\n"} END {printf "%s", buf}' "$root/Dockerfile"; }
# Debian suite of the runtime stage's base (debian:bookworm-slim -> bookworm).
dockerfile_suite() { runtime_stage | sed -n 's/^FROM debian:\([a-z]*\).*/\1/p'; }
# Packages its apt-get install line names.
dockerfile_packages() {
  runtime_stage | tr '\\\n' '  ' | grep -o 'apt-get install[^&]*' | tr ' ' '\n' |
    grep -v -e '^-' -e '^$' -e '^apt-get$' -e '^install$' | sort -u
}
# Where it copies the binary, its USER and its ENTRYPOINT (a JSON array).
dockerfile_binary_path() { runtime_stage | sed -n 's/^COPY --from=[a-z]* [^ ]* \(.*\)$/\1/p'; }
dockerfile_user() { runtime_stage | sed -n 's/^USER \(.*\)$/\1/p'; }
dockerfile_entrypoint() { runtime_stage | sed -n 's/^ENTRYPOINT \(.*\)$/\1/p'; }
dockerfile_cmd() { runtime_stage | sed -n 's/^CMD \(.*\)$/\1/p'; }

# The root filesystem of the runtime stage, as a tar: mmdebstrap's minbase
# of the suite plus the packages, without docs, man pages, locales or apt's
# lists (as the -slim base and the Dockerfile's rm leave it).
debian_rootfs() { # out.tar
  local suite pkgs sources=()
  suite=$(dockerfile_suite); [ -n "$suite" ] || die "no debian:SUITE base in the Dockerfile's runtime stage"
  pkgs=$(dockerfile_packages | paste -sd, -); [ -n "$pkgs" ] || die "no apt-get install in the Dockerfile's runtime stage"
  command -v mmdebstrap >/dev/null || die "needs mmdebstrap (apt-get install mmdebstrap)"
  # The machine's own Debian sources, when it has them in deb822 form.
  [ ! -f /etc/apt/sources.list.d/debian.sources ] || sources=(/etc/apt/sources.list.d/debian.sources)
  log "   mmdebstrap $suite minbase + $pkgs"
  # Without recommended packages, as the Dockerfile's --no-install-recommends.
  mmdebstrap --quiet --variant=minbase --include="$pkgs" --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    "$suite" "$1" ${sources[@]+"${sources[@]}"} >&2
}

# $out/debian-rootfs.tar, made again when the Dockerfile's suite or
# packages change; prints its key (what it was made from).
ensure_debian_rootfs() {
  local pkgs; pkgs=$(dockerfile_packages | paste -sd, -)
  local key="suite=$(dockerfile_suite) packages=$pkgs no-recommends"
  if [ ! -f "$out/debian-rootfs.tar" ] || [ "$(cat "$out/debian-rootfs.stamp" 2>/dev/null)" != "$key" ]; then
    log "== Debian root filesystem (the Dockerfile's runtime stage)"
    local t0=$SECONDS
    debian_rootfs "$out/debian-rootfs.new.tar"
    mv -f "$out/debian-rootfs.new.tar" "$out/debian-rootfs.tar"
    printf '%s\n' "$key" >"$out/debian-rootfs.stamp"
    log "   root filesystem in $((SECONDS - t0))s ($(du -h "$out/debian-rootfs.tar" | cut -f1))"
  fi
  printf '%s\n' "$key"
}

cinderblock_image() {
  local bin=$1 ref dest user entry cmd
  ref=$(image_ref cinderblock)
  dest=$(dockerfile_binary_path) user=$(dockerfile_user) entry=$(dockerfile_entrypoint) cmd=$(dockerfile_cmd)
  [ -n "$dest" ] && [ -n "$entry" ] || die "the Dockerfile's runtime stage has no COPY --from or no ENTRYPOINT"
  local rootfs_key; rootfs_key=$(ensure_debian_rootfs)
  local inputs="$ref $rootfs_key bin=$(sha "$bin") dest=$dest user=$user entry=$entry cmd=$cmd"
  if fresh cinderblock "$inputs"; then log "== cinderblock image ($ref): up to date"; return; fi
  log "== cinderblock image $ref: $bin at $dest"
  local tmp; tmp=$(mktemp -d)
  mkdir -p "$tmp/bin/$(dirname "$dest")"
  install -m 0755 "$bin" "$tmp/bin/$dest"
  layer_tar "$tmp/bin" "$tmp/bin.tar"
  oci_image "$out/cinderblock.tar" "$ref" "$entry" "${cmd:-[]}" "$user" "$out/debian-rootfs.tar" "$tmp/bin.tar"
  rm -rf "$tmp"
  stamp cinderblock "$inputs"
}

# A one-binary image: the static binary at /NAME, the entrypoint.
static_image() { # name binary
  local name=$1 bin=$2 ref
  ref=$(image_ref "$name")
  [ -x "$bin" ] || die "$bin is missing: run scripts/k8s/build.sh $name"
  local inputs="$ref $(sha "$bin") user=root"
  if fresh "$name" "$inputs"; then log "== $name image ($ref): up to date"; return; fi
  log "== $name image $ref"
  local tmp; tmp=$(mktemp -d)
  mkdir -p "$tmp/l"
  install -m 0755 "$bin" "$tmp/l/$name"
  layer_tar "$tmp/l" "$tmp/l.tar"
  # No USER, as upstream's images (distroless static): root unless the pod
  # says otherwise (the controller pod runs as 65532; the node pod's
  # registrar must write the kubelet's plugins_registry).
  oci_image "$out/$name.tar" "$ref" "[\"/$name\"]" '[]' '' "$tmp/l.tar"
  rm -rf "$tmp"
  stamp "$name" "$inputs"
}

pause_image() {
  local ref src=$here/images/pause.c
  ref=$(image_ref pause)
  local inputs="$ref $(sha "$src") $(cc --version | head -1)"
  if fresh pause "$inputs"; then log "== pause image ($ref): up to date"; return; fi
  log "== pause image $ref"
  local tmp; tmp=$(mktemp -d)
  mkdir -p "$tmp/l"
  cc -static -Os -s -o "$tmp/l/pause" "$src"
  layer_tar "$tmp/l" "$tmp/l.tar"
  oci_image "$out/pause.tar" "$ref" '["/pause"]' '[]' 65535 "$tmp/l.tar"
  rm -rf "$tmp"
  stamp pause "$inputs"
}

# Debian's static busybox at /bin/busybox with a link per applet, and /tmp.
busybox_tree() { # dir
  local bb=/bin/busybox
  { [ -x "$bb" ] && ! ldd "$bb" >/dev/null 2>&1; } || die "needs Debian's busybox-static (apt-get install busybox-static)"
  mkdir -p "$1/bin" "$1/tmp" "$1/etc" "$1/root"
  chmod 1777 "$1/tmp"
  install -m 0755 "$bb" "$1/bin/busybox"
  local a
  for a in $("$bb" --list); do [ "$a" = busybox ] || ln -sf busybox "$1/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$1/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' >"$1/etc/group"
}

# busybox_image NAME: Debian's static busybox under the name the suite asks
# for NAME as.
busybox_image() {
  local name=$1 ref; ref=$(image_ref "$1")
  local inputs="$ref $(sha /bin/busybox)"
  if fresh "$name" "$inputs"; then log "== $name image ($ref): up to date"; return; fi
  log "== $name image $ref: busybox"
  local tmp; tmp=$(mktemp -d)
  busybox_tree "$tmp/l"
  layer_tar "$tmp/l" "$tmp/l.tar"
  oci_image "$out/$name.tar" "$ref" '[]' '["sh"]' 0 "$tmp/l.tar"
  rm -rf "$tmp"
  stamp "$name" "$inputs"
}

agnhost_image() {
  local ref bin=$K8S_BIN/agnhost; ref=$(image_ref agnhost)
  [ -x "$bin" ] || die "$bin is missing: run scripts/k8s/build.sh agnhost"
  local inputs="$ref $(sha /bin/busybox) $(sha "$bin")"
  if fresh agnhost "$inputs"; then log "== agnhost image ($ref): up to date"; return; fi
  log "== agnhost image $ref"
  local tmp; tmp=$(mktemp -d)
  busybox_tree "$tmp/l"
  install -m 0755 "$bin" "$tmp/l/agnhost"
  layer_tar "$tmp/l" "$tmp/l.tar"
  oci_image "$out/agnhost.tar" "$ref" '["/agnhost"]' '[]' 0 "$tmp/l.tar"
  rm -rf "$tmp"
  stamp agnhost "$inputs"
}

# The suite's glibc test image (its multiVolume tests run dd, sha256sum and
# sh there): the same Debian root filesystem, so GNU coreutils on glibc.
glibc_test_image() {
  local ref key; ref=$(image_ref glibc-dns-testing)
  key=$(ensure_debian_rootfs)
  local inputs="$ref $key"
  if fresh glibc-dns-testing "$inputs"; then log "== glibc-dns-testing image ($ref): up to date"; return; fi
  log "== glibc-dns-testing image $ref: the Debian root filesystem"
  oci_image "$out/glibc-dns-testing.tar" "$ref" '[]' '["sh"]' 0 "$out/debian-rootfs.tar"
  stamp glibc-dns-testing "$inputs"
}

# The chart's values for these images (helm install -f values.yaml).
write_values() {
  local v=$out/values.yaml repo tag ref
  ref=$(image_ref cinderblock)
  {
    echo "# Written by scripts/k8s/images.sh: the chart's images, built and imported"
    echo "# into each node's containerd by hand; never pulled."
    echo "image:"
    echo "  repository: ${ref%:*}"
    echo "  tag: \"${ref##*:}\""
    echo "  pullPolicy: Never"
    echo "sidecars:"
    echo "  pullPolicy: Never"
    local key name
    for key in provisioner:csi-provisioner snapshotter:csi-snapshotter resizer:csi-resizer attacher:csi-attacher \
      nodeDriverRegistrar:csi-node-driver-registrar livenessProbe:livenessprobe; do
      name=${key#*:} ref=$(image_ref "$name")
      repo=${ref%:*} tag=${ref##*:}
      printf '  %s:\n    image:\n      repository: %s\n      tag: %s\n' "${key%%:*}" "$repo" "$tag"
    done
  } >"$v"
}

binary=
names=()
while [ $# -gt 0 ]; do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --ref) image_ref "$2"; exit 0 ;;
    --list) printf '%s\n' "${all_images[@]}"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=("${all_images[@]}")
start=$SECONDS
for n in "${names[@]}"; do
  case $n in
    cinderblock)
      if [ -z "$binary" ]; then
        log "== cargo build --release --bin cinderblock"
        (cd "$root" && cargo build --release --locked --bin cinderblock >&2)
        binary=${CARGO_TARGET_DIR:-$root/target}/release/cinderblock
      fi
      cinderblock_image "$binary" ;;
    pause) pause_image ;;
    busybox) busybox_image busybox ;;
    # The suite runs only sh and ls in its nginx pods (the volumes suite's
    # "exec of files on the volume"): busybox under that name.
    nginx) busybox_image nginx ;;
    agnhost) agnhost_image ;;
    glibc-dns-testing) glibc_test_image ;;
    csi-provisioner | csi-snapshotter | csi-resizer | csi-attacher | csi-node-driver-registrar | livenessprobe | snapshot-controller | \
      hello-populator | volume-data-source-validator)
      static_image "$n" "$K8S_BIN/$n" ;;
    *) die "unknown image $n" ;;
  esac
done
write_values
log "== images ready in $out in $((SECONDS - start))s"
