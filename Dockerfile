# syntax=docker/dockerfile:1
# The caregate gateway image: a multi-stage build, a non-root runtime that runs in the
# foreground and writes only to its volumes (ready for a read-only root filesystem).
#
#   docker build -t caregate:0.1.0 .
#   docker run --read-only -p 8443:8443 -p 9443:9443 \
#     -v /srv/caregate/etc:/etc/caregate:ro -v caregate-audit:/var/log/caregate \
#     --tmpfs /run/caregate:rw,uid=10001,gid=10001,mode=0750 caregate:0.1.0
#
# This image is not built by the project's CI (no container engine there); `scripts/check-deploy.sh`
# checks this file with checkov. Deployment: docs/operations.md (Deployment) and deploy/.
#
# Base images are pinned by version tag (Rust 1.95.0, the toolchain the project is tested with;
# Debian 12.11, bump it with Debian's point releases). Pin them by digest too, from your registry
# (`FROM rust:1.95.0-bookworm@sha256:...`): a tag can be re-pushed, and digests cannot be fetched
# from where this file is written.

# ---- manifests: the workspace with every source file replaced by a stub, so that the layer
# ---- that compiles the dependencies below is reused until a Cargo.toml or Cargo.lock changes.
FROM rust:1.95.0-bookworm AS manifests
WORKDIR /src
COPY . .
# Keep Cargo.toml, Cargo.lock and the target roots cargo looks for (src/lib.rs, src/main.rs,
# src/bin/*.rs, benches/*.rs); delete everything else, then stub the target roots.
RUN find . -type f \
        ! -name Cargo.toml ! -name Cargo.lock \
        ! -path '*/src/lib.rs' ! -path '*/src/main.rs' ! -path '*/src/bin/*.rs' \
        ! -path '*/benches/*.rs' \
        -delete \
    && find . -type d -empty -delete \
    && printf 'fn main() {}\n' > /tmp/stub-main.rs \
    && find . -name lib.rs -exec truncate -s 0 {} + \
    && find . -name '*.rs' ! -name lib.rs -exec cp /tmp/stub-main.rs {} \;

# ---- build
FROM rust:1.95.0-bookworm AS build
# cmake: Pingora's zlib-ng; perl: the vendored OpenSSL build. Versions come from the pinned
# Debian release of the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake perl pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies only (cached): the stubbed workspace from the stage above.
COPY --from=manifests /src /src
RUN cargo build --release --locked -p caregate --features otlp
# The real sources. COPY keeps the context's modification times, which can be older than the
# stub build above: touch them so that cargo rebuilds the workspace crates.
COPY . .
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p caregate --features otlp \
    && ./target/release/caregate --version

# ---- redoc: the developer portal's Redoc bundle, from the npm registry, pinned by
# ---- portal/package-lock.json (served by the gateway, never from a CDN; docs/portal.md).
FROM node:20.19.0-bookworm-slim AS redoc
WORKDIR /portal
COPY portal/package.json portal/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
    && test -f node_modules/redoc/bundles/redoc.standalone.js

# ---- runtime
FROM debian:12.11-slim
# ca-certificates: OIDC discovery, JWKS and OTLP over HTTPS. Directories the process writes are
# volumes owned by the caregate user: /var/log/caregate (audit trail, access log if sent to a
# file) and /run/caregate (upgrade socket, pid file).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 caregate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin caregate \
    && install -d -o root -g caregate -m 0750 /etc/caregate \
    && install -d -o caregate -g caregate -m 0750 /var/log/caregate /run/caregate
COPY --from=build /src/target/release/caregate /usr/local/bin/caregate
# The example configs (and the demo's synthetic data), for reference; mount your own config at
# /etc/caregate/caregate.yaml.
COPY --from=build /src/conf /usr/share/caregate/conf
# Redoc for the developer portal: set `portal.redoc_dir: /usr/share/caregate/redoc`.
COPY --from=redoc /portal/node_modules/redoc/bundles /usr/share/caregate/redoc
USER 10001:10001
VOLUME ["/etc/caregate", "/var/log/caregate", "/run/caregate"]
# The listeners of conf/caregate.example.yaml: public 8443, internal 9443. The admin listener
# (9901) binds loopback by default and is not published; the health check below reaches it
# from inside the container.
EXPOSE 8443 9443
# GET /healthz on admin.listen of /etc/caregate/caregate.yaml (plain HTTP, 2 s timeout).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["caregate", "health"]
# Foreground (caregate has no daemon mode); SIGTERM drains, SIGHUP reloads, SIGQUIT hands the
# sockets to a new process (docs/operations.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/caregate"]
CMD ["run", "-c", "/etc/caregate/caregate.yaml"]
