#!/usr/bin/env bash
# Installs the Debian packages Betang builds and runs with, only those missing.
set -euo pipefail

# Build: protoc for the gRPC code, libvirt-dev and pkg-config for the virt crate.
# Run: libvirtd with the QEMU driver, QEMU itself, qemu-img; libvirt's
# standard network filters (clean-traffic holds each guest to its MAC and
# address) with the ebtables and iptables they drive.
# Test guest: dosfstools, mtools, syslinux and cpio build the offline image.
# Monitoring tests: prometheus (the server, and promtool to check metrics,
# rules and the scrape configuration). systemd: systemd-analyze rates the
# units' hardening.
BETANG_PACKAGES=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 qemu-utils protobuf-compiler pkg-config gcc
  libvirt-daemon-config-nwfilter ebtables iptables
  dosfstools mtools syslinux syslinux-common cpio prometheus systemd
)

missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

ensure_packages() {
  local missing
  missing=$(missing_packages "$@")
  [ -z "$missing" ] && return 0
  echo "installing: $(echo $missing)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >&2
  # qemu-system-x86 replaces a newer qemu-utils; make sure qemu-img matches it.
  if echo "$missing" | grep -qx qemu-system-x86; then
    apt-get install -y -qq --no-install-recommends qemu-utils >&2
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
      [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
    done
  fi
  command -v cargo >/dev/null 2>&1 || {
    echo "Betang needs a Rust toolchain (1.88 or newer, from rustup) on PATH" >&2
    exit 1
  }
}

require_root() {
  [ "$(id -u)" = 0 ] || {
    echo "run this as root: it installs packages and talks to qemu:///system" >&2
    exit 1
  }
}
