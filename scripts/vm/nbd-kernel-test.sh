#!/usr/bin/env bash
# The node plugin's kernel NBD engine in a qemu guest running Debian's
# kernel (this machine's kernel has no nbd or tls module). The host serves
# the volume's image with our NBD server (`cinderblock nbd serve --tls-dir`,
# the export code and TLS setup an owner node's agent runs, with a
# certificate naming node "host", admitting only node "guest"); the guest
# runs `cinderblock node` from a 9p share and drives it over its CSI socket
# as the kubelet does (`ctl kubelet`):
# NodeStageVolume with an NBD publish_context (STARTTLS and the TLS
# handshake in userspace, the session handed to kernel TLS, the sockets to
# the nbd driver over generic netlink; mkfs, mount), write and read back;
# the host restarts the server in the middle of fsynced writes and the node
# plugin's supervisor gives the device new kernel-TLS connections
# (RECONFIGURE) with no I/O error; the host grows the image and
# NodeExpandVolume grows the mounted ext4 online; NodeUnstageVolume leaves
# no nbd or loop device. The guest's /proc/net/tls_stat shows the sockets
# under kernel TLS, the server's log shows every connection over TLS. Last,
# the host reads the guest's first file out of the image (debugfs) and
# compares checksums.
# --no-ktls: the guest boots without the tls module: the node reports
# attach_tls=plain, refuses a TLS-only export with a clear error, and
# attaches in plain text where the export admits its address (stage, write,
# read back, unstage).
# Cost: ~2-3 minutes (TCG), cached guest build under .tools/vm.
# Usage: sudo scripts/vm/nbd-kernel-test.sh [--no-ktls]   (CINDERBLOCK_BIN to pick a binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
bin=${CINDERBLOCK_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/cinderblock}
[ -x "$bin" ] || { echo "nbd-kernel-test: build the binary first (cargo build), or set CINDERBLOCK_BIN" >&2; exit 2; }
mode=ktls
case "${1:-}" in
  "") ;;
  --no-ktls) mode=plain ;;
  *) echo "usage: $0 [--no-ktls]" >&2; exit 2 ;;
esac
cache=$(scripts/vm/build.sh)
started=$(date +%s)

work=$(mktemp -d /var/tmp/cinderblock-vm.XXXXXX)
spid=""; qpid=""
cleanup() {
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
  [ -n "$spid" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" tls init-ca --dir "$work/ca" >/dev/null
mkdir "$work/share"
"$bin" tls issue --ca-dir "$work/ca" --node guest --out "$work/share/tls" >/dev/null
"$bin" tls issue --ca-dir "$work/ca" --node host --out "$work/server-tls" >/dev/null
volume=vol-$(python3 -c 'import uuid; print(uuid.uuid4())')
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
name=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
truncate -s 256M "$work/volume.img"
cp "$bin" "$work/share/cinderblock"
{
  echo "ADDRESS=10.0.2.2:$port"
  echo "EXPORT=$name"
  echo "VOLUME=$volume"
  echo "OWNER=host"
  echo "MODE=$mode"
  cat scripts/vm/guest-node.sh
} > "$work/share/guest.sh"

start_server() {
  # The guest's connections reach us through qemu's user network from
  # 127.0.0.1: the address a plain-text export admits without kernel TLS.
  plain=()
  [ $mode = plain ] && plain=(--plain-from 127.0.0.1)
  "$bin" nbd serve --image "$work/volume.img" --listen "127.0.0.1:$port" --name "$name" \
    --tls-dir "$work/server-tls" --node guest "${plain[@]}" >>"$work/server.log" 2>&1 &
  spid=$!
  for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1).close()" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nbd-kernel-test: server did not start" >&2; cat "$work/server.log" >&2; return 1
}
start_server

timeout 900 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 -nographic -nodefaults -no-reboot \
  -serial "file:$work/console.log" \
  -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.img" \
  -append "console=ttyS0 panic=-1 no_timer_check quiet$([ $mode = plain ] && echo " cinderblock.skip=tls")" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
  -virtfs "local,path=$work/share,mount_tag=host,security_model=none" &
qpid=$!

restarted=0; expanded=0; shown=0
while kill -0 "$qpid" 2>/dev/null; do
  if [ -f "$work/console.log" ]; then
    lines=$(wc -l < "$work/console.log")
    if [ "$lines" -gt "$shown" ]; then sed -n "$((shown + 1)),${lines}p" "$work/console.log" | grep -E "^(guest|GUEST|MARK)" || true; shown=$lines; fi
    if [ $restarted = 0 ] && grep -q "^MARK restart" "$work/console.log"; then
      sleep 1
      echo "host: restarting the NBD server in the middle of the guest's writes"
      kill "$spid"; wait "$spid" 2>/dev/null || true
      sleep 3
      start_server
      restarted=1
    fi
    if [ $expanded = 0 ] && grep -q "^MARK expand" "$work/console.log"; then
      echo "host: growing the image 256 -> 384 MiB"
      truncate -s 384M "$work/volume.img"
      touch "$work/share/expanded"
      expanded=1
    fi
  fi
  sleep 0.5
done
wait "$qpid" || true
qpid=""
sed -n "$((shown + 1)),\$p" "$work/console.log" | grep -E "^(guest|GUEST|MARK)" || true
echo "nbd-kernel-test ($mode): $(( $(date +%s) - started ))s"
if grep -q "GUEST-RESULT: PASS" "$work/console.log"; then
  # Every connection the server served was over TLS (kernel TLS), or, in
  # --no-ktls mode, the guest's data connections were plain text.
  tls_on=$(grep -c "NBD client connected.*tls=true" "$work/server.log" || true)
  tls_off=$(grep -c "NBD client connected.*tls=false" "$work/server.log" || true)
  echo "host: the server served $tls_on connection(s) over TLS, $tls_off in plain text"
  if [ $mode = ktls ] && { [ "$tls_off" != 0 ] || [ "$tls_on" -lt 4 ]; }; then
    echo "nbd-kernel-test: FAIL: expected every connection over TLS (at least 2 before and 2 after the restart)" >&2; exit 1
  fi
  if [ $mode = plain ] && { [ "$tls_off" -lt 2 ] || [ "$tls_on" != 0 ]; }; then
    echo "nbd-kernel-test: FAIL: expected the guest's connections in plain text" >&2; exit 1
  fi
  # The owner's image holds what the guest wrote.
  debugfs -R "dump /first $work/first.out" "$work/volume.img" 2>/dev/null
  if [ "$(cd "$work" && md5sum first.out | cut -d' ' -f1)" != "$(cut -d' ' -f1 "$work/share/first.md5")" ]; then
    echo "nbd-kernel-test: FAIL: the image on the host does not hold the guest's file" >&2
    exit 1
  fi
  echo "host: the image holds the guest's file (checksums match)"
  echo "nbd-kernel-test ($mode): PASS"
else
  echo "--- console" >&2; tail -n 60 "$work/console.log" >&2
  echo "--- server" >&2; tail -n 30 "$work/server.log" >&2
  echo "nbd-kernel-test: FAIL" >&2
  exit 1
fi
