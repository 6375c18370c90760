# One image with every Dropline binary; k8s/ picks the binary per Deployment.
#   docker build -t dropline:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source by rdkafka-sys.
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bins \
 && install -D -t /out target/release/dropline-ingress target/release/dropline-allocator \
      target/release/dropline-settler target/release/dropline-expirer target/release/dropline-notifier \
      target/release/dropline-paysim \
      target/release/dropctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
