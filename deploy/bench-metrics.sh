#!/usr/bin/env bash
# Metrics benchmark: the Betang agent's /metrics beside Debian's
# prometheus-libvirt-exporter, against a libvirt test-driver host of 500
# domains and against the real libvirtd with a few real QEMU guests.
# Prints figures and ends with one line of JSON. Arguments are passed on, e.g.
#   bash deploy/bench-metrics.sh --domains 500 --scrapes 200 --guests 3
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/deps.sh
. "$here/lib/deps.sh"
# shellcheck source=lib/libvirtd.sh
. "$here/lib/libvirtd.sh"
require_root
ensure_packages "${BETANG_PACKAGES[@]}" prometheus-libvirt-exporter
ensure_rust
ensure_libvirtd
cd "$here/.."
cargo build --release --locked -q -p betang-agent --bin betang-agent
cargo build --release --locked -q -p betang-tests --bin bench-metrics
exec target/release/bench-metrics "$@"
