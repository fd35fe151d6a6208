#!/usr/bin/env bash
# The production build (`--no-default-features`): it has no `demo` or `dev-idp` command and carries no
# token-minting code, and the tests that run the binary as a process pass against it.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet --no-default-features --bin obo-sidecar
binary=target/obo-sidecar-production
cp target/debug/obo-sidecar "$binary"

for command in demo dev-idp; do
    if "$binary" "$command" --help >/dev/null 2>&1; then
        echo "production build: the '$command' command exists" >&2
        exit 1
    fi
done
# The development IdP's endpoints and its fixed secret are strings in a binary that carries it.
for marker in "/dev/token" "dev-secret-not-for-production" "mints tokens for anyone"; do
    if grep -aqF "$marker" "$binary"; then
        echo "production build: carries development IdP code ('$marker')" >&2
        exit 1
    fi
done
# Every product unit test without the dev feature, then the tests that run the binary, against it.
cargo nextest run --locked --no-default-features --lib
OBO_SIDECAR_BIN="$PWD/$binary" cargo nextest run --locked --test cli --test operations --test tracing \
    -E 'binary(cli) | binary(tracing) | test(sigterm)'
echo "production build: no dev commands, no dev IdP code, binary tests pass"
