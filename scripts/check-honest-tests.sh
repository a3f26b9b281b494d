#!/usr/bin/env bash
# Tests cannot pass vacuously: under CI=true a test that lacks what it needs
# fails instead of printing SKIPPED and passing. Checked for real here: the
# storage tests run once without root and once with mkfs.xfs missing from
# PATH, both under CI=true, and must fail saying why. Needs root (it drops
# root itself for the first case). Usage: scripts/check-honest-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
tmp=$(mktemp -d /tmp/cinderblock-honest.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"

# The test executables cargo built, by target name.
test_binary() {
  cargo test --locked --no-run --message-format=json --test "$1" 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
}
pool_tests=$(test_binary volume_pool)
node_tests=$(test_binary node_service)
[ -x "$pool_tests" ] && [ -x "$node_tests" ] || { echo "check-honest-tests: test binaries not found" >&2; exit 1; }

failures=0
expect_failure() { # what, needle, command...
  local what=$1 needle=$2; shift 2
  if "$@" >"$tmp/out" 2>&1; then
    echo "FAIL: $what: the tests passed although they could not run"; failures=$((failures + 1))
  elif ! grep -q -- "$needle" "$tmp/out"; then
    echo "FAIL: $what: the tests failed, but not saying \"$needle\":"; tail -5 "$tmp/out"; failures=$((failures + 1))
  else
    echo "ok: $what fails under CI=true ($(grep -c -- "$needle" "$tmp/out") test(s) said \"$needle\")"
  fi
}

# 1. Without root: every storage test must fail, not skip.
cp "$node_tests" "$tmp/node_service"; chmod 755 "$tmp/node_service"
expect_failure "node service tests without root" "needs root" \
  env -C "$tmp" CI=true setpriv --reuid=65534 --regid=65534 --clear-groups "$tmp/node_service" --test-threads 2

# 2. With mkfs.xfs missing: a PATH of everything but it.
mkdir "$tmp/bin"
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  for f in "$d"/*; do
    name=${f##*/}
    [ -x "$f" ] && [ ! -e "$tmp/bin/$name" ] && [ "$name" != mkfs.xfs ] && ln -s "$f" "$tmp/bin/$name"
  done
done
expect_failure "pool tests without mkfs.xfs" "mkfs.xfs" \
  env CI=true PATH="$tmp/bin" "$pool_tests" --test-threads 2

# 3. The same binary, with everything present, passes (the failures above are about what was taken away).
if CI=true "$pool_tests" --test-threads 2 >"$tmp/out" 2>&1; then
  echo "ok: pool tests pass with root and every tool"
else
  echo "FAIL: pool tests fail even with everything present:"; tail -20 "$tmp/out"; failures=$((failures + 1))
fi
exit $failures
