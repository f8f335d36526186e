#!/usr/bin/env bash
# Builds Betang's test guest offline from Debian packages and prints the path of
# the resulting qcow2 base image on stdout.
#
# The guest boots the way a cloud image does: BIOS -> syslinux on the image's
# own FAT file system -> Debian's kernel -> a busybox initramfs. Its init loads
# the virtio and FAT modules, mounts the cloud-init NoCloud seed (the disk
# labelled CIDATA), and prints to the serial console:
#   BETANG-BOOT-OK
#   BETANG-HOSTNAME=<local-hostname from meta-data>
#   BETANG-INSTANCE-ID=<instance-id from meta-data>
# It powers off when the ACPI power button is pressed, so graceful stops work.
#
# The result is cached outside the clone (BETANG_CACHE_DIR, default
# /var/cache/betang), keyed by the package versions and this script, so repeated
# runs and CI reuse it.
set -euo pipefail

cache_root=${BETANG_CACHE_DIR:-/var/cache/betang}/test-image
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
for tool in mkfs.vfat:dosfstools mcopy:mtools syslinux:syslinux cpio:cpio qemu-img:qemu-utils; do
  need "${tool%%:*}" || missing+=("${tool#*:}")
done
[ -e /usr/lib/syslinux/mbr/mbr.bin ] || [ -d /usr/lib/syslinux ] || missing+=(syslinux-common)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# The versioned kernel package behind the linux-image-amd64 meta package.
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
  apt-get update -qq >&2
  kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
kernel_ver=$(apt-cache show --no-all-versions "$kernel_pkg" | awk '/^Version:/ {print $2; exit}')
busybox_ver=$(apt-cache show --no-all-versions busybox-static | awk '/^Version:/ {print $2; exit}')
script_sum=$(sha256sum "$0" | cut -c1-12)
key=$(printf "%s" "${kernel_pkg}_${kernel_ver}_busybox-${busybox_ver}_${script_sum}" | tr -c "A-Za-z0-9._-" "_")
out_dir="$cache_root/$key"
image="$out_dir/betang-test.qcow2"

if [ -s "$image" ]; then
  echo "$image"
  exit 0
fi

echo "building the test guest image ($key)" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download drops privileges to _apt; give it a directory it may write.
chmod 777 "$work"
apt-get download -qq "$kernel_pkg" busybox-static >&2
dpkg -x "$kernel_pkg"_*.deb kernel
dpkg -x busybox-static_*.deb busybox

kver=$(ls kernel/lib/modules | head -1)
mkdir -p initrd/{bin,dev,proc,sys,mnt,lib/modules}
cp busybox/bin/busybox initrd/bin/busybox
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk fat vfat nls_cp437 nls_ascii failover net_failover virtio_net button evdev"
for m in $modules; do
  f=$(find "kernel/lib/modules/$kver/kernel" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
  if [ -z "$f" ]; then
    echo "module $m not found in $kernel_pkg (built in, most likely)" >&2
    continue
  fi
  case "$f" in
    *.xz) xz -dc "$f" >"initrd/lib/modules/$m.ko" ;;
    *) cp "$f" "initrd/lib/modules/$m.ko" ;;
  esac
done
cat >initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk fat vfat nls_cp437 nls_ascii failover net_failover virtio_net button evdev; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
echo "BETANG-BOOT-OK"
# The ACPI power button: power off when it is pressed.
for n in /sys/class/input/input*/name; do
  if [ "$(cat "$n")" = "Power Button" ]; then
    ev=$(ls -d "${n%/name}"/event* 2>/dev/null | head -1)
    if [ -n "$ev" ]; then
      dev="/dev/input/${ev##*/}"
      for _ in $(seq 1 50); do [ -c "$dev" ] && break; sleep 0.1; done
      if [ -c "$dev" ]; then
        (head -c 1 "$dev" >/dev/null && echo "BETANG-POWER-BUTTON" && poweroff -f) &
        echo "BETANG-ACPI-READY"
      fi
    fi
  fi
done
seed=""
for _ in $(seq 1 100); do
  for d in /dev/vd?; do
    [ -b "$d" ] || continue
    if mount -t vfat -o ro "$d" /mnt 2>/dev/null; then
      if [ -f /mnt/meta-data ]; then seed=$d; break 2; fi
      umount /mnt
    fi
  done
  sleep 0.1
done
if [ -n "$seed" ]; then
  h=$(sed -n 's/^local-hostname: *//p' /mnt/meta-data | tr -d '"\r')
  i=$(sed -n 's/^instance-id: *//p' /mnt/meta-data | tr -d '"\r')
  hostname "$h"
  echo "BETANG-HOSTNAME=$h"
  echo "BETANG-INSTANCE-ID=$i"
  # cloud-init's network-config (version 2) as Betang writes it: the
  # interface with this MAC gets the address and the default route. Then
  # the guest answers on TCP port 80 with its hostname.
  nc_cfg=/mnt/network-config
  if [ -f "$nc_cfg" ]; then
    mac=$(sed -n 's/^ *macaddress: *"\(.*\)"$/\1/p' "$nc_cfg" | head -1)
    addr=$(sed -n 's/^ *- *"\([0-9.]*\/[0-9]*\)"$/\1/p' "$nc_cfg" | head -1)
    gw=$(sed -n 's/^ *via: *"\(.*\)"$/\1/p' "$nc_cfg" | head -1)
    # Tests make one guest try to take another's address.
    other=$(sed -n 's/^#betang-test-address: *//p' /mnt/user-data | head -1 | tr -d '\r')
    [ -n "$other" ] && addr=$other
    dev=""
    for n in /sys/class/net/*; do
      [ "$(cat "$n/address")" = "$mac" ] && dev=${n##*/}
    done
    if [ -n "$dev" ] && [ -n "$addr" ]; then
      ip link set "$dev" up
      ip addr add "$addr" dev "$dev"
      [ -n "$gw" ] && ip route add default via "$gw"
      printf '#!/bin/sh\necho "BETANG-HOSTNAME=%s"\n' "$h" >/bin/answer
      chmod +x /bin/answer
      nc -ll -p 80 -e /bin/answer &
      echo "BETANG-ADDRESS=$addr"
    else
      echo "BETANG-NO-ADDRESS mac=$mac"
    fi
  fi
else
  echo "BETANG-NO-SEED"
fi
# A shell on the serial console, for `betangctl vps console`.
(while true; do setsid cttyhack sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'; done) &
echo "BETANG-CONSOLE-READY"
while true; do sleep 60; done
INIT
chmod +x initrd/init
(cd initrd && find . | cpio -o -H newc --quiet | gzip -9) >initrd.gz

cp kernel/boot/vmlinuz-* vmlinuz
cat >syslinux.cfg <<'CFG'
DEFAULT betang
PROMPT 0
TIMEOUT 1
LABEL betang
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet
CFG
truncate -s 64M boot.img
mkfs.vfat -n BETANGBOOT boot.img >/dev/null
syslinux --install boot.img
mcopy -i boot.img vmlinuz initrd.gz syslinux.cfg ::/
mkdir -p "$out_dir"
qemu-img convert -f raw -O qcow2 boot.img "$out_dir/.partial.qcow2"
mv "$out_dir/.partial.qcow2" "$image"
# Images built from older package versions are of no further use.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$image"
