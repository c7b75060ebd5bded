# Limitless as an OpenWhisk Docker-action runtime.
#
#   docker build -t limitless .
#   wsk action create job --docker <registry>/limitless -a provide-api-key true -t 300000 \
#       -p limitless_store /shared/limitless-store
# (the store must be reachable from every container: today a shared directory; the S3
# store is planned). See docs/openwhisk.md.
#   wsk action invoke job -p bin /opt/limitless/examples/bin/matrix -p bin_args '["3500"]'
#
# Stage 1 builds the one `limitless` binary (the agent and the restorer are embedded in it)
# and the example workloads; stage 2 is a slim Debian with just those.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && make -C examples

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /action /var/cache/limitless
COPY --from=build /src/target/release/limitless /usr/local/bin/limitless
COPY --from=build /src/examples/bin /opt/limitless/examples/bin
COPY --from=build /src/examples/factors.py /src/examples/matrix.py /opt/limitless/examples/
# The engine's agent and restorer are unpacked here on first use.
ENV LIMITLESS_CACHE_DIR=/var/cache/limitless
EXPOSE 8080
ENTRYPOINT ["limitless", "serve"]
