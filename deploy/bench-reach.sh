#!/usr/bin/env bash
# Reach benchmark, on the real libvirtd with real guests of the offline test
# image: CreateVps to the guest answering TCP at its address, beside the same
# image and seed booted with plain `virsh create` in the same run; then a
# console keystroke's round trip through the controller. The guests sit on a
# bridge with no uplink, asked from a network namespace the benchmark makes
# (198.18.0.0/15). Prints figures and ends with one line of JSON, e.g.
#   bash deploy/bench-reach.sh --rounds 5 --keystrokes 200
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/deps.sh
. "$here/lib/deps.sh"
# shellcheck source=lib/libvirtd.sh
. "$here/lib/libvirtd.sh"
require_root
ensure_packages "${BETANG_PACKAGES[@]}"
ensure_rust
ensure_libvirtd
"$here/build-test-image.sh" >/dev/null
cd "$here/.."
cargo build --release --locked -q -p betang-tests --bin bench-reach
RUST_LOG=error exec target/release/bench-reach "$@"
