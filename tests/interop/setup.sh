#!/usr/bin/env bash
# Installs the interop IdP (oidc-provider, jose) from the committed lockfile with `npm ci`.
# Idempotent: does nothing when node_modules was installed from this very package-lock.json.
# Without node/npm it says so and exits 0 (the interop test then skips itself).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "interop: node/npm not found, not installing oidc-provider" >&2
  exit 0
fi

stamp=node_modules/.obo-sidecar-lockfile.sha256
# node hashes the lockfile: no dependency on sha256sum (Linux) vs shasum (macOS).
want=$(node -e 'process.stdout.write(require("crypto").createHash("sha256").update(require("fs").readFileSync("package-lock.json")).digest("hex"))')
if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
  exit 0
fi

npm ci --no-audit --no-fund
echo "$want" >"$stamp"
