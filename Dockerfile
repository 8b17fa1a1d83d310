# syntax=docker/dockerfile:1
#
# weir container image.
#
#   docker build -t weir .
#   docker run --rm -p 8080:8080 -v "$PWD/weir.toml:/etc/weir/weir.toml:ro" \
#       -e SGP_API_KEY weir
#
# Two stages: the official Rust image compiles the binary with the `dist`
# profile (release plus link-time optimisation, Cargo.toml) and profile-guided
# optimisation (benches/pgo.sh: an instrumented build serves a training load
# in front of `weir mock` backends, then the profile-guided build), from the
# same files .ci/run builds from; the runtime stage is
# distroless: glibc and the binary, no shell, no package manager. weir talks
# TLS to https:// backends through rustls with the compiled-in webpki roots,
# so those need no CA bundle; a rediss:// [cluster] link checks the system
# trust store (/etc/ssl/certs), which this image has: keep it if you slim
# the base.

# The builder must be the same Debian release as the runtime image
# (bookworm = debian12): a binary linked against a newer glibc would not start
# on the older one. 1.95 is the toolchain CI tests with.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# benches/pgo.sh drives the training load with wrk and merges the profile
# with rustup's llvm-tools, whose LLVM is rustc's own.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wrk=4.1.0-3+b2 \
    && rm -rf /var/lib/apt/lists/* \
    && rustup component add llvm-tools
WORKDIR /src
# Only what the build reads (see .dockerignore): the manifest, the lock file,
# the sources, and benches/ for pgo.sh and because Cargo.toml declares
# [[bench]] targets, whose files cargo checks exist even when building only
# the binary.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
# The cache mounts keep the crates.io downloads and compiled dependencies
# between builds, so a source change recompiles weir only (twice: the
# instrumented build and the optimised one). target/ is a cache mount, so the
# binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    benches/pgo.sh \
    && cp target/pgo/weir /usr/local/bin/weir

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
# The example configuration, so that `weir check` works out of the box;
# mount your own over it (a Kubernetes ConfigMap, a bind mount). `weir demo`
# needs no file (run it with `--listen 0.0.0.0:8080` to reach it from the
# host).
COPY config/weir.toml /etc/weir/weir.toml
ENV WEIR_CONFIG=/etc/weir/weir.toml
# distroless' "nonroot" user, by number: Kubernetes' runAsNonRoot can only
# verify a numeric user.
USER 65532:65532
# 8080: the OpenAI-style API (`server.listen`); 9090: /metrics and /admin/*
# when `server.admin_listen` is set to 0.0.0.0:9090.
EXPOSE 8080 9090
# weir drains in-flight requests (streams too) on SIGTERM within
# `server.shutdown_grace`; give `docker stop -t` at least that long.
STOPSIGNAL SIGTERM
# No curl in the image: the binary probes itself. It GETs /healthz on the
# `server.listen` of $WEIR_CONFIG over loopback (WEIR_HEALTHCHECK_URL overrides).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/weir", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve"]
