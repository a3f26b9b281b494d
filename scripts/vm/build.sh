#!/usr/bin/env bash
# Builds what the kernel-path tests boot: Debian's own kernel (which has the
# nbd module this machine lacks) and a busybox initramfs with the modules,
# e2fsprogs and the C libraries our binary needs. Everything comes from
# Debian's packages (apt-get download; nothing installed but the tools to
# unpack and boot) and is cached under .tools/vm: a rebuild takes seconds.
# Usage: scripts/vm/build.sh   (prints the cache folder)
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=$PWD/.tools/vm
mkdir -p "$cache"

need=()
for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static depmod:kmod cpio:cpio xz:xz-utils mkfs.ext4:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
# busybox-static, not the dynamic one: it runs in the guest without libraries.
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q "statically linked" || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  echo "vm/build: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The kernel package linux-image-6.12-amd64 points at.
kpkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-6.12-amd64 | awk '/Depends: linux-image-6/ {print $2; exit}')
fi
kver=${kpkg#linux-image-}
if [ ! -f "$cache/kernel-$kver/boot/vmlinuz-$kver" ]; then
  echo "vm/build: fetching $kpkg" >&2
  rm -rf "$cache/dl" && mkdir -p "$cache/dl"
  (cd "$cache/dl" && apt-get download "$kpkg" >/dev/null)
  rm -rf "$cache/kernel-$kver.partial"
  dpkg-deb -x "$cache"/dl/*.deb "$cache/kernel-$kver.partial"
  depmod -b "$cache/kernel-$kver.partial" "$kver"
  mv "$cache/kernel-$kver.partial" "$cache/kernel-$kver"
  rm -rf "$cache/dl"
fi
ktree=$cache/kernel-$kver

stamp="$kver $(sha256sum "$0" | cut -c1-16)"
if [ -f "$cache/initramfs.img" ] && [ "$(cat "$cache/initramfs.stamp" 2>/dev/null)" = "$stamp" ]; then
  ln -sf "$ktree/boot/vmlinuz-$kver" "$cache/vmlinuz"
  echo "$cache"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,host,lib/modules,etc,run}
cp /bin/busybox "$root/bin/busybox"
for app in $("$root/bin/busybox" --list); do
  [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"
done

# Modules, in dependency order, decompressed for busybox insmod. tls and
# the AES-GCM ones are kernel TLS (busybox cannot load them on demand).
: > "$root/lib/modules/load-order"
for mod in virtio_pci virtio_net 9pnet_virtio 9p nbd loop ext4 tls gcm ghash_generic aesni_intel ghash_clmulni_intel; do
  modprobe -d "$ktree" -S "$kver" --show-depends "$mod" | awk '$1 == "insmod" {print $2}' | while read -r ko; do
    name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
    [ -f "$root/lib/modules/$name" ] && continue
    case $ko in
      *.xz) xz -dc "$ko" > "$root/lib/modules/$name" ;;
      *.zst) zstd -qdc "$ko" > "$root/lib/modules/$name" ;;
      *) cp "$ko" "$root/lib/modules/$name" ;;
    esac
    echo "$name" >> "$root/lib/modules/load-order"
  done
done

# e2fsprogs, util-linux's blkid (the node plugin probes with it) and the C
# libraries of everything that runs from the host share (our binary is
# built on this same Debian release).
copy_with_libs() {
  local bin=$1
  # Replaces busybox's applet of that name (a link: cp would follow it).
  rm -f "$root/bin/$(basename "$bin")"
  cp -L "$bin" "$root/bin/"
  ldd "$bin" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
    [ -f "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -Ln "$lib" "$root$lib"
  done
}
for b in mkfs.ext4 resize2fs e2fsck dumpe2fs blkid; do copy_with_libs "$(command -v $b)"; done
# glibc's own loader and the libraries Rust binaries link.
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libm.so.6 /lib/x86_64-linux-gnu/libgcc_s.so.1; do
  mkdir -p "$root$(dirname "$lib")"
  cp -Ln "$lib" "$root$lib"
done
mkdir -p "$root/etc"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"

cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
# cinderblock.skip=a,b on the kernel line leaves modules a.ko and b.ko out
# (a test of a kernel without them).
skip=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^cinderblock.skip=//p' | tr ',' ' ')
for m in $(cat /lib/modules/load-order); do
  case " $skip " in *" ${m%.ko} "*) continue ;; esac
  insmod /lib/modules/$m 2>/dev/null
done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none host /host || echo "GUEST-RESULT: FAIL (no 9p share)"
echo "guest: kernel $(uname -r), nbd: $(test -e /sys/module/nbd && echo loaded || echo missing), tls: $(test -e /sys/module/tls && echo loaded || echo missing)"
if [ -f /host/guest.sh ]; then
  if sh /host/guest.sh; then echo "GUEST-RESULT: PASS"; else echo "GUEST-RESULT: FAIL ($?)"; fi
else
  echo "GUEST-RESULT: FAIL (no /host/guest.sh)"
fi
sync
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$cache/initramfs.img.partial"
mv "$cache/initramfs.img.partial" "$cache/initramfs.img"
ln -sf "$ktree/boot/vmlinuz-$kver" "$cache/vmlinuz"
echo "$stamp" > "$cache/initramfs.stamp"
echo "$cache"
