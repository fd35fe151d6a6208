# obo-sidecar container image.
#
#   docker build -t obo-sidecar .
#
# The build makes the production binary (`cargo build --release --locked --no-default-features`: no `demo`, no
# `dev-idp`, no token-minting code) on Debian 12 "bookworm", the
# Debian release the runtime image is built from: the binary links glibc and libgcc dynamically (aws-lc is
# compiled in), which is all that distroless/cc carries, together with CA certificates.
#
# The configuration is not baked in: mount it at /etc/obo-sidecar/sidecar.toml (in Kubernetes a
# ConfigMap, see deploy/kubernetes/). In a container, `[listen] admin` must bind 0.0.0.0 (e.g.
# "0.0.0.0:7090"): the default 127.0.0.1 is unreachable for probes from outside the container's network
# namespace (the kubelet probes the pod IP). The proxy stays on 127.0.0.1 when only containers of the same
# pod call it.

# Base images are pinned by tag: this repository's CI cannot reach a container registry to read their digests.
# Before a release, pin them by digest: `docker buildx imagetools inspect rust:1.88-bookworm` (and the
# distroless image below) prints it, to append as `FROM rust:1.88-bookworm@sha256:<digest>`.
# rust-version in Cargo.toml is 1.88; the lockfile's dependencies need no newer compiler.
FROM rust:1.88-bookworm AS builder
WORKDIR /build

# Dependencies in their own layer, rebuilt only when Cargo.toml or Cargo.lock change: build them once
# against placeholder sources.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --no-default-features

COPY src ./src
# The context has no .git: pass the commit for `--version` and `obo_build_info`
# (`docker build --build-arg OBO_SIDECAR_COMMIT=$(git rev-parse --short=12 HEAD) .`); without it, "unknown".
ARG OBO_SIDECAR_COMMIT=unknown
# COPY keeps the files' own mtimes, which can be older than the placeholder build's outputs: touch the crate
# roots so cargo rebuilds the crate itself rather than keeping the placeholder binary.
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked --no-default-features

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /build/target/release/obo-sidecar /usr/local/bin/obo-sidecar
# The image's `nonroot` user, by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 65532:65532
# 7080: proxy (callers); 7090: admin (/healthz, /readyz, /metrics; probes).
EXPOSE 7080 7090
ENTRYPOINT ["/usr/local/bin/obo-sidecar"]
CMD ["run", "-c", "/etc/obo-sidecar/sidecar.toml"]
