#!/usr/bin/env bash
# The Helm chart and the plain manifests, offline and on a real API server
# (the test bed of scripts/k8s/testbed.sh: etcd, kube-apiserver with RBAC,
# kube-controller-manager; no kubelet, so pods never start: the test checks
# objects, not pods).
#
# Offline: the CRDs in the chart and in deploy/ are exactly what
# `cinderblock crds` prints; `helm lint --strict` is clean for the default
# values and for ci/all-options-values.yaml, which sets every value; a
# misspelt or mistyped value fails; deploy/ is what the chart renders
# (scripts/render-deploy.sh --check) and builds with kustomize.
#
# On the API server: `helm install` creates every object of the release; the
# installed CRDs equal `cinderblock crds`; the CSIDriver, Deployment,
# DaemonSet and StorageClasses carry what the driver needs; every permission
# the code and the sidecars use is granted (SubjectAccessReviews through
# `kubectl auth can-i --as=system:serviceaccount:...`) and a sample of
# others is not; the all-options rendering passes server-side validation;
# `helm uninstall` removes every object but the CRDs; `kubectl apply -k
# deploy/` creates the same objects and `kubectl delete -k` removes them.
#
# Usage: scripts/test-helm.sh
# CINDERBLOCK_BIN: the cinderblock binary to take the CRDs from (default:
# cargo build, target/debug/cinderblock).
# Needs helm and kubectl in .tools/k8s/bin (scripts/k8s/build.sh), cargo,
# python3 with PyYAML (Debian: python3-yaml). Prints one line per failed
# check, then a summary line; exits 1 if any check failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=k8s/versions.sh
. scripts/k8s/versions.sh
started=$SECONDS

helm=$K8S_BIN/helm
kubectl=$K8S_BIN/kubectl
chart=charts/cinderblock
all_options=$chart/ci/all-options-values.yaml
release=cinderblock
ns=cinderblock

die() { printf 'test-helm.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== [%3ds] %s\n' $((SECONDS - started)) "$*"; }

[ -x "$kubectl" ] && [ -x "$helm" ] ||
  die "needs helm and kubectl in $K8S_BIN: run scripts/k8s/build.sh (helm is built last: scripts/k8s/build.sh helm)"
python3 -c 'import yaml' 2>/dev/null || die "needs python3 with PyYAML (apt-get install python3-yaml)"

