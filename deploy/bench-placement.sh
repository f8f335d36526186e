#!/usr/bin/env bash
# Placement benchmark: the real controller with simulated hosts of mixed sizes
# (1,000 by default) and VPS created through the gRPC API (20,000 by default).
# Prints figures and ends with one line of JSON. Arguments are passed on, e.g.
#   bash deploy/bench-placement.sh --hosts 200 --vps 5000 --concurrency 32  (default 8)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -q -p betang-tests --bin bench-placement
RUST_LOG=error exec target/release/bench-placement "$@"
