#!/usr/bin/env bash
# Makes sure libvirtd (qemu:///system) answers. Starts virtlogd and libvirtd
# only when they are not already running, so a libvirtd someone else runs is
# never touched. Works with and without systemd.
set -euo pipefail

libvirtd_answers() { virsh -c qemu:///system version >/dev/null 2>&1; }

# Without udev, /dev/kvm stays root-only. QEMU runs as libvirt-qemu, so
# libvirt then finds KVM usable for itself but not for QEMU, throws its
# capability cache away on every call and re-probes QEMU: defining a domain
# took 48 s here. Debian's udev rule gives /dev/kvm to the kvm group; do the same.
fix_kvm_node() {
  if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
  fi
}

# libvirtd reads the network filters when it starts: one Betang started
# before they were installed is started again (one someone else runs is
# left alone, and says so).
filters_missing() {
  [ -f /etc/libvirt/nwfilter/clean-traffic.xml ] &&
    ! virsh -c qemu:///system nwfilter-list 2>/dev/null | grep -qw clean-traffic
}

ensure_libvirtd() {
  getent group kvm >/dev/null || groupadd --system kvm
  fix_kvm_node
  if libvirtd_answers && filters_missing; then
    if [ -f /run/betang/libvirtd.started ] && ! [ -d /run/systemd/system ]; then
      echo "restarting libvirtd (started by Betang) to read the network filters" >&2
      pkill -x libvirtd || true
      for _ in $(seq 1 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
    else
      echo "libvirtd lacks the clean-traffic filter: restart it to read /etc/libvirt/nwfilter" >&2
    fi
  fi
  if libvirtd_answers; then
    return 0
  fi
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd --system --no-create-home --home-dir /var/lib/libvirt --gid kvm \
      --shell /usr/sbin/nologin libvirt-qemu
  mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu \
    /var/lib/libvirt/images /var/cache/libvirt
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service >/dev/null 2>&1 || true
  fi
  if ! libvirtd_answers; then
    pgrep -x virtlogd >/dev/null || virtlogd -d
    if ! pgrep -x libvirtd >/dev/null; then
      libvirtd -d
      mkdir -p /run/betang && touch /run/betang/libvirtd.started
    fi
  fi
  for _ in $(seq 1 50); do
    libvirtd_answers && return 0
    sleep 0.2
  done
  echo "libvirtd did not answer on qemu:///system" >&2
  return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_libvirtd
fi
