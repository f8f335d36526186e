#!/usr/bin/env bash
# Portal benchmark: an in-process controller and 100 agents on the simulated
# hypervisor, 100 institutions and 20,000 VPS, then every portal page asked
# over HTTP by an operator and a member, timed (p50, p95). Prints figures
# and ends with one line of JSON, e.g.
#   bash deploy/bench-portal.sh --vps 20000 --institutions 100 --rounds 50
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -q -p betang-tests --bin bench-portal
ulimit -n "$(ulimit -Hn)"
RUST_LOG=error exec target/release/bench-portal "$@"
