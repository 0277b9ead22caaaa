# Multi-stage build of the caregate gateway. Not built in this project's CI (no Docker engine
# there); see README.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake perl pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p caregate --bin caregate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin caregate
COPY --from=build /src/target/release/caregate /usr/local/bin/caregate
COPY --from=build /src/conf /etc/caregate/examples
USER 10001:10001
EXPOSE 8080 8081 9901
ENTRYPOINT ["/usr/local/bin/caregate"]
CMD ["run", "-c", "/etc/caregate/caregate.yaml"]
