# syntax=docker/dockerfile:1
# Build: the official Rust image, the same `cargo build --release --locked`
# that .ci/run performs.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin weir

# Run: distroless (glibc, CA certificates, no shell), as a non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/weir /usr/local/bin/weir
COPY config/weir.toml /etc/weir/weir.toml
ENV WEIR_CONFIG=/etc/weir/weir.toml
USER nonroot:nonroot
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve"]
