#!/usr/bin/env bash
# CPU per cache-hit request of two sidecar builds, side by side: the figure each change of the hot path is
# judged by (throughput moves by ±10 % between runs on a shared machine; CPU per request much less).
#   bench/cpu-ab.sh BIN_A BIN_B [ROUNDS]
# Both binaries must be `dev` builds (BIN_A also serves the development IdP); build them with
# `cargo build --profile profiling` to profile them too. Both run with one worker (WORKERS=N to change) and
# RUST_LOG=warn, on loopback ports 18080-18099, in front of nginx returning 200 (nginx and oha as bench/run.sh
# installs them). Each round sends `oha -c 16 -n 60000` cache hits to A, then to B; the figure is the process's
# utime + stime over the requests. Prints each round and the medians.
set -euo pipefail
A=$(realpath "$1")
B=$(realpath "$2")
ROUNDS=${3:-5}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
dir=$(mktemp -d)
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/nginx.conf" <<NGINX
worker_processes 1; pid $dir/nginx.pid; error_log $dir/nginx-error.log; daemon on;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18081; location / { return 200 "ok"; } } }
NGINX
"$NGINX" -c "$dir/nginx.conf"
"$A" dev-idp --listen 127.0.0.1:18443 >"$dir/idp.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18443/jwks && break; sleep 0.05; done
printf '%s' "dev-secret-not-for-production" >"$dir/secret"
for side in a b; do
    port=18080 admin=18090
    [ "$side" = b ] && port=18082 admin=18092
    cat >"$dir/$side.toml" <<TOML
[listen]
proxy = "127.0.0.1:$port"
admin = "127.0.0.1:$admin"
[inbound]
issuers = ["http://127.0.0.1:18443"]
audiences = ["api://obo-sidecar"]
[identity]
token_endpoint = "http://127.0.0.1:18443/token"
client_id = "obo-sidecar"
client_secret = { file = "$dir/secret" }
[[routes]]
name = "obo"
path_prefix = "/obo/"
upstream = "http://127.0.0.1:18081/"
token = "obo"
scopes = ["api://downstream/.default"]
TOML
done
TOKIO_WORKER_THREADS=${WORKERS:-1} RUST_LOG=warn "$A" run -c "$dir/a.toml" >"$dir/a.log" 2>&1 &
pa=$!
pids+=($pa)
TOKIO_WORKER_THREADS=${WORKERS:-1} RUST_LOG=warn "$B" run -c "$dir/b.toml" >"$dir/b.log" 2>&1 &
pb=$!
pids+=($pb)
for _ in $(seq 100); do
    curl -sf -o /dev/null http://127.0.0.1:18090/readyz && curl -sf -o /dev/null http://127.0.0.1:18092/readyz && break
    sleep 0.05
done
token=$(curl -sf -H 'Accept: text/plain' -H 'Content-Type: application/json' \
    -d '{"sub":"alice","scp":"access_as_user"}' http://127.0.0.1:18443/dev/token)
for port in 18080 18082; do
    code=$(curl -s -o /dev/null -w "%{http_code}" -H "Authorization: Bearer $token" "http://127.0.0.1:$port/obo/x")
    [ "$code" = 200 ] || { echo "cpu-ab: the sidecar on :$port answered $code" >&2; exit 1; }
    oha --no-tui -c 16 -n 20000 -H "Authorization: Bearer $token" "http://127.0.0.1:$port/obo/x" >/dev/null
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
per_request() { # pid port: µs of CPU per request over one round
    local before after
    before=$(ticks "$1")
    oha --no-tui -c 16 -n 60000 -H "Authorization: Bearer $token" "http://127.0.0.1:$2/obo/x" >/dev/null
    after=$(ticks "$1")
    awk -v t="$((after - before))" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz * 1e6 / 60000 }'
}
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
a=() b=()
for round in $(seq "$ROUNDS"); do
    a+=("$(per_request "$pa" 18080)")
    b+=("$(per_request "$pb" 18082)")
    echo "round $round: A ${a[-1]} µs, B ${b[-1]} µs per request"
done
echo "A $(basename "$A"): median $(median "${a[@]}") µs per request; B $(basename "$B"): median $(median "${b[@]}") µs per request"
