# Runs inside the test guest (Debian's kernel, with nbd), from the host
# share at /host: the node plugin (`cinderblock node`, kernel NBD engine)
# driven over its CSI socket as the kubelet drives it. nbd-kernel-test.sh
# fills in ADDRESS, EXPORT, VOLUME, OWNER, MODE (ktls: this kernel has
# kernel TLS; plain: it has none) and talks to us through MARK lines on the
# console and files in the share.
set -eu
B=/host/cinderblock
SOCK=/tmp/csi.sock
STAGE=/tmp/csi/staging/$VOLUME
export RUST_LOG=info
fail() { echo "guest: FAILED: $*"; echo "--- node log"; tail -n 40 /tmp/node.log; exit 1; }
step() { echo "guest: $*"; }
kubelet() { $B ctl --endpoint "unix://$SOCK" kubelet "$@"; }
connected() { $B nbd status | grep -c " connected" || true; }
sums() { (cd "$STAGE" && md5sum "$@"); }

mkdir -p /tmp/pool "$STAGE" /run/cinderblock
$B node --node-id guest --pool /tmp/pool --endpoint "unix://$SOCK" --agent-listen 127.0.0.1:9810 \
  --tls-dir /host/tls --allowed-root /tmp/csi --attach-state-dir /run/cinderblock/attach >/tmp/node.log 2>&1 &
node=$!
for i in $(seq 1 600); do [ -S $SOCK ] && break; kill -0 $node 2>/dev/null || fail "the node plugin exited"; sleep 0.1; done
[ -S $SOCK ] || fail "no CSI socket"
grep "remote attach engine" /tmp/node.log | grep -q kernel-nbd || fail "the node plugin did not choose the kernel engine"
[ "$(connected)" = 0 ] || fail "an nbd device is connected before staging"
ctx="--context cinderblock.dev/transport=nbd --context cinderblock.dev/nbd-address=$ADDRESS --context cinderblock.dev/nbd-export=$EXPORT --context cinderblock.dev/nbd-owner=$OWNER"
if [ "$MODE" = ktls ]; then
  grep "remote attach engine" /tmp/node.log | grep -q kernel-tls || fail "the node plugin did not find kernel TLS"
else
  grep "remote attach engine" /tmp/node.log | grep -q '"plain"' || fail "the node plugin did not report plain text"
  grep -q "no kernel TLS" /tmp/node.log || fail "no log line says the path is plain text"
  # A TLS-only publication cannot be attached here, and says why.
  # shellcheck disable=SC2086
  out=$(kubelet stage "$VOLUME" --staging-path "$STAGE" --fs-type ext4 $ctx 2>&1) && fail "a TLS-only export attached without kernel TLS"
  # "not now": ctl's word for FAILED_PRECONDITION.
  echo "$out" | grep -q "not now: .*no kernel TLS" || fail "unclear refusal: $out"
  [ "$(connected)" = 0 ] || fail "a refused stage left an nbd device"
  step "without kernel TLS a TLS-only export is refused (FAILED_PRECONDITION): $(echo "$out" | cut -c1-160)"
  ctx="$ctx --context cinderblock.dev/nbd-tls=plain-allowed"
fi

step "NodeStageVolume: $VOLUME from $ADDRESS (kernel engine, $MODE), mkfs.ext4, mount"
# shellcheck disable=SC2086
kubelet stage "$VOLUME" --staging-path "$STAGE" --fs-type ext4 $ctx || fail "stage"
grep -q " $STAGE ext4 " /proc/mounts || fail "nothing mounted at the staging path"
[ "$(connected)" = 1 ] || fail "expected one connected nbd device, found $(connected)"
DEV=/dev/$(grep -l nbd /sys/block/loop*/loop/backing_file | head -n1 | cut -d/ -f4)
step "staged: $(grep " $STAGE " /proc/mounts | cut -d' ' -f1) on $(cat /sys/block/${DEV#/dev/}/loop/backing_file)"
# shellcheck disable=SC2086
kubelet stage "$VOLUME" --staging-path "$STAGE" --fs-type ext4 $ctx >/dev/null || fail "a repeated stage"
[ "$(connected)" = 1 ] || fail "a repeated stage attached again"

