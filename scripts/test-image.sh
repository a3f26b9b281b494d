#!/usr/bin/env bash
# Checks that three descriptions of the cinderblock image agree: the
# Dockerfile's runtime stage (how users build it), the image built here by
# scripts/k8s/images.sh (what the cluster test runs), and the Helm chart
# (what it runs in a pod). It fails when they disagree on the binary's path,
# the entrypoint, the user, or a tool the node plugin runs.
#
# Usage (as root: it unpacks the image and runs the binary in it with
# chroot): scripts/test-image.sh [IMAGE_TAR]   (default .tools/images/cinderblock.tar)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=k8s/versions.sh
. scripts/k8s/versions.sh
tar_file=${1:-$root/.tools/images/cinderblock.tar}
helm=$K8S_BIN/helm
[ -f "$tar_file" ] || { echo "test-image: $tar_file is missing: run scripts/k8s/images.sh cinderblock" >&2; exit 1; }
[ -x "$helm" ] || { echo "test-image: $helm is missing: run scripts/k8s/build.sh helm" >&2; exit 1; }

passed=0 failed=0 failures=()
pass() { passed=$((passed + 1)); }
fail() { failed=$((failed + 1)); failures+=("$1"); printf 'FAIL: %s\n' "$1" >&2; }
check() { local what=$1 out; shift; if out=$("$@" 2>&1); then pass; else fail "$what"; printf '%s\n' "$out" | tail -5 | sed 's/^/    /' >&2; fi; }
same() { [ "$2" = "$3" ] && pass || fail "$1: '$2' vs '$3'"; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- the Dockerfile's runtime stage (the lines after its last FROM)
stage=$(awk '/^FROM /{buf=""} {buf = buf $0 "\n"} END {printf "%s", buf}' Dockerfile)
df_dest=$(sed -n 's/^COPY --from=[a-z]* [^ ]* \(.*\)$/\1/p' <<<"$stage")
df_entry=$(sed -n 's/^ENTRYPOINT \(.*\)$/\1/p' <<<"$stage")
df_user=$(sed -n 's/^USER \(.*\)$/\1/p' <<<"$stage")
mapfile -t df_pkgs < <(tr '\\\n' '  ' <<<"$stage" | grep -o 'apt-get install[^&]*' | tr ' ' '\n' |
  grep -v -e '^-' -e '^$' -e '^apt-get$' -e '^install$' | sort -u)
[ -n "$df_dest" ] && [ -n "$df_entry" ] && [ ${#df_pkgs[@]} -gt 0 ] ||
  { echo "test-image: cannot read the runtime stage of the Dockerfile" >&2; exit 1; }
same "Dockerfile: ENTRYPOINT runs the binary it copies" "$df_entry" "[\"$df_dest\"]"

# ---- the tools the node plugin runs, and their packages, from its source
fs_src=src/attach/filesystem.rs
code=$(sed '/#\[cfg(test)\]/,$d' "$fs_src")
mapfile -t tools < <(grep -Pzo '(?:run(?:_checked)?\(\s*|\(\s*)"\K[a-z][a-z0-9_.]*(?=",)' <<<"$code" | tr '\0' '\n' | sort -u)
# Packages: the second argument of run("tool", "package", ...), and what
# package_of() maps each file system to.
mapfile -t tool_pkgs < <({ grep -Pzo 'run\(\s*"[a-z0-9_.]+",\s*"\K[a-z0-9.-]+(?=")' <<<"$code";
  sed -n '/fn package_of/,/^}/p' <<<"$code" | grep -Pzo '=>\s*"\K[a-z0-9.-]+(?=")'; } | tr '\0' '\n' | sort -u)
[ ${#tools[@]} -ge 4 ] || { echo "test-image: found only '${tools[*]}' as tools in $fs_src" >&2; exit 1; }
echo "tools the node plugin runs ($fs_src): ${tools[*]}; their packages: ${tool_pkgs[*]}"
for p in "${tool_pkgs[@]}"; do
  check "the Dockerfile installs $p (the node plugin runs its tools)" grep -qx -- "$p" <(printf '%s\n' "${df_pkgs[@]}")
done

# ---- the image built here
mkdir -p "$tmp/oci" "$tmp/rootfs"
tar -xf "$tar_file" -C "$tmp/oci"
read -r ref entry user layers < <(python3 - "$tmp/oci" <<'EOF'
import json, sys, os
d = sys.argv[1]
blob = lambda dg: os.path.join(d, "blobs", *dg.split(":"))
idx = json.load(open(os.path.join(d, "index.json")))
m = idx["manifests"][0]
man = json.load(open(blob(m["digest"])))
cfg = json.load(open(blob(man["config"]["digest"])))["config"]
print(m["annotations"]["io.containerd.image.name"], json.dumps(cfg.get("Entrypoint"), separators=(",", ":")),
      cfg.get("User", ""), ",".join(blob(l["digest"]) for l in man["layers"]))
EOF
)
IFS=, read -ra layer_files <<<"$layers"
for l in "${layer_files[@]}"; do tar -xf "$l" -C "$tmp/rootfs"; done
echo "image $ref: entrypoint $entry, user $user, ${#layer_files[@]} layers"
same "image entrypoint = Dockerfile ENTRYPOINT" "$entry" "$df_entry"
same "image user = Dockerfile USER" "$user" "$df_user"
check "image holds the binary at $df_dest" test -x "$tmp/rootfs$df_dest"
# The binary runs in the image's root file system: its libraries are there.
check "the binary runs inside the image (chroot: --version)" chroot "$tmp/rootfs" "$df_dest" --version
for p in "${df_pkgs[@]}"; do
  check "image has the Dockerfile's package $p installed" \
    sh -c "chroot '$tmp/rootfs' dpkg-query -W -f '\${Status}' '$p' | grep -q 'install ok installed'"
done
for t in "${tools[@]}"; do
  check "image has $t on its PATH" chroot "$tmp/rootfs" sh -c "command -v $t"
done
check "image has CA certificates" test -s "$tmp/rootfs/etc/ssl/certs/ca-certificates.crt"

# ---- the chart, rendered with the values that point at the image built here
values=$root/.tools/images/values.yaml
"$helm" template cb charts/cinderblock -f "$values" >"$tmp/manifest.yaml"
"$helm" template cb charts/cinderblock >"$tmp/default.yaml"
python3 - "$tmp/manifest.yaml" "$tmp/default.yaml" >"$tmp/chart.txt" <<'EOF'
import sys, re
# Minimal reading of the rendered YAML: the cinderblock containers' image,
# command and runAsUser, per workload kind. (No YAML library needed: the
# chart's rendering is regular.)
def containers(path):
    out = []
    kind = None
    for doc in open(path).read().split("\n---"):
        k = re.search(r"^kind: (\w+)", doc, re.M)
        if not k or k.group(1) not in ("Deployment", "DaemonSet"):
            continue
        for c in re.split(r"\n\s+- name: ", doc)[1:]:
            name = c.split("\n", 1)[0].strip()
            if name != "cinderblock":
                continue
            img = re.search(r"^\s+image: (\S+)", c, re.M)
            cmd = re.search(r"^\s+command:", c, re.M)
            out.append((k.group(1), img.group(1) if img else "", "command" if cmd else "entrypoint"))
    return out
for kind, img, how in containers(sys.argv[1]):
    print("local", kind, img, how)
for kind, img, how in containers(sys.argv[2]):
    print("default", kind, img, how)
EOF
cat "$tmp/chart.txt"
while read -r which kind img how; do
  same "chart ($which values) $kind runs the image's ENTRYPOINT (no command override)" "$how" entrypoint
  if [ "$which" = local ]; then
    same "chart (local values) $kind image = the image built here" "$img" "$ref"
  else
    same "chart (defaults) $kind image tag = the tag built here" "${img##*:}" "${ref##*:}"
  fi
done <"$tmp/chart.txt"
[ "$(grep -c . "$tmp/chart.txt")" = 4 ] && pass || fail "chart renders a cinderblock container in the Deployment and the DaemonSet"
# Every container of the chart, sidecars included, runs an image built here
# (a sidecar added to the chart but not to images.sh's values would sit in
# ErrImageNeverPull on a cluster without a registry).
foreign=$(sed -n 's/^ *image: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$tmp/manifest.yaml" | sort -u | grep -v "^${ref%%/*}/" || true)
[ -z "$foreign" ] && pass || fail "chart (local values) uses images not built here: $(echo $foreign)"
ctl_uid=$(sed -n '/^controller:/,/^[a-z]/p' charts/cinderblock/values.yaml | sed -n 's/^ *runAsUser: *\([0-9]*\)/\1/p' | head -1)
same "chart controller.securityContext.runAsUser = the Dockerfile's USER" "$ctl_uid" "${df_user%%:*}"

echo "test-image: $passed passed, $failed failed"
if [ $failed -gt 0 ]; then printf '  - %s\n' "${failures[@]}"; exit 1; fi
