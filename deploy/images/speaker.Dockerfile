# ferrolb-speaker: a static (musl) binary on Debian slim with the one tool the data plane runs:
# nft (`nft -f -`, one transaction per sync). Stale UDP conntrack entries are cleared over
# ctnetlink by the speaker itself, so the conntrack tool is not needed.
# Runs as root with only NET_ADMIN and NET_RAW (see the chart's DaemonSet).
#
#   docker build -f deploy/images/speaker.Dockerfile -t ghcr.io/ferrolb/ferrolb-speaker:0.1.0 .
#   buildah bud  -f deploy/images/speaker.Dockerfile -t ghcr.io/ferrolb/ferrolb-speaker:0.1.0 .
#
# Built natively for the build platform (x86_64 or aarch64); the context is the repository root.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# Unpinned Debian packages (hadolint DL3008): bookworm's updates are fixes only, and a pinned
# version disappears from the mirror at the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
    && cargo build --release --locked --target "$target" -p ferrolb-speaker --bin ferrolb-speaker \
    && cp "target/$target/release/ferrolb-speaker" /ferrolb-speaker

FROM docker.io/library/debian:bookworm-slim
# nftables 1.0.6, the version the renderer's tests run against on Debian bookworm.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /ferrolb-speaker /usr/local/bin/ferrolb-speaker
EXPOSE 7472 7946/udp
ENTRYPOINT ["/usr/local/bin/ferrolb-speaker"]
CMD ["run"]
