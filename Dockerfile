# The Trellis image: trellis-proxy (the entrypoint: gateway, sidecar, and the sidecar's
# `trellis-proxy iptables` init container) and trellis-control.
#
#   docker build -t trellis:dev .
#
# The release build below is the one .ci/run runs (control/tests/image.rs keeps them identical),
# so a green CI run means this stage compiles; the image itself is built where a container engine
# is, since CI has none.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY proxy proxy
COPY control control
RUN cargo build --release --locked -p trellis-proxy -p trellis-control

# debian-slim rather than distroless: the init container needs iptables (both the legacy and the
# nft backends), and the probes of the loopback-only admin API need an HTTP client (wget) inside
# the container.
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates iptables wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1337 trellis \
    && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin trellis
COPY --from=build /src/target/release/trellis-proxy /src/target/release/trellis-control /usr/local/bin/
# UID 1337 is the one the capture rules exempt (`trellis-proxy iptables --proxy-uid`): a sidecar
# running as anyone else would have its own connections captured again. Numeric, so Kubernetes'
# runAsNonRoot can check it.
USER 1337:1337
ENTRYPOINT ["trellis-proxy"]
