# syntax=docker/dockerfile:1
# The cinderblock image: one binary for every mode (controller, node,
# standalone, ctl, crds).
#
#   docker build -t <registry>/cinderblock:0.1.0 .
#
# In the Helm chart the controller pod runs as the non-root user below, with
# no capabilities and a read-only root filesystem. The node plugin can't: it
# sets up loop devices, runs mkfs and mounts under the kubelet folder, so
# the chart runs that container as root and privileged.

# Build stage. The protos compile with protox (pure Rust, no protoc); `ring`
# needs the C compiler the rust image already carries.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# Cargo.toml declares the benches, so the manifest needs them to load.
COPY benches benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cinderblock \
    && install -m 0755 target/release/cinderblock /cinderblock

# Runtime: the tools the node plugin shells out to (blkid from util-linux,
# mkfs.ext4 and resize2fs from e2fsprogs, mkfs.xfs and xfs_growfs from
# xfsprogs) and CA certificates for the API server connection. Same Debian
# release as the build stage, so the glibc matches.
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       ca-certificates e2fsprogs util-linux xfsprogs \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /cinderblock /usr/local/bin/cinderblock
# Non-root by default; the chart overrides it (runAsUser: 0) for the node plugin only.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cinderblock"]
CMD ["--help"]
