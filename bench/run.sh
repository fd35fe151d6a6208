#!/usr/bin/env bash
# Benchmarks on loopback: the release binary, the development IdP and a minimal upstream, against nginx as the
# reference proxy hop, driven by oha and by the in-repo load generator (examples/bench). Prints a table whose
# figures are each measured against a baseline of the same run, and draws two charts as SVG (throughput.svg,
# latency.svg).
#   bench/run.sh --quick        smoke run of the debug build, under a minute, needs nothing beyond cargo
#                               (.ci/run calls it; its figures are not the product's); one worker; its charts go
#                               to target/bench-charts/
#   bench/run.sh                full run (about seventeen minutes); installs nginx and redis-server (apt) and oha
#                               (cargo) if missing. The oha throughput comparison (nginx, bare hyper hop, sidecar)
#                               runs at 1 and then 2 workers, each with its own processes; every other scenario
#                               once, at 1 worker. The fixed-rate latency (p50/p90/p99/p99.9) is measured direct,
#                               through nginx and through the sidecar. Charts go to bench/charts/
#   bench/run.sh --soak 30m     steady load at half capacity with rotating caller tokens; errors and RSS drift
#   --workers N                 only this worker count (TOKIO_WORKER_THREADS of the sidecar, nginx's
#                               worker_processes, the bare hop's workers) instead of 1 and 2
set -euo pipefail
cd "$(dirname "$0")/.."

OHA_VERSION=1.16.0
full=1
for arg in "$@"; do
    case "$arg" in
        --quick | --soak) full=0 ;;
    esac
done

if [ "$full" = 1 ]; then
    if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
        echo "bench: installing nginx (the reference proxy hop)" >&2
        sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get install -y --no-install-recommends nginx-light >&2 ||
            { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends nginx-light >&2; } ||
            echo "bench: nginx could not be installed; its reference row is skipped" >&2
    fi
    if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
        echo "bench: installing redis-server (the fleet's shared cache)" >&2
        sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get install -y --no-install-recommends redis-server >&2 ||
            { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends redis-server >&2; } ||
            echo "bench: redis-server could not be installed; the fleet rows are skipped" >&2
    fi
    if ! command -v oha >/dev/null && [ ! -x "$HOME/.cargo/bin/oha" ]; then
        echo "bench: installing oha $OHA_VERSION (the load generator)" >&2
        cargo install --locked --quiet "oha@$OHA_VERSION" >&2 ||
            echo "bench: oha could not be installed; its rows are skipped" >&2
    fi
fi

# The smoke run uses the debug build that the tests already made: it checks the harness, not the figures.
profile=release
for arg in "$@"; do
    [ "$arg" = --quick ] && profile=debug
done
if [ "$profile" = release ]; then
    cargo build --release --locked --quiet --bin obo-sidecar --example bench
else
    cargo build --locked --quiet --bin obo-sidecar --example bench
fi
OBO_SIDECAR_BIN="target/$profile/obo-sidecar" exec "target/$profile/examples/bench" "$@"
