# Runs inside the test guest (Debian's kernel, with nbd), from the host
# share at /host; nbd-kernel-test.sh fills in ADDRESS, EXPORT and talks to
# us through MARK lines on the console and files in the share.
set -eu
B=/host/cinderblock
export RUST_LOG=info
fail() { echo "guest: FAILED: $*"; exit 1; }
step() { echo "guest: $*"; }

step "stage: attach $ADDRESS with two connections"
$B nbd attach --address "$ADDRESS" --export "$EXPORT" --connections 2 --dead-connection-timeout 90 --supervise >/tmp/attach.out 2>/tmp/attach.err &
sup=$!
for i in $(seq 1 600); do [ -s /tmp/attach.out ] && break; kill -0 $sup 2>/dev/null || { cat /tmp/attach.err; fail "attach exited"; }; sleep 0.1; done
DEV=$(head -n1 /tmp/attach.out)
N=${DEV#/dev/nbd}
[ -b "$DEV" ] || fail "no device $DEV"
step "attached $DEV ($(cat /sys/block/nbd$N/size) sectors)"

mkfs.ext4 -q -F -E nodiscard "$DEV"
mkdir -p /tmp/m
mount "$DEV" /tmp/m
dd if=/dev/urandom of=/tmp/m/first bs=1M count=8 2>/dev/null
sum1=$(md5sum /tmp/m/first | cut -d' ' -f1)
umount /tmp/m
echo 3 > /proc/sys/vm/drop_caches
mount "$DEV" /tmp/m
[ "$(md5sum /tmp/m/first | cut -d' ' -f1)" = "$sum1" ] || fail "read back differs"
step "mkfs, write, read back: ok"

echo "MARK restart"
: > /tmp/sums
for i in $(seq 1 40); do
  dd if=/dev/urandom of=/tmp/m/f$i bs=256k count=1 conv=fsync 2>/dev/null || fail "write $i failed"
  md5sum /tmp/m/f$i >> /tmp/sums
  sleep 0.2
done
sync
umount /tmp/m
echo 3 > /proc/sys/vm/drop_caches
mount "$DEV" /tmp/m
md5sum -c /tmp/sums >/dev/null || fail "checksums after the server restart"
grep -q "reconfigured" /tmp/attach.err || { cat /tmp/attach.err; fail "the device was never reconfigured"; }
step "server restarted mid-write: device survived through RECONFIGURE, 40 files intact"

before=$(df -k /tmp/m | awk 'NR==2 {print $2}')
echo "MARK expand"
for i in $(seq 1 600); do [ -f /host/expanded ] && break; sleep 0.1; done
[ -f /host/expanded ] || fail "the host did not expand the image"
$B nbd resize --index "$N" --address "$ADDRESS" --export "$EXPORT" || fail "resize"
blockdev_size=$(cat /sys/block/nbd$N/size)
step "device now $blockdev_size sectors"
resize2fs "$DEV" >/dev/null 2>&1 || fail "online resize2fs"
after=$(df -k /tmp/m | awk 'NR==2 {print $2}')
[ "$after" -gt "$before" ] || fail "filesystem did not grow ($before -> $after KiB)"
md5sum -c /tmp/sums >/dev/null || fail "checksums after the expansion"
[ "$(md5sum /tmp/m/first | cut -d' ' -f1)" = "$sum1" ] || fail "first file after expansion"
step "online expansion: $before -> $after KiB, data intact"

umount /tmp/m
kill $sup; wait $sup 2>/dev/null || true
$B nbd detach --index "$N"
sleep 1
if $B nbd status | grep -q "nbd$N connected"; then fail "nbd$N still connected after unstage"; fi
step "unstaged: no nbd device connected"
