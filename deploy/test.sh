#!/usr/bin/env bash
# Installs what the tests need and runs the whole test suite: formatting,
# lints, unit tests, in-process cluster tests on libvirt's test driver, and the
# end-to-end test with a real QEMU guest on the real libvirtd.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=lib/deps.sh
. "$here/lib/deps.sh"
# shellcheck source=lib/libvirtd.sh
. "$here/lib/libvirtd.sh"

require_root
# The portal test drives Debian's Chromium through chromedriver.
ensure_packages "${BETANG_PACKAGES[@]}" chromium chromium-driver
ensure_rust
ensure_libvirtd
# Built (or found in the cache) before the tests so its time is not a test's.
"$here/build-test-image.sh" >/dev/null

cd "$repo"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fault-injection test starts the real controller and agent binaries.
cargo build --workspace --bins --locked
# A hung test fails the run instead of eating the whole CI budget.
timeout --signal=KILL 2700 cargo test --workspace --locked
