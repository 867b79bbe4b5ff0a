# ferrolb-controller: a static (musl) binary on distroless, run as the nonroot user.
#
#   docker build -f deploy/images/controller.Dockerfile -t ghcr.io/ferrolb/ferrolb-controller:0.1.0 .
#   buildah bud  -f deploy/images/controller.Dockerfile -t ghcr.io/ferrolb/ferrolb-controller:0.1.0 .
#
# Built natively for the build platform (x86_64 or aarch64); the context is the repository root.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# Unpinned Debian packages (hadolint DL3008): bookworm's updates are fixes only, and a pinned
# version disappears from the mirror at the next point release.
# musl: a static binary with a built-in DNS resolver, so the final image needs no libc.
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
    && cargo build --release --locked --target "$target" -p ferrolb-controller --bin ferrolb-controller \
    && cp "target/$target/release/ferrolb-controller" /ferrolb-controller

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /ferrolb-controller /usr/local/bin/ferrolb-controller
# distroless's nonroot user; the chart's securityContext says the same.
USER 65532:65532
EXPOSE 7472
ENTRYPOINT ["/usr/local/bin/ferrolb-controller"]
