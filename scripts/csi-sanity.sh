#!/usr/bin/env bash
# Conformance: the CSI community's csi-sanity against `cinderblock standalone`,
# for mount and block access, thin and thick provisioning. Installs csi-sanity
# (pinned) into .tools/bin once; keeps each run's JUnit report and logs under
# .tools/sanity/<run>/. Prints one summary line per run. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
CSI_SANITY_VERSION=v5.6.0
tools=$root/.tools
bin=${CARGO_TARGET_DIR:-$root/target}/debug/cinderblock
sanity=$tools/bin/csi-sanity-$CSI_SANITY_VERSION

if [ ! -x "$sanity" ]; then
  echo "== installing csi-sanity $CSI_SANITY_VERSION"
  mkdir -p "$tools/bin" "$tools/gobin"
  GOBIN=$tools/gobin go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  mv "$tools/gobin/csi-sanity" "$sanity"
fi
[ -x "$bin" ] || cargo build --locked

failed=0
run() { # name access-type provisioning
  local name=$1 access=$2 provisioning=$3
  local dir=$tools/sanity/$name
  rm -rf "$dir"; mkdir -p "$dir"
  printf 'provisioning: %s\n' "$provisioning" >"$dir/params.yaml"
  # One node: csi-sanity creates volumes without topology and stages them on
  # the endpoint's Node service, so every volume must be local to it.
  # Scheduling over several nodes is covered by tests/controller.rs.
  "$bin" standalone --data-dir "$dir/data" --nodes 1 --zones 1 \
    --endpoint "unix://$dir/data/csi.sock" >"$dir/standalone.log" 2>&1 &
  local pid=$!
  for _ in $(seq 200); do [ -S "$dir/data/csi.sock" ] && break; sleep 0.05; done
  local started=$(date +%s)
  set +e
  "$sanity" --csi.endpoint "unix://$dir/data/csi.sock" \
    --csi.mountdir "$dir/data/target" --csi.stagingdir "$dir/data/staging" \
    --csi.testvolumeaccesstype "$access" --csi.testvolumeparameters "$dir/params.yaml" \
    --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
    --ginkgo.junit-report "$dir/junit.xml" --ginkgo.no-color >"$dir/csi-sanity.log" 2>&1
  local rc=$?
  set -e
  kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true
  # Every skip must be one we expect (scripts/csi-sanity-skips.txt says
  # why each is there): a new skip is a failure, never a quiet pass.
  set +e
  python3 - "$dir/junit.xml" "$name" "$(( $(date +%s) - started ))" "$root/scripts/csi-sanity-skips.txt" <<'PY'
import sys, xml.etree.ElementTree as ET
path, name, secs, skips_file = sys.argv[1:5]
try:
    root = ET.parse(path).getroot()
except Exception as e:
    print(f"csi-sanity {name}: no report ({e})"); sys.exit(1)
expected = set()
for line in open(skips_file):
    line = line.strip()
    if line and not line.startswith("#"):
        runs, _, case = line.partition(" ")
        if runs == "*" or name in runs.split(","):
            expected.add(case.strip())
p = f = 0
skipped = set()
for c in root.iter("testcase"):
    if c.find("skipped") is not None: skipped.add(" ".join(c.get("name", "").split()))
    elif c.find("failure") is not None or c.find("error") is not None: f += 1
    else: p += 1
print(f"csi-sanity {name}: {p} passed, {f} failed, {len(skipped)} skipped ({secs}s)")
new = sorted(skipped - expected)
gone = sorted(expected - skipped)
for case in new:
    print(f"   NEW SKIP (not in scripts/csi-sanity-skips.txt): {case}")
for case in gone:
    print(f"   no longer skipped (remove from scripts/csi-sanity-skips.txt): {case}")
sys.exit(1 if new else 0)
PY
  local skips_ok=$?
  set -e
  [ $skips_ok -eq 0 ] || failed=1
  if [ $rc -ne 0 ]; then
    failed=1
    echo "   csi-sanity $name failed; see $dir/csi-sanity.log and $dir/standalone.log"
    grep -E "^\s*\[FAIL\]" "$dir/csi-sanity.log" | head -20 || true
  fi
}

run mount-thin mount thin
run mount-thick mount thick
run block-thin block thin
run block-thick block thick
exit $failed
