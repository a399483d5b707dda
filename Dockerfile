# Build: docker build -t offload .   Run: docker run -p 8080:8080 offload
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
# The page is built into the binary.
COPY static ./static
RUN cargo build --release --locked && cp target/release/offload /offload

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home offload \
    && mkdir /data && chown offload /data
WORKDIR /app
COPY --from=build /offload /usr/local/bin/offload
USER offload
ENV OFFLOAD_BIND=0.0.0.0:8080 \
    OFFLOAD_DATA_DIR=/data \
    OFFLOAD_LOG_FORMAT=json
# Accepted jobs, uploads and results: mount a volume here to keep them across containers.
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["offload", "--healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["offload"]