passed=0 failed=0
failures=()
pass() { passed=$((passed + 1)); }
fail() { failed=$((failed + 1)); failures+=("$1"); printf 'FAIL: %s\n' "$1" >&2; }
# check DESCRIPTION CMD...: CMD must succeed (its output is shown on failure).
check() {
  local what=$1 out; shift
  if out=$("$@" 2>&1); then pass; else fail "$what"; [ -z "$out" ] || printf '%s\n' "$out" | tail -n 20 >&2; fi
}
# refuse DESCRIPTION CMD...: CMD must fail.
refuse() {
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then fail "$what (expected a failure)"; else pass; fi
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cinderblock-helm.XXXXXX")
bed=$tmp/bed
cleanup() {
  [ -f "$bed/testbed.env" ] && scripts/k8s/testbed.sh down "$bed" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---------------------------------------------------------------- offline
say "cinderblock crds"
bin=${CINDERBLOCK_BIN:-}
if [ -z "$bin" ]; then
  cargo build --quiet --locked --bin cinderblock
  bin=${CARGO_TARGET_DIR:-target}/debug/cinderblock
fi
"$bin" crds >"$tmp/crds.yaml"
check "deploy/crds/cinderblock.dev.yaml equals \`cinderblock crds\`" cmp "$tmp/crds.yaml" deploy/crds/cinderblock.dev.yaml
check "$chart/crds/cinderblock.dev.yaml equals \`cinderblock crds\` (run scripts/render-deploy.sh)" \
  cmp "$tmp/crds.yaml" "$chart/crds/cinderblock.dev.yaml"

say "helm lint --strict"
# --strict turns warnings into failures; the output is checked as well, so a
# new kind of message can't slip through either.
lint() { # values...
  local out args=()
  for v; do args+=(--values "$v"); done
  out=$("$helm" lint --strict "$chart" ${args[@]+"${args[@]}"} 2>&1) || { printf '%s\n' "$out"; return 1; }
  if printf '%s\n' "$out" | grep -E '\[(WARNING|ERROR)\]'; then return 1; fi
}
check "helm lint --strict (default values)" lint
check "helm lint --strict ($all_options)" lint "$all_options"

say "helm template"
check "helm template (default values)" sh -c "'$helm' template $release $chart -n $ns >'$tmp/default.yaml'"
check "helm template ($all_options)" \
  sh -c "'$helm' template $release $chart -n $ns-all --values $all_options >'$tmp/all-options.yaml'"
check "default values: the node refuses a pool on the system filesystem" grep -q -- '- --refuse-system-filesystem' "$tmp/default.yaml"
check "node.pool.allowSystemFilesystem=true drops --refuse-system-filesystem" \
  sh -c "! grep -q -- --refuse-system-filesystem '$tmp/all-options.yaml'"

# Every value the chart has (every path of values.yaml and of the schema;
# list items count as one; maps of Kubernetes fields such as resources or
# tolerations count as one value) is set in the all-options file, and the
# schema describes every value of values.yaml.
check "$all_options sets every value; values.schema.json describes each" \
  python3 - "$chart/values.yaml" "$all_options" "$chart/values.schema.json" <<'PY'
import json, sys, yaml

WHOLE = {"nodeSelector", "podAnnotations", "resources", "tolerations"}

def paths(v, prefix=()):
    out = {prefix} if prefix else set()
    if prefix and prefix[-1] in WHOLE:
        return out
    if isinstance(v, dict):
        for k, x in v.items():
            out |= paths(x, prefix + (k,))
    elif isinstance(v, list):
        for x in v:
            out |= paths(x, prefix + ("[]",))
    return out

def schema_paths(s, defs, prefix=()):
    s = defs[s["$ref"].split("/")[-1]] if "$ref" in s else s
    out = {prefix} if prefix else set()
    if prefix and prefix[-1] in WHOLE:
        return out
    for k, x in s.get("properties", {}).items():
        out |= schema_paths(x, defs, prefix + (k,))
    if s.get("type") == "array" and "items" in s:
        out |= schema_paths(s["items"], defs, prefix + ("[]",))
    return out

defaults = paths(yaml.safe_load(open(sys.argv[1])))
every = paths(yaml.safe_load(open(sys.argv[2])))
schema = json.load(open(sys.argv[3]))
described = {p for p in schema_paths(schema, schema["definitions"]) if p[0] != "global"}
missing = sorted(".".join(p) for p in (defaults | described) - every)
undescribed = sorted(".".join(p) for p in defaults - described)
if missing:
    print("not set in the all-options file:", ", ".join(missing))
if undescribed:
    print("in values.yaml but not in values.schema.json:", ", ".join(undescribed))
sys.exit(1 if missing or undescribed else 0)
PY

say "values.schema.json and the chart's own checks refuse bad values"
# rejected DESCRIPTION ERROR-PATTERN VALUES-YAML: rendering with these values
# (over the defaults) fails, with a message matching ERROR-PATTERN, so the
# failure is the one meant and not another.
rejected() {
  local what=$1 pattern=$2 out
  printf '%s\n' "$3" >"$tmp/bad-values.yaml"
  if out=$("$helm" template $release $chart --values "$tmp/bad-values.yaml" 2>&1); then
    fail "$what: rendered without an error"
  elif ! grep -qE -- "$pattern" <<<"$out"; then
    fail "$what: failed, but not with /$pattern/"; printf '%s\n' "$out" | head -n 5 >&2
  else
    pass
  fi
}
rejected "a misspelt top-level value" "additional properties 'imagee'" 'imagee: {tag: x}'
rejected "a misspelt nested value" "at '/controller': additional properties 'replica'" 'controller: {replica: 3}'
rejected "a misspelt deep value" "at '/node/pool': additional properties 'pth'" 'node: {pool: {pth: /x}}'
sc_base='name: a, provisioning: thin, placement: spread, fsType: ext4'
rejected "a misspelt StorageClass field" "at '/storageClasses/0': additional properties 'fstype'" \
  "storageClasses: [{$sc_base, fstype: xfs}]"
rejected "an unknown provisioning" "at '/storageClasses/0/provisioning'" \
  'storageClasses: [{name: a, provisioning: thinn, placement: spread, fsType: ext4}]'
rejected "an unknown log format" "at '/logFormat'" 'logFormat: xml'
rejected "a port given as a string" "at '/metrics/nodePort'" 'metrics: {nodePort: "9821"}'
rejected "a relative pool path" "at '/node/pool/path'" 'node: {pool: {path: pool}}'
rejected "a driver name the binary doesn't report" "at '/driverName'" 'driverName: other.example.com'
rejected "two replicas without leader election" "needs controller.leaderElection.enabled" \
  'controller: {leaderElection: {enabled: false}}'
rejected "two default StorageClasses" "at most one class" \
  "storageClasses: [{$sc_base, isDefaultClass: true}, {name: b, provisioning: thick, placement: stack, fsType: xfs, isDefaultClass: true}]"
rejected "one StorageClass name twice" "appears twice" "storageClasses: [{$sc_base}, {$sc_base}]"
rejected "node ports that collide" "must differ" 'node: {agentPort: 9811}'

say "deploy/ (plain manifests)"
check "deploy/ is what the chart renders (scripts/render-deploy.sh --check)" env HELM="$helm" scripts/render-deploy.sh --check
check "kubectl kustomize deploy/" sh -c "'$kubectl' kustomize deploy >'$tmp/kustomized.yaml'"

# ------------------------------------------------------------- API server
say "test bed up"
# A free port taken between testbed.sh's probe and the bind (another test
# starting a bed at the same moment) fails `up`: try again, up to 3 times.
for try in 1 2 3; do
  scripts/k8s/testbed.sh up "$bed" 2>"$tmp/testbed.log" && break
  [ $try -lt 3 ] || { cat "$tmp/testbed.log" >&2; die "testbed.sh up failed 3 times"; }
  say "testbed.sh up failed ($(grep -m1 -o 'bind: address already in use\|exited before [^ ]*' "$tmp/testbed.log" || echo see log)); again"
done
export KUBECONFIG=$bed/admin.kubeconfig
k() { "$kubectl" "$@"; }

# The VolumeSnapshotClass needs the VolumeSnapshot CRDs, which a cluster
# gets from external-snapshotter (scripts/k8s/build.sh copies them).
snap_crds=("$K8S_CRDS"/snapshot.storage.k8s.io_*.yaml)
[ -f "${snap_crds[0]}" ] || scripts/k8s/build.sh crds
snap_crds=("$K8S_CRDS"/snapshot.storage.k8s.io_*.yaml)
for f in "${snap_crds[@]}"; do k apply --server-side -f "$f" >/dev/null; done
k wait --for=condition=Established --timeout=60s crd --all >/dev/null

say "helm install"
if ! "$helm" install $release $chart --namespace $ns --create-namespace >"$tmp/install.log" 2>&1; then
  cat "$tmp/install.log" >&2
  die "helm install failed"
fi
pass
grep -q "kubectl get storagenodes" "$tmp/install.log" || fail "helm install prints NOTES.txt"
"$helm" get manifest $release --namespace $ns >"$tmp/manifest.yaml"
objects=$(grep -c '^kind:' "$tmp/manifest.yaml")
check "every object of the release exists ($objects objects)" k get -f "$tmp/manifest.yaml" -o name
for kind_name in csidriver/cinderblock.dev storageclass/cinderblock storageclass/cinderblock-thick \
  storageclass/cinderblock-xfs volumesnapshotclass/cinderblock clusterrole/cinderblock-controller \
  clusterrole/cinderblock-controller-provisioner clusterrole/cinderblock-controller-snapshotter \
  clusterrole/cinderblock-controller-resizer clusterrole/cinderblock-node \
  clusterrolebinding/cinderblock-controller clusterrolebinding/cinderblock-node; do
  check "$kind_name exists" k get "$kind_name" -o name
done
for kind_name in deployment/cinderblock-controller daemonset/cinderblock-node \
  serviceaccount/cinderblock-controller serviceaccount/cinderblock-node role/cinderblock-controller \
  role/cinderblock-controller-provisioner role/cinderblock-controller-sidecar-leases \
  rolebinding/cinderblock-controller poddisruptionbudget/cinderblock-controller \
  networkpolicy/cinderblock-node networkpolicy/cinderblock-controller; do
  check "$kind_name exists in $ns" k -n $ns get "$kind_name" -o name
done

check "the admission policy limiting node plugins to their own StorageNode" \
  k get validatingadmissionpolicy/cinderblock-own-storagenode validatingadmissionpolicybinding/cinderblock-own-storagenode -o name

say "CRDs"
for crd in blockvolumes blocksnapshots storagenodes blockexports blockgroupsnapshots; do
  check "crd/$crd.cinderblock.dev is established" \
    k wait --for=condition=Established --timeout=30s "crd/$crd.cinderblock.dev"
done
# Server-side dry run of what the binary prints against what helm installed:
# kubectl diff exits 0 only when nothing would change.
check "the installed CRDs equal \`cinderblock crds\` (kubectl diff)" k diff --server-side --force-conflicts -f "$tmp/crds.yaml"

say "objects carry what the driver needs"
# field OBJECT JSONPATH WANT [NAMESPACE]
field() {
  local got
  got=$(k ${4:+-n "$4"} get "$1" -o jsonpath="$2") || return 1
  [ "$got" = "$3" ] || { printf '%s %s: got %q, want %q\n' "$1" "$2" "$got" "$3"; return 1; }
}
# has OBJECT JSONPATH WORD [NAMESPACE]: WORD is one of the space-separated values.
has() {
  local got
  got=$(k ${4:+-n "$4"} get "$1" -o jsonpath="$2") || return 1
  [[ " $got " == *" $3 "* ]] || { printf '%s %s: %q lacks %q\n' "$1" "$2" "$got" "$3"; return 1; }
}
drv=csidriver/cinderblock.dev
check "CSIDriver attachRequired true" field $drv '{.spec.attachRequired}' true
check "CSIDriver podInfoOnMount false" field $drv '{.spec.podInfoOnMount}' false
check "CSIDriver storageCapacity true" field $drv '{.spec.storageCapacity}' true
check "CSIDriver fsGroupPolicy File" field $drv '{.spec.fsGroupPolicy}' File
dep=deployment/cinderblock-controller
check "controller replicas 2" field $dep '{.spec.replicas}' 2 $ns
check "controller containers" field $dep '{.spec.template.spec.containers[*].name}' \
  "cinderblock csi-provisioner csi-snapshotter csi-attacher csi-resizer liveness-probe" $ns
ctl_args='{.spec.template.spec.containers[?(@.name=="cinderblock")].args[*]}'
for a in controller --leader-election --leader-election-namespace='$(POD_NAMESPACE)' --identity='$(POD_NAME)' \
  --endpoint=unix:///csi/csi.sock --metrics-addr=0.0.0.0:9820 --log-format=text --tls-dir=/tls \
  --tls-ca-secret=cinderblock-ca --node-service-account=system:serviceaccount:$ns:cinderblock-node; do
  check "controller arg $a" has $dep "$ctl_args" "$a" $ns
done
check "controller pod runs as non-root" field $dep '{.spec.template.spec.securityContext.runAsNonRoot}' true $ns
prov_args='{.spec.template.spec.containers[?(@.name=="csi-provisioner")].args[*]}'
for a in --enable-capacity --capacity-ownerref-level=2 --extra-create-metadata --strict-topology --leader-election; do
  check "csi-provisioner arg $a" has $dep "$prov_args" "$a" $ns
done
check "csi-provisioner has POD_NAME and NAMESPACE" field $dep \
  '{.spec.template.spec.containers[?(@.name=="csi-provisioner")].env[*].name}' "NAMESPACE POD_NAME" $ns
for c in csi-snapshotter csi-attacher csi-resizer; do
  check "$c arg --leader-election" has $dep "{.spec.template.spec.containers[?(@.name==\"$c\")].args[*]}" \
    --leader-election $ns
done
ds=daemonset/cinderblock-node
node_c='{.spec.template.spec.containers[?(@.name=="cinderblock")]'
check "node containers" field $ds '{.spec.template.spec.containers[*].name}' \
  "cinderblock node-driver-registrar liveness-probe" $ns
check "node plugin is privileged" field $ds "$node_c.securityContext.privileged}" true $ns
check "kubelet folder mounted Bidirectional" field $ds \
  "$node_c.volumeMounts[?(@.mountPath==\"/var/lib/kubelet\")].mountPropagation}" Bidirectional $ns
check "/dev mounted from the host" field $ds '{.spec.template.spec.volumes[?(@.name=="dev")].hostPath.path}' /dev $ns
check "pool folder from the host" field $ds '{.spec.template.spec.volumes[?(@.name=="pool")].hostPath.path}' \
  /var/lib/cinderblock/pool $ns
for a in node --register --node-id='$(NODE_NAME)' --pool=/var/lib/cinderblock/pool --agent-listen=0.0.0.0:9810 \
  --agent-advertise='https://$(POD_IP):9810' --kubelet-dir=/var/lib/kubelet --metrics-addr=0.0.0.0:9821 \
  --reserved-percentage=5 --refuse-system-filesystem --tls-dir=/tls --tls-bootstrap \
  --nbd-listen=0.0.0.0:10809 --nbd-advertise='$(POD_IP):10809'; do
  check "node arg $a" has $ds "$node_c.args[*]}" "$a" $ns
done
check "registrar registers the plugin socket" has $ds \
  '{.spec.template.spec.containers[?(@.name=="node-driver-registrar")].args[*]}' \
  --kubelet-registration-path=/var/lib/kubelet/plugins/cinderblock.dev/csi.sock $ns
for sc in cinderblock:thin:ext4:node cinderblock-thick:thick:ext4:node cinderblock-zone:thin:ext4:zone cinderblock-xfs:thin:xfs:node; do
  IFS=: read -r name prov fs access <<<"$sc"
  check "storageclass $name accessibility $access" field "storageclass/$name" '{.parameters.accessibility}' "$access"
  check "storageclass $name provisioner" field "storageclass/$name" '{.provisioner}' cinderblock.dev
  check "storageclass $name provisioning $prov" field "storageclass/$name" '{.parameters.provisioning}' "$prov"
  check "storageclass $name fsType $fs" field "storageclass/$name" '{.parameters.csi\.storage\.k8s\.io/fstype}' "$fs"
  check "storageclass $name WaitForFirstConsumer" field "storageclass/$name" '{.volumeBindingMode}' WaitForFirstConsumer
done
check "volumesnapshotclass driver" field volumesnapshotclass/cinderblock '{.driver}' cinderblock.dev

say "RBAC (SubjectAccessReviews)"
# One SubjectAccessReview per row and verb, all created in one request, as
# the service account (user system:serviceaccount:NS:SA and its groups).
# Columns: account (cinderblock-<who>), allowed?, verbs,
# resource[.group][/subresource], namespace ("-": cluster-scoped, or every
# namespace), and optionally one object's name.
sar_items=() sar_want=() sar_what=()
while read -r who want verbs res where name; do
  [[ -z $who || $who == \#* ]] && continue
  sa=cinderblock-$who sub= group=
  [[ $res == */* ]] && { sub=${res#*/}; res=${res%%/*}; }
  [[ $res == *.* ]] && { group=${res#*.}; res=${res%%.*}; }
  [ "$where" != - ] || where=
  IFS=, read -ra vs <<<"$verbs"
  for v in "${vs[@]}"; do
    sar_items+=("$(printf '{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{"user":"system:serviceaccount:%s:%s","groups":["system:serviceaccounts","system:serviceaccounts:%s","system:authenticated"],"resourceAttributes":{"verb":"%s","group":"%s","resource":"%s","subresource":"%s","namespace":"%s","name":"%s"}}}' \
      "$ns" "$sa" "$ns" "$v" "$group" "$res" "$sub" "$where" "${name:-}")")
    sar_want+=("$([ "$want" = yes ] && echo true || echo false)")
    sar_what+=("$sa $([ "$want" = yes ] && echo can || echo "can NOT") $v $res${group:+.$group}${sub:+/$sub}${name:+ $name}${where:+ in $where}")
  done
done <<RULES
# cinderblock controller: its records (watched), its Lease, the nodes' Leases, Events on PVCs (in their namespace).
controller yes get,list,watch,create,update,delete blockvolumes.cinderblock.dev -
controller yes get,list,watch,create,update,delete blocksnapshots.cinderblock.dev -
controller yes get,list,watch,create,update,delete storagenodes.cinderblock.dev -
controller yes get,list,watch,create,update,delete blockexports.cinderblock.dev -
controller yes get,list,watch,create,update,delete blockgroupsnapshots.cinderblock.dev -
controller no patch blockvolumes.cinderblock.dev/status -
controller yes get,create,update leases.coordination.k8s.io $ns
controller yes list,watch,patch leases.coordination.k8s.io $ns
controller yes create,patch events.events.k8s.io default
controller yes create,patch events default
# csi-provisioner, with capacity tracking and leader election.
controller yes get,list,watch,create,delete,patch persistentvolumes -
controller yes get,list,watch,update persistentvolumeclaims -
controller yes get,list,watch storageclasses.storage.k8s.io -
controller yes get,list,watch csinodes.storage.k8s.io -
controller yes get,list,watch nodes -
controller yes get,list,watch volumeattachments.storage.k8s.io -
controller yes list,watch,create,update,patch events -
controller yes get,list volumesnapshots.snapshot.storage.k8s.io -
controller yes get,list volumesnapshotcontents.snapshot.storage.k8s.io -
controller yes get,list,watch,create,update,patch,delete csistoragecapacities.storage.k8s.io $ns
controller yes get pods $ns
controller yes get replicasets.apps $ns
controller yes get,watch,list,delete,update,create leases.coordination.k8s.io $ns
# csi-snapshotter
controller yes get,list,watch volumesnapshotclasses.snapshot.storage.k8s.io -
controller yes get,list,watch,update,patch volumesnapshotcontents.snapshot.storage.k8s.io -
controller yes update,patch volumesnapshotcontents.snapshot.storage.k8s.io/status -
# csi-attacher
controller yes get,list,watch,patch volumeattachments.storage.k8s.io -
controller yes patch volumeattachments.storage.k8s.io/status -
# csi-resizer
controller yes patch persistentvolumeclaims/status -
controller yes get,list,watch pods -
controller yes get,list,watch volumeattributesclasses.storage.k8s.io -
# The cluster CA (a Secret it may create, read by name only) and signing node certificates.
controller yes create secrets $ns
controller yes create configmaps $ns
controller yes get,list,watch certificatesigningrequests.certificates.k8s.io -
controller yes update,patch certificatesigningrequests.certificates.k8s.io/approval -
controller yes update,patch certificatesigningrequests.certificates.k8s.io/status -
controller yes get secrets $ns cinderblock-ca
controller yes get,patch configmaps $ns cinderblock-ca
controller yes approve,sign signers.certificates.k8s.io - cinderblock.dev/agent
controller no approve,sign signers.certificates.k8s.io - kubernetes.io/kube-apiserver-client
controller no get secrets $ns some-other-secret
# Not the controller's: secrets, pods, nodes, RBAC; namespaced rights outside its namespace.
controller no get,list secrets -
controller no get secrets $ns
controller no create pods $ns
controller no delete,patch nodes -
controller no delete persistentvolumeclaims -
controller no create clusterrolebindings.rbac.authorization.k8s.io -
controller no create volumesnapshotcontents.snapshot.storage.k8s.io -
controller no create leases.coordination.k8s.io kube-system
controller no create secrets kube-system
controller no delete certificatesigningrequests.certificates.k8s.io -
controller no create csistoragecapacities.storage.k8s.io kube-system
# node plugin: its StorageNode record, its liveness Lease, its Node's zone label.
node yes get,list,create,update storagenodes.cinderblock.dev -
node no patch storagenodes.cinderblock.dev/status -
node yes get,create,patch leases.coordination.k8s.io $ns
node yes get nodes -
node yes create,get,delete certificatesigningrequests.certificates.k8s.io -
# ...and nothing else.
node no delete storagenodes.cinderblock.dev -
node no get,list blockvolumes.cinderblock.dev -
node no delete,create persistentvolumes -
node no list,patch nodes -
node no get secrets $ns
node no create events default
node no delete,list leases.coordination.k8s.io $ns
node no create leases.coordination.k8s.io kube-system
node no list certificatesigningrequests.certificates.k8s.io -
node no update certificatesigningrequests.certificates.k8s.io/approval -
node no update certificatesigningrequests.certificates.k8s.io/status -
node no get configmaps $ns
node yes get configmaps $ns cinderblock-ca
node no approve,sign signers.certificates.k8s.io - cinderblock.dev/agent
RULES
sar_list="{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[$(IFS=,; echo "${sar_items[*]}")]}"
mapfile -t sar_got < <(k create -f - -o jsonpath='{.status.allowed}{"\n"}' <<<"$sar_list")
[ ${#sar_got[@]} -eq ${#sar_want[@]} ] ||
  fail "SubjectAccessReviews: ${#sar_got[@]} answers for ${#sar_want[@]} reviews"
for i in "${!sar_want[@]}"; do
  if [ "${sar_got[$i]:-}" = "${sar_want[$i]}" ]; then pass; else
    fail "RBAC: ${sar_what[$i]} (the review says allowed=${sar_got[$i]:-nothing})"
  fi
done
# The same question through kubectl's impersonation path, as a person would ask it.
check "kubectl auth can-i --as=...:cinderblock-node patch leases" \
  k auth can-i --quiet --as="system:serviceaccount:$ns:cinderblock-node" \
  patch leases.coordination.k8s.io -n "$ns"
refuse "kubectl auth can-i --as=...:cinderblock-node delete persistentvolumes" \
  k auth can-i --quiet --as="system:serviceaccount:$ns:cinderblock-node" delete persistentvolumes

say "all-options rendering passes server-side validation"
k create namespace $ns-all >/dev/null
# The test bed has no cert-manager: its Certificate (the CA, with
# tls.certManager.enabled) is checked as rendered, everything else by the API server.
python3 - "$tmp/all-options.yaml" "$tmp/all-options-core.yaml" "$tmp/ca-certificate.yaml" <<'PY'
import re, sys
docs = re.split(r"(?m)^---\s*$", open(sys.argv[1]).read())
is_cert = lambda d: re.search(r"(?m)^kind: Certificate\s*$", d) is not None
open(sys.argv[2], "w").write("---".join(d for d in docs if not is_cert(d)))
open(sys.argv[3], "w").write("---".join(d for d in docs if is_cert(d)))
PY
check "kubectl apply --dry-run=server ($all_options, all but the cert-manager Certificate)" \
  k apply --server-side --force-conflicts --dry-run=server -f "$tmp/all-options-core.yaml"
check "cert-manager makes the CA into the controller's Secret (isCA, secretName, issuerRef)" \
  sh -c "grep -q '^  isCA: true' '$tmp/ca-certificate.yaml' && grep -q '^  secretName: fast-local-ca' '$tmp/ca-certificate.yaml' && grep -q '^    name: cluster-ca' '$tmp/ca-certificate.yaml'"
check "with cert-manager the controller waits for the CA instead of making one" \
  grep -q -- "--tls-ca-external" "$tmp/all-options-core.yaml"

say "helm uninstall"
# left FILE: the objects of FILE still there (but Namespaces: the test bed runs
# no namespace controller, so a deleted one stays Terminating), after up to 90s.
# A CRD goes only after the API server has removed its objects (its
# finalizer): on a loaded machine that takes a while.
left() {
  local out deadline=$((SECONDS + 90))
  while :; do
    out=$(k get -f "$1" --ignore-not-found -o name 2>&1 | grep -v '^namespace/' || true)
    [ -n "$out" ] && [ $SECONDS -lt $deadline ] || break
    sleep 0.5
  done
  printf '%s' "$out" | tr '\n' ' '
}
check "helm uninstall" "$helm" uninstall $release --namespace $ns
gone=$(left "$tmp/manifest.yaml")
[ -z "$gone" ] && pass || fail "helm uninstall leaves $gone"
for kind_name in csidriver/cinderblock.dev storageclass/cinderblock clusterrole/cinderblock-node; do
  refuse "$kind_name is gone" k get "$kind_name"
done
refuse "daemonset/cinderblock-node is gone" k -n $ns get daemonset/cinderblock-node
# Helm never deletes a chart's CRDs (nor so the records of live volumes).
check "the CRDs stay after helm uninstall" k get crd blockvolumes.cinderblock.dev

say "kubectl apply -k deploy/"
check "kubectl apply --server-side -k deploy/" k apply --server-side --force-conflicts -k deploy
check "every object of deploy/ exists" k get -f "$tmp/kustomized.yaml" -o name
check "kubectl delete -k deploy/" k delete -k deploy --wait=false
# Deletion goes on after the call answers (a CRD's finalizer removes its
# objects first): look again for up to 30 s.
for _ in $(seq 60); do
  gone=$(left "$tmp/kustomized.yaml")
  [ -z "$gone" ] && break
  sleep 0.5
done
[ -z "$gone" ] && pass || fail "kubectl delete -k deploy/ leaves $gone"

scripts/k8s/testbed.sh down "$bed" >/dev/null 2>&1
elapsed=$((SECONDS - started))
if [ "$failed" -gt 0 ]; then
  printf 'test-helm: %d passed, %d FAILED in %ds:\n' "$passed" "$failed" "$elapsed"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
printf 'test-helm: %d checks passed, 0 failed in %ds (%d objects installed and removed)\n' "$passed" "$elapsed" "$objects"