dd if=/dev/urandom of="$STAGE/first" bs=1M count=8 2>/dev/null
sync
sum1=$(sums first)
echo 3 > /proc/sys/vm/drop_caches
[ "$(sums first)" = "$sum1" ] || fail "read back differs"
step "write, read back (caches dropped): ok"
tls_stat() { awk -v k="$1" '$1 == k {print $2}' /proc/net/tls_stat 2>/dev/null; }
if [ "$MODE" = ktls ]; then
  [ "$(tls_stat TlsCurrTxSw)" = 2 ] && [ "$(tls_stat TlsCurrRxSw)" = 2 ] || fail "expected 2 sockets under kernel TLS: $(cat /proc/net/tls_stat)"
  [ "$(tls_stat TlsDecryptError)" = 0 ] || fail "kernel TLS decrypt errors: $(cat /proc/net/tls_stat)"
  step "kernel TLS: $(tls_stat TlsCurrTxSw) sockets encrypt and $(tls_stat TlsCurrRxSw) decrypt in the kernel, no decrypt error"
else
  grep -q "PLAIN TEXT" /tmp/node.log || fail "the attach did not log that it is plain text"
  [ -e /proc/net/tls_stat ] && [ "$(tls_stat TlsCurrTxSw)" != 0 ] && fail "kernel TLS in use without the tls module?"
  step "plain text, as the node's log says"
fi
if [ "$MODE" = ktls ]; then

tx_before=$(tls_stat TlsTxSw)
echo "MARK restart"
: > /tmp/sums
for i in $(seq 1 40); do
  dd if=/dev/urandom of="$STAGE/f$i" bs=256k count=1 conv=fsync 2>/dev/null || fail "write $i failed"
  sums "f$i" >> /tmp/sums
  sleep 0.2
done
sync
echo 3 > /proc/sys/vm/drop_caches
(cd "$STAGE" && md5sum -c /tmp/sums >/dev/null) || fail "checksums after the agent restart"
grep -q "reconnected" /tmp/node.log || fail "the node plugin never reconnected the device"
dmesg | grep -i "EXT4-fs error\|I/O error" && fail "I/O errors in the kernel log"
step "agent restarted mid-write: the node plugin reconnected the device (RECONFIGURE), 40 fsynced files intact, no I/O error"

before=$(df -k "$STAGE" | awk 'NR==2 {print $2}')
echo "MARK expand"
for i in $(seq 1 600); do [ -f /host/expanded ] && break; sleep 0.1; done
[ -f /host/expanded ] || fail "the host did not expand the image"
kubelet expand "$VOLUME" --path "$STAGE" --size 384Mi || fail "NodeExpandVolume"
after=$(df -k "$STAGE" | awk 'NR==2 {print $2}')
[ "$after" -gt "$before" ] || fail "the filesystem did not grow ($before -> $after KiB)"
(cd "$STAGE" && md5sum -c /tmp/sums >/dev/null) || fail "checksums after the expansion"
[ "$(sums first)" = "$sum1" ] || fail "first file after the expansion"
step "NodeExpandVolume on the mounted ext4: $before -> $after KiB, data intact"
[ "$(tls_stat TlsDecryptError)" = 0 ] || fail "kernel TLS decrypt errors: $(cat /proc/net/tls_stat)"
[ "$(tls_stat TlsTxSw)" -ge $((tx_before + 2)) ] || fail "the new connections were not under kernel TLS: $(cat /proc/net/tls_stat)"
[ "$(tls_stat TlsCurrTxSw)" = 2 ] || fail "expected the 2 new sockets under kernel TLS: $(cat /proc/net/tls_stat)"
step "kernel TLS after RECONFIGURE: $(( $(tls_stat TlsTxSw) - tx_before )) new sockets under kernel TLS, $(tls_stat TlsCurrTxSw) in use, no decrypt error"
fi
echo "$sum1" > /host/first.md5

kubelet unstage "$VOLUME" --staging-path "$STAGE" || fail "unstage"
grep -q " $STAGE " /proc/mounts && fail "still mounted after unstage"
[ "$(connected)" = 0 ] || fail "$(connected) nbd device(s) still connected after unstage"
grep -l nbd /sys/block/loop*/loop/backing_file 2>/dev/null && fail "a loop device on nbd is left"
kubelet unstage "$VOLUME" --staging-path "$STAGE" >/dev/null || fail "a repeated unstage"
step "NodeUnstageVolume: unmounted, no nbd device connected, no loop device left"
kill $node; wait $node 2>/dev/null || true
