#!/usr/bin/env bash
# Benchmarks on loopback: the release binary, the development IdP and a minimal upstream, driven by the
# in-repo load generator (examples/bench.rs). Prints a table of ratios measured in the same run.
#   bench/run.sh --quick   smoke run (seconds; .ci/run calls it so the harness never rots)
#   bench/run.sh           full run (a few minutes); results go in BENCHMARKS.md by hand
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --quiet --bin obo-sidecar --example bench
OBO_SIDECAR_BIN=target/release/obo-sidecar exec target/release/examples/bench "$@"
