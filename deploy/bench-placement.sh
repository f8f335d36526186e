#!/usr/bin/env bash
# Placement benchmark: the real controller in its own process, 1,000 real
# agents on the simulated hypervisor (mixed sizes), and 20,000 VPS created
# through the gRPC API. Prints figures and ends with one line of JSON.
# Arguments are passed on, e.g.
#   bash deploy/bench-placement.sh --hosts 200 --vps 5000 --concurrency 32  (default 4)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -q -p betang-controller --bin betang-controller
cargo build --release --locked -q -p betang-tests --bin bench-placement
# A thousand agents and their connections need more than the usual 1,024 files.
ulimit -n "$(ulimit -Hn)"
RUST_LOG=error exec target/release/bench-placement "$@"
