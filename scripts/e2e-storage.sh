#!/usr/bin/env bash
# Kubernetes' External Storage e2e suite for cinderblock: e2e.test (built
# from the kubernetes module by scripts/k8s/build.sh e2e) with
# tests/e2e-storage/test-driver.yaml, on the two-node cluster of
# scripts/cluster.sh with the chart installed.
#
# Usage (as root):
#   scripts/e2e-storage.sh [FOCUS]
#       brings up a cluster and installs the chart (scripts/test-cluster.sh
#       with CLUSTER_CHECKS=0), runs the suite, tears it down. FOCUS is a
#       regular expression on the test names, after "External Storage
#       [Driver: cinderblock.dev]"; default: every test (the full run of
#       docs/e2e.md).
#   CLUSTER_DIR=DIR E2E_FOCUS=FOCUS scripts/e2e-storage.sh
#       runs on the cluster already up in DIR (test-cluster.sh does this).
# Environment: E2E_PROCS (parallel e2e.test processes, default 3; ginkgo
#   runs [Serial] tests alone at the end), E2E_SKIP (a regular expression of
#   tests to leave out; default: those tests/e2e-storage/skips lists, each
#   with the reason this cluster cannot run it), E2E_OUT (the folder for the JSON
#   report and summary.md; default .cache/e2e/DATE), E2E_TIMEOUT (the whole
#   run's limit, default 4h; the report is still written).
# Writes E2E_OUT/summary.md: passed, failed and skipped counts, the wall
# time, and each skipped test with the reason the suite gave. Exits non-zero
# when a test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=k8s/versions.sh
. scripts/k8s/versions.sh

focus=${1:-${E2E_FOCUS:-}}
if [ -z "${CLUSTER_DIR:-}" ]; then
  # No cluster given: make one for this run (and remove it afterwards).
  CLUSTER_CHECKS=0 CLUSTER_E2E_FOCUS=${focus:-.} exec scripts/test-cluster.sh
fi

for b in e2e.test ginkgo kubectl; do
  [ -x "$K8S_BIN/$b" ] || { echo "e2e-storage: $K8S_BIN/$b is missing: run scripts/k8s/build.sh e2e" >&2; exit 1; }
done
out=${E2E_OUT:-$root/.cache/e2e/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
procs=${E2E_PROCS:-3}
skips_file=$root/tests/e2e-storage/skips
skip=${E2E_SKIP-$(grep -v '^#' "$skips_file" | cut -f1 | paste -sd'|')}
driver=$root/tests/e2e-storage/test-driver.yaml
full_focus="External.Storage.*\\[Driver: cinderblock\\.dev\\]${focus:+.*($focus)}"

echo "== e2e.test: focus '$full_focus', skip '${skip:-none}', $procs processes; report in $out"
start=$SECONDS
status=0
# The ginkgo runner starts e2e.test processes where the API server answers
# (the cluster's hub namespace); each reads the kubeconfig and the driver
# file. The suite's own pods run the images imported by test-cluster.sh.
scripts/cluster.sh run "$CLUSTER_DIR" "$K8S_BIN/ginkgo" --procs="$procs" --timeout="${E2E_TIMEOUT:-4h}" \
  --focus="$full_focus" ${skip:+--skip="$skip"} --json-report=report.json --output-dir="$out" \
  --no-color --silence-skips "$K8S_BIN/e2e.test" -- \
  --kubeconfig="$CLUSTER_DIR/control/admin.kubeconfig" --provider=local --repo-root="$root" \
  --storage.testdriver="$driver" --report-dir="$out" --dump-logs-on-failure=false \
  --node-os-distro=debian --allowed-not-ready-nodes=0 \
  >"$out/e2e.log" 2>&1 || status=$?
wall=$((SECONDS - start))
tail -5 "$out/e2e.log"

# The summary, from ginkgo's JSON report.
python3 - "$out/report.json" "$wall" "$full_focus" "${skip:-}" "$skips_file" >"$out/summary.md" <<'EOF'
import json, re, sys, collections
path, wall, focus, skip, skips_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
# Why each test left out by the skips file is left out.
known = []
for line in open(skips_file):
    if line.strip() and not line.startswith("#") and "\t" in line:
        pattern, why = line.rstrip("\n").split("\t", 1)
        known.append((re.compile(pattern), why))
reports = json.load(open(path))
counts = collections.Counter()
skipped, failed = [], []
for suite in reports:
    for spec in suite.get("SpecReports") or []:
        if spec.get("LeafNodeType") != "It":
            continue
        name = " ".join(spec.get("ContainerHierarchyTexts") or []) + " " + spec.get("LeafNodeText", "")
        # Only our driver's tests; the binary holds the suite's other specs.
        if "[Driver: cinderblock.dev]" not in name:
            continue
        name = name.replace("External Storage [Driver: cinderblock.dev] ", "")
        state = spec.get("State")
        if state == "pending":
            state = "skipped"
        counts[state] += 1
        if state == "skipped":
            msg = ((spec.get("Failure") or {}).get("Message") or "").strip().splitlines()
            why = msg[0] if msg else next((w for p, w in known if p.search(name)), "filtered out by --focus/--skip")
            skipped.append((name.strip(), why))
        elif state not in ("passed",):
            msg = ((spec.get("Failure") or {}).get("Message") or "").strip().splitlines()
            failed.append((name.strip(), state, msg[0] if msg else ""))
print(f"# External Storage e2e run\n")
print(f"- focus: `{focus}`; skip: `{skip or 'none'}`")
print(f"- passed: {counts['passed']}, failed: {len(failed)}, skipped: {counts['skipped']}")
print(f"- wall time: {wall} s ({wall // 60} min {wall % 60} s)\n")
if failed:
    print("## Failed\n")
    for n, s, m in failed:
        print(f"- {n} ({s}): {m}")
    print()
reasons = collections.defaultdict(list)
for n, m in skipped:
    reasons[m].append(n)
print("## Skipped, by reason\n")
for m, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
    print(f"### {len(names)} x: {m}\n")
    for n in sorted(names):
        print(f"- {n}")
    print()
EOF
sed -n 1,8p "$out/summary.md"
echo "e2e-storage: summary in $out/summary.md (${wall}s)"
exit $status
