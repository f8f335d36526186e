#!/usr/bin/env bash
# Fault injection on the real binaries: the controller and agents (on the
# simulated hypervisor) as processes, killed with SIGKILL at random moments
# while requests are in flight, with the invariants checked after each round.
# Ends with one line of JSON. Arguments are passed on, e.g.
#   bash deploy/chaos.sh --rounds 500 --seed 42
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --locked -q -p betang-controller -p betang-agent -p betang-tests --bins
exec target/debug/chaos "$@"
