# syntax=docker/dockerfile:1.7
# Dropline's container images: one per process, all built from one compile.
#
#   docker build --target ingress   -t dropline-ingress   .
#   docker build --target allocator -t dropline-allocator .
#   docker build --target settler   -t dropline-settler   .
#   docker build --target expirer   -t dropline-expirer   .
#   docker build --target notifier  -t dropline-notifier  .
#   docker build --target dropctl   -t dropline-dropctl   .   # migrate, check, rebuild
#
# BuildKit builds the shared stage once and reuses it for every target. The
# runtime images are distroless (glibc, libgcc, CA certificates; no shell, no
# package manager), hold only their own binary, run as the non-root user
# 65532 and write nothing to their root filesystem, which k8s/ mounts
# read-only. zlib is linked statically (rdkafka's libz-static feature in
# Cargo.toml), so the runtime needs no library the distroless image lacks.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# librdkafka is compiled from source by rdkafka-sys with the toolchain the
# rust image already has (make, gcc, perl).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && install -D -t /out \
      target/release/dropline-ingress target/release/dropline-allocator \
      target/release/dropline-settler target/release/dropline-expirer \
      target/release/dropline-notifier target/release/dropctl

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
# Every process serves /healthz, /readyz and /metrics here.
EXPOSE 9100

FROM runtime AS ingress
COPY --from=build /out/dropline-ingress /usr/local/bin/
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/dropline-ingress"]

FROM runtime AS allocator
COPY --from=build /out/dropline-allocator /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/dropline-allocator"]

FROM runtime AS settler
COPY --from=build /out/dropline-settler /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/dropline-settler"]

FROM runtime AS expirer
COPY --from=build /out/dropline-expirer /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/dropline-expirer"]

FROM runtime AS notifier
COPY --from=build /out/dropline-notifier /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/dropline-notifier"]

FROM runtime AS dropctl
COPY --from=build /out/dropctl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/dropctl"]
