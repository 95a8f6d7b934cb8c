# The kvtier image: the `kvtier` binary (operator, router, node-agent, sim, bench, plan) and
# the connector's Python package in /opt/kvtier/python, which the operator's init container
# copies onto the PYTHONPATH of tiered engine Pods (the engine image stays stock vLLM).
#
#   docker build -t ghcr.io/kvtier/kvtier:0.1.0 .
#
# The connector wheel here carries the host, CUDA and HIP backends; both GPU runtimes are
# loaded at run time (ADR 0016), so it serves CUDA and ROCm engine images alike.
# Not built on the development machines (they have no container engine).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kvtier
RUN python3 -m venv /venv && /venv/bin/pip install "maturin>=1.9,<2" ziglang \
    && cd connector && /venv/bin/maturin build --release --locked --zig -o /wheels \
    && /venv/bin/pip install --no-deps --target /opt/kvtier/python /wheels/kvtier-*.whl

FROM debian:bookworm-slim
COPY --from=build /src/target/release/kvtier /usr/local/bin/kvtier
COPY --from=build /opt/kvtier/python /opt/kvtier/python
USER 65532:65532
ENTRYPOINT ["kvtier"]
